"""student.labels=online (issue 21, item 2): no label store, the teacher labels each augmented batch at train time.

Checked against independent references: the online schedule draws exactly the crops of a 1x store made by the
same teacher (image order and augmentation record, batch by batch), its targets equal the stored fp16 logits'
targets within fp16 rounding, and the record counts the teacher's fp16 bytes (hand count over its state dict) with
0 label and 0 record bytes, a family of its own in the frontier table.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_cfg, make_tiny_chain


def _hand_fp16_bytes(model: torch.nn.Module) -> int:
    """Floating tensors at 2 bytes per element, integer buffers (BatchNorm's step counter) at their own size."""
    total = 0
    for t in model.state_dict().values():
        total += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return total


def test_online_student_trains_and_records_the_teacher_bytes(tmp_path):
    from lpld.artifacts import results as results_artifact
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.report.accounting import byte_parts
    from lpld.report.frontier import frontier_rows
    from lpld.report.records import load_records
    from lpld.stages import run_stage

    _, ov = make_tiny_chain(tmp_path)
    stored = run_stage(compose_cfg(["stage=student", *ov]))
    exp = compose_cfg(["stage=student", *ov, "student.labels=online"])
    out = run_stage(exp)
    assert 0.0 <= out["top1"] <= 1.0 and "reused" not in out
    recs = load_records(results_artifact.path(exp, "results"))
    online = [r for r in recs if r["labels"] == "online"]
    soft = [r for r in recs if r["labels"] == "soft"]
    assert len(online) == 1 and len(soft) == 1 and soft[0]["top1"] == stored["top1"]
    rec = online[0]
    teacher, _ = teacher_artifact.load(exp)
    want = _hand_fp16_bytes(teacher)
    assert want > 0 and rec["model_bytes"] == want and rec["model_bytes_of"] == "teacher fp16"
    assert rec["label_bytes"] == 0 and rec["label_only_bytes"] == 0
    parts = byte_parts(rec)
    assert parts["labels"] == 0 and parts["records"] == 0 and parts["model"] == want
    assert parts["total"] == rec["image_file_bytes"] + want
    # the stored row counts no model; the online row is its own family in the frontier table
    assert byte_parts(soft[0])["model"] == 0 and byte_parts(soft[0])["labels"] > 0
    kinds = {r["label_kind"]: r for r in frontier_rows(recs)}
    assert set(kinds) == {"soft", "online"} and kinds["online"]["model"] == want
    from lpld.report.pareto import KIND_MARKERS, pareto_points

    points = {p.kind: p for p in pareto_points(recs)}  # x = total bytes: the teacher's bytes included
    assert set(points) == {"soft", "online"} and points["online"].storage == parts["total"]
    assert KIND_MARKERS["online"] != KIND_MARKERS["soft"]
    # a rerun reuses the finished online run
    assert run_stage(compose_cfg(["stage=student", *ov, "student.labels=online"])).get("reused") is True


def test_online_targets_equal_the_stored_targets_of_a_1x_store(tmp_path):
    """Same augmentation draws, same teacher: the online targets are the 1x store's up to its fp16 rounding."""
    from lpld.core.label_store import LabelStore
    from lpld.stages.student_store import load_inputs
    from lpld.stages.student_train import build_module

    _, ov = make_tiny_chain(tmp_path)
    on = load_inputs(compose_cfg(["stage=student", *ov, "student.labels=online"]))
    st = load_inputs(compose_cfg(["stage=student", *ov]))
    assert isinstance(st.store, LabelStore) and st.manifest["prune"]["ratio"] == 0.0
    assert len(on.store) == len(st.store) and (on.store.batch_ids == st.store.batch_ids).all()
    m_on, m_st = build_module(on), build_module(st)
    t = float(on.settings["temperature"])
    checked = 0
    for i in range(len(st.store)):
        b_on, b_st = on.store.read(i), st.store.read(i)
        assert torch.equal(b_on.index, b_st.index) and b_on.aug.equals(b_st.aug)
        assert b_on.logits is None  # nothing stored online
        x = m_on.replay(b_on)
        assert torch.equal(x, m_st.replay(b_st))
        labelled = m_on.label(b_on, x)
        z = labelled.logits
        assert z.dtype == torch.float32
        # the store keeps the same forward's logits rounded to fp16
        assert torch.equal(z.half(), b_st.logits)
        p_on, p_st = m_on.targets(labelled, t), m_st.targets(b_st, t)
        ulp = z.abs().max() * 2.0**-11  # fp16 rounding of a logit: half an ulp, relative 2^-11
        # softmax(z / T) moves by at most 2 max|dz| / T per probability (each log-prob moves by <= 2 max|dz| / T)
        assert float((p_on - p_st).abs().max()) <= float(2 * ulp / t) + 1e-7
        assert torch.allclose(p_on.sum(1), torch.ones(len(b_on)))
        checked += len(b_on)
    assert checked == st.manifest["num_rows"]


def test_online_refuses_what_it_cannot_do(tmp_path):
    from lpld.errors import ConfigError
    from lpld.stages.student_store import load_inputs

    _, ov = make_tiny_chain(tmp_path)
    with pytest.raises(ConfigError, match="student.labels=online"):
        load_inputs(compose_cfg(["stage=student", *ov, "student.labels=online", "student.loss=ce"]))
    with pytest.raises(ConfigError, match="student.labels"):
        load_inputs(compose_cfg(["stage=student", *ov, "student.labels=teacher"]))
