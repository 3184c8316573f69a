"""Issue 21: byte-honest accounting of results records and DD-Ranking's IOR / HLR / LRS, against hand computation."""

from __future__ import annotations

import math

import pytest

from lpld.report.accounting import byte_parts
from lpld.report.ddranking import (
    hard_label_recovery,
    improvement_over_random,
    label_robust_score,
    scores_from_records,
)
from lpld.report.frontier import frontier_markdown, frontier_rows
from lpld.report.pareto import pareto_points
from lpld.report.table import get_field


def rec(method, top1, seed=0, labels="soft", quant="mr10", **kw):
    r = {
        "method": method,
        "dataset": "demo",
        "teacher": "convnet",
        "ipc": 10,
        "prune": "10x",
        "quant": quant,
        "metric": "random",
        "student_model": "convnet",
        "student": {"loss": "ce" if labels == "hard" else "kl"},
        "epochs": 80,
        "seed": seed,
        "top1": top1,
        "labels": labels,
        "image_bytes": 78400,  # 100 x 3 x 28 x 28 uint8
        "image_file_bytes": 73056,  # the PNGs as stored
        "label_bytes": 30000 if labels == "soft" else 11000,  # labels + records of the pooled batches
        "label_only_bytes": 19000 if labels == "soft" else 0,
    }
    r.update(kw)
    return r


def test_lrs_formula_by_hand():
    # a = 0: (1 - e^-1) / (e - e^-1) = 1 / (e + 1)
    assert label_robust_score(0.0, 0.0) == pytest.approx(1 / (math.e + 1), abs=1e-12)
    assert label_robust_score(1.0, -1.0) == pytest.approx(1.0)  # a = 1: the top of the scale
    assert label_robust_score(-1.0, 1.0) == pytest.approx(0.0, abs=1e-12)  # a = -1: the bottom
    # IOR 0.12, HLR 0.40: a = 0.06 - 0.20 = -0.14; e^-0.14 = 0.8693582, e^-1 = 0.3678794, e = 2.7182818
    assert label_robust_score(0.12, 0.40) == pytest.approx((0.8693582 - 0.3678794) / (2.7182818 - 0.3678794), abs=1e-6)
    # w = 1 ignores HLR, w = 0 ignores IOR
    assert label_robust_score(0.3, 0.9, w=1.0) == pytest.approx(label_robust_score(0.6, 0.0))  # a = 0.3 both
    assert label_robust_score(0.9, 0.3, w=0.0) == pytest.approx(label_robust_score(0.0, 0.6))  # a = -0.3 both
    assert improvement_over_random(0.62, 0.50) == pytest.approx(0.12)
    assert hard_label_recovery(0.80, 0.40) == pytest.approx(0.40)
    with pytest.raises(ValueError, match="weight w"):
        label_robust_score(0.1, 0.1, w=1.5)


RECORDS = [
    rec("lpld", 0.60, seed=0),
    rec("lpld", 0.64, seed=1),  # mean 0.62
    rec("random_real", 0.50),  # same recipe: IOR = 0.12
    rec("random_real", 0.30, quant="hard"),  # another recipe: not a reference for mr10
    rec("lpld", 0.40, labels="hard"),  # HLR = 0.80 - 0.40
    rec("full_real", 0.80, labels="hard", prune="1x"),
]


def test_scores_from_records_find_their_reference_rows():
    s = scores_from_records(RECORDS, RECORDS[0])
    assert s.ior == pytest.approx(0.12) and s.hlr == pytest.approx(0.40)
    assert s.lrs == pytest.approx(0.2133587, abs=1e-6)
    # the caller's real-hard accuracy replaces the full_real rows
    assert scores_from_records(RECORDS, RECORDS[0], real_hard=0.90).hlr == pytest.approx(0.50)
    # without a full_real row: IOR only
    s = scores_from_records(RECORDS[:5], RECORDS[0])
    assert s.ior == pytest.approx(0.12) and s.hlr is None and s.lrs is None
    # the hard row: IOR needs a random-real hard row of the same recipe (absent), HLR is its own
    s = scores_from_records(RECORDS, RECORDS[4])
    assert s.ior is None and s.hlr == pytest.approx(0.40)
    assert scores_from_records(RECORDS, RECORDS[2]).ior is None  # the references themselves score nothing


def test_byte_parts_by_hand():
    soft = byte_parts(rec("lpld", 0.6))
    assert soft == {"images": 73056, "labels": 19000, "records": 11000, "model": 0, "total": 73056 + 30000}
    hard = byte_parts(rec("lpld", 0.4, labels="hard"))
    assert hard == {"images": 73056, "labels": 0, "records": 11000, "model": 0, "total": 84056}
    # an online teacher: no store, the teacher's bytes count
    online = byte_parts(rec("lpld", 0.7, label_bytes=0, label_only_bytes=0, model_bytes=22_000_000))
    assert online["total"] == 73056 + 22_000_000 and online["model"] == 22_000_000
    # an old record without file sizes or a label split: raw pixels, everything in labels
    old = byte_parts({"image_bytes": 78400, "label_bytes": 500})
    assert old == {"images": 78400, "labels": 500, "records": 0, "model": 0, "total": 78900}
    assert get_field(rec("lpld", 0.6), "bytes_records") == 11000
    assert get_field(rec("lpld", 0.6), "bytes_total") == 103056
    with pytest.raises(ValueError, match="negative"):
        byte_parts(rec("lpld", 0.6, label_only_bytes=40000))


def test_frontier_rows_and_markdown():
    rows = frontier_rows(RECORDS)
    lpld = [r for r in rows if r["method"] == "lpld" and r["label_kind"] == "soft"][0]
    assert lpld["n"] == 2 and lpld["top1"] == pytest.approx(0.62) and lpld["top1_std"] == pytest.approx(0.0282843, 1e-5)
    assert (lpld["images"], lpld["labels"], lpld["records"], lpld["model"], lpld["total"]) == (
        73056,
        19000,
        11000,
        0,
        103056,
    )
    assert rows == sorted(rows, key=lambda r: (r["total"], r["method"], -r["top1"]))
    md = frontier_markdown(rows)
    line = [ln for ln in md.splitlines() if ln.startswith("| lpld | 10 | 10x | mr10 | soft")][0]
    # parts in kB, total, (no seed estimate without a store), top-1 mean ± std, IOR, HLR, LRS
    assert line == (
        "| lpld | 10 | 10x | mr10 | soft | 73.1 | 19.0 | 11.0 | 0.0 | 103.1 |  | 62.0 ± 2.8 | +12.0 | +40.0 | 21.3 |"
    )
    hard = [ln for ln in md.splitlines() if ln.startswith("| lpld | 10 | 10x | mr10 | hard")][0]
    assert "| 0.0 | 11.0 |" in hard and hard.endswith("| 40.0 |  | +40.0 |  |")
    assert lpld["records_seed"] is None  # no store_dir in these records


def test_pareto_x_is_the_honest_total_and_hard_rows_keep_their_marker():
    pts = pareto_points([rec("lpld", 0.6), rec("lpld", 0.4, labels="hard")])
    assert sorted(p.storage for p in pts) == [84056, 103056]
    assert {p.kind for p in pts} == {"quant", "hard"}
    assert [p.kind for p in pts if p.storage == 84056] == ["hard"]


def test_report_stage_writes_the_frontier_table(tmp_path):
    from conftest import compose_cfg, frozen
    from omegaconf import OmegaConf

    from lpld.report.records import append_record
    from lpld.stages import report

    res = tmp_path / "art" / "demo" / "results" / "frontier.jsonl"
    for i, r in enumerate(RECORDS):
        extra = {"config": {}, "top5": 1.0, "compression_vs_1x": 1.0, "wall_time_s": 1.0, "run_key": f"r{i}"}
        append_record(res, dict(r, **extra))
    ov = ["stage=report", "stage.rows=[method,quant]", "stage.cols=[labels,prune]", "stage.real_hard_top1=0.9"]
    stage = compose_cfg(ov, raw=True)
    cfg = OmegaConf.create(
        {
            "dataset": {"name": "demo"},
            "stage": stage.stage,
            "logger": {"name": "none", "log_images": False},
            "paths": {"artifacts": str(tmp_path / "art")},
        }
    )
    cfg.stage.results = str(res)
    report.run(frozen(cfg))
    md = (res.parent / "reports" / "frontier" / "frontier.md").read_text()
    # HLR from the configured real-hard accuracy: 0.90 - 0.40; a = 0.06 - 0.25 = -0.19
    lrs = 100 * (math.exp(-0.19) - math.exp(-1)) / (math.e - math.exp(-1))
    assert f"|  | 62.0 ± 2.8 | +12.0 | +50.0 | {lrs:.1f} |" in md


def test_model_bytes_by_hand():
    import torch

    from lpld.core.storage_accounting import model_bytes

    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    # floats: 12 + 3 (linear) + 3 + 3 (bn affine) + 3 + 3 (running stats) = 27; num_batches_tracked: one int64
    assert model_bytes(m) == 27 * 4 + 8
    assert model_bytes(m, torch.float16) == 27 * 2 + 8
    assert model_bytes(m.state_dict()) == model_bytes(m)


def test_bytes_figure_and_write_frontier(tmp_path):
    from lpld.report.frontier import bytes_figure, write_frontier

    rows = write_frontier(RECORDS, tmp_path, title="demo", real_hard=0.8)
    assert (tmp_path / "frontier.md").read_text().startswith("### demo")
    assert (tmp_path / "bytes.png").read_bytes()[:4] == b"\x89PNG"
    fig, _ = bytes_figure(rows)
    ax = fig.axes[0]
    # one bar per part per row, stacked: the right end of each row's last bar is its total (kB)
    bars = ax.patches
    assert len(bars) == 4 * len(rows)
    ends = sorted(round(b.get_x() + b.get_width(), 6) for b in bars[-len(rows) :])
    assert ends == sorted(round(r["total"] / 1e3, 6) for r in rows)


def test_records_from_before_the_labels_field():
    """A hard-label record written before issue 19: no ``labels`` field, student.loss = ce, the store's label
    arrays still in label_bytes / label_only_bytes: 0 label bytes, its records kept, a hard row for HLR."""
    old_soft = {k: v for k, v in rec("lpld", 0.77).items() if k != "labels"}
    old_hard = dict(old_soft, top1=0.53, student={"loss": "ce"})
    assert byte_parts(old_hard) == {"images": 73056, "labels": 0, "records": 11000, "model": 0, "total": 84056}
    assert byte_parts(old_soft)["labels"] == 19000
    s = scores_from_records([old_soft, old_hard], old_soft, real_hard=0.80)
    assert s.hlr == pytest.approx(0.27) and s.ior is None
    kinds = sorted(r["label_kind"] for r in frontier_rows([old_soft, old_hard]))
    assert kinds == ["hard", "soft"]


def test_seed_record_bytes_match_a_seed_store(tmp_path):
    """The records a row would need with record=seed, predicted from its explicit store, equal a real seed store's."""
    import torch

    from lpld.core.augment import AugConfig
    from lpld.core.label_store import StoreSpec, finalize, prepare
    from lpld.core.quant import QuantConfig
    from lpld.core.relabel import generate
    from lpld.report.accounting import seed_record_bytes

    n, c, hw = 20, 6, 10
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * hw * hw, c)).eval()
    images = torch.randn(n, 3, hw, hw)
    accs = {}
    for mode in ("explicit", "seed"):
        q = QuantConfig("mrq", k=3, params={"bits": 4})
        spec = StoreSpec(n, c, (hw, hw), 8, 3, "1x", 0.0, "batch", q, AugConfig(out_size=hw, mix="cutmix"), mode, 2)
        path = tmp_path / mode
        prepare(path, spec, {"images_fingerprint": "i", "teacher_fingerprint": "t"})
        generate(path, teacher, images)
        accs[mode] = (path, finalize(path))
    path, man = accs["explicit"]
    row = {"store_dir": str(path), "pool_batches": man["num_batches"]}
    seed_man = accs["seed"][1]
    assert seed_record_bytes(row) == seed_man["accounting"]["records_bytes"] < man["accounting"]["records_bytes"]
    assert seed_record_bytes({"store_dir": str(tmp_path / "gone"), "pool_batches": 3}) is None
    assert seed_record_bytes({}) is None


def test_lrs_averages_rounds_paired_by_seed_as_dd_ranking():
    """Seeds 0 and 1 in all three rows: LRS is the mean of the per-seed LRS (DD-Ranking's rounds), not LRS(means)."""
    recs = [
        rec("lpld", 0.60, seed=0),
        rec("lpld", 0.64, seed=1),
        rec("random_real", 0.50, seed=0),
        rec("random_real", 0.46, seed=1),
        rec("lpld", 0.40, seed=0, labels="hard"),
        rec("lpld", 0.44, seed=1, labels="hard"),
    ]
    s = scores_from_records(recs, recs[0], real_hard=0.80)
    assert s.ior == pytest.approx(0.14) and s.hlr == pytest.approx(0.38)  # linear: the means either way
    # seed 0: a = 0.05 - 0.20 = -0.15; seed 1: a = 0.09 - 0.18 = -0.09 (e^-0.15 = 0.860708, e^-0.09 = 0.913931)
    f = [(0.860708 - 0.3678794) / (2.7182818 - 0.3678794), (0.913931 - 0.3678794) / (2.7182818 - 0.3678794)]
    assert s.lrs == pytest.approx(sum(f) / 2, abs=1e-6)
    assert abs(s.lrs - label_robust_score(0.14, 0.38)) > 1e-4  # differs from the LRS of the means
