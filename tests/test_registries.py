"""Every entry of every registry (recover methods, label codecs, student losses, pruning metrics) keeps the
property its family promises; a new entry is tested by being registered."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from lpld.core import kd_loss, prune_metrics, quant, recover_methods
from lpld.core.errors import ConfigError
from lpld.core.label_store import RESERVED_NAMES, StoredBatch, StoreSpec, array_layout
from lpld.core.synthesis import plan_units

ROOT = Path(__file__).resolve().parents[1]
C, B = 12, 16


def teacher_logits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) logits with a clear winner per row, and that winner as the label."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    z[torch.arange(B), labels] += 6.0
    return z, labels


def stored_from(encoded: dict[str, np.ndarray], cfg: quant.QuantConfig) -> StoredBatch:
    """A StoredBatch as the store reader builds it: the codec's arrays (``to_tensor``), its config and C."""
    codec = quant.get_label_codec(cfg.mode)
    labels = {k: codec.to_tensor(k, v) for k, v in encoded.items()}
    return StoredBatch(torch.arange(B), None, labels, quant=cfg, num_classes=C)


@pytest.mark.parametrize("name", ["lpld", "nope"])
def test_unknown_names_raise_config_error_listing_the_choices(name):
    getters = (
        (quant.get_label_codec, quant.list_label_codecs),
        (kd_loss.get_student_loss, kd_loss.list_student_losses),
        (prune_metrics.get_prune_metric, prune_metrics.list_prune_metrics),
    )
    for get, names in getters:
        with pytest.raises(ConfigError) as e:
            get(name)
        assert all(n in str(e.value) for n in names())
    with pytest.raises(ConfigError, match="lpld_c"):
        recover_methods.get_recover_method("nope")


def test_registering_a_taken_name_fails():
    with pytest.raises(ValueError, match="already registered"):
        kd_loss.register_student_loss("kl")(lambda b: (b.logits.sum(), None))


# --------------------------------------------------------------------------------------------- recover methods
@pytest.mark.parametrize("name", recover_methods.list_recover_methods())
def test_recover_method_has_a_config_and_plans_every_class_once(name):
    m = recover_methods.get_recover_method(name)
    conf = yaml.safe_load((ROOT / "conf" / "recover" / f"{name}.yaml").read_text())
    assert conf["name"] == name  # recover=<name> selects this entry
    if m.kind != "optimize":
        assert m.as_dict() == {"kind": m.kind}
        return
    classes, ipc = list(range(7)), 3
    units = plan_units(classes, ipc, m.batching, m.classwise, 4)
    assert sorted(c for u in units for c in u.classes) == classes
    for u in units:  # every image of the unit is matched by exactly one segment
        imgs = sorted(i for s in u.segments for i in s.images)
        assert imgs == list(range(len(u.classes) * ipc))
        assert all((s.stats_class is not None) == m.classwise for s in u.segments)


# ------------------------------------------------------------------------------------------------ label codecs
@pytest.mark.parametrize("name", quant.list_label_codecs())
def test_codec_round_trip_is_a_distribution_with_the_teachers_top1(name):
    z, _ = teacher_logits()
    cfg = quant.QuantConfig(mode=name, k=4 if quant.get_label_codec(name).uses_k else 0, temperature=2.0)
    enc = quant.encode(z, cfg)
    spec = quant.label_arrays(cfg, C)
    assert set(enc) == set(spec)
    for k, a in spec.items():  # encode writes exactly the arrays the store lays out
        assert enc[k].shape == (B, *a.shape) and enc[k].dtype == a.dtype and a.storage in ("label", "record")
    for t in (1.0, 2.0, 4.0):
        b = stored_from(enc, cfg)
        p = quant.decode(b, name, t, C)
        assert p.shape == (B, C) and p.dtype == torch.float32 and torch.equal(b.decode(t), p)
        assert (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(B), atol=1e-5)
        assert torch.equal(p.argmax(1), z.argmax(1))


@pytest.mark.parametrize("name", quant.list_label_codecs())
def test_builtin_codecs_decode_within_their_stated_error(name):
    if name not in ("none", "mr", "ms", "hard"):
        pytest.skip("no reference for a codec added later")
    z, _ = teacher_logits(1)
    k, tg, t = 4, 2.0, 2.0
    cfg = quant.QuantConfig(mode=name, k=k if name in ("mr", "ms") else 0, temperature=tg)
    p = quant.decode(stored_from(quant.encode(z, cfg), cfg), name, t, C)
    zh = z.half().float()  # values are stored in fp16
    top = z.topk(k, dim=1).indices
    if name == "none":
        ref = torch.softmax(zh / t, dim=1)
    elif name == "mr":  # softmax over the top-k logits, 0 elsewhere
        ref = torch.zeros(B, C).scatter_(1, top, torch.softmax(zh.gather(1, top) / t, dim=1))
    elif name == "ms":  # the top-k probabilities at T_g, the remaining mass uniform over the other classes
        q = torch.softmax(z / tg, dim=1)
        kept = q.gather(1, top).half().float()
        ref = ((1 - kept.sum(1, keepdim=True)) / (C - k)).expand(B, C).clone().scatter_(1, top, kept)
        ref = ref / ref.sum(1, keepdim=True)
    else:
        ref = torch.nn.functional.one_hot(z.argmax(1), C).float()
    torch.testing.assert_close(p, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", quant.list_label_codecs())
def test_codec_declares_its_knobs_arrays_tag_and_label(name):
    codec = quant.get_label_codec(name)
    assert all(isinstance(d, quant.CodecParam) for d in codec.params.values())
    cfg = quant.QuantConfig(mode=name, k=4 if codec.uses_k else 0, temperature=2.0)
    cfg.validate(C)
    assert cfg.tag and cfg.tag.isprintable() and not set(cfg.tag) & set("/\\ ") and cfg.label  # a key part
    assert codec.report_kind in ("soft", "quant", "hard")
    for n, a in quant.label_arrays(cfg, C).items():
        assert n not in RESERVED_NAMES and a.storage in ("label", "record")
    # the store's accounting asks the codec which bytes are labels
    from lpld.core.augment import AugConfig
    from lpld.core.label_store import accounting

    spec = StoreSpec(10, C, (8, 8), 4, 1, "1x", 0.0, "batch", cfg, AugConfig(8), "explicit", 0)
    layout = array_layout(spec, 3, 10)
    labels = sum(a.nbytes for a in layout if a.name in quant.label_arrays(cfg, C) and a.storage == "label")
    assert accounting(layout)["labels_bytes"] == labels > 0


def test_builtin_codecs_keep_their_tags_and_identity():
    tags = [quant.QuantConfig(*a).tag for a in (("none",), ("mr", 10), ("ms", 50, 4.0), ("hard",))]
    assert tags == ["none", "mr10", "ms50", "hard"]
    assert quant.QuantConfig("ms", 5, 4.0).to_dict() == {"mode": "ms", "k": 5, "temperature": 4.0}  # no params key


def test_a_codec_array_may_not_take_a_store_name(monkeypatch):
    from lpld.core.augment import AugConfig
    from lpld.core.label_store import layout

    spec = StoreSpec(10, C, (8, 8), 4, 1, "1x", 0.0, "batch", quant.QuantConfig(), AugConfig(8), "explicit", 0)
    monkeypatch.setattr(layout, "label_arrays", lambda q, c: {"crops": quant.CodecArray((1,), np.uint8)})
    with pytest.raises(ValueError, match="'crops', a name the store uses"):
        array_layout(spec, 3, 10)


def test_stored_batch_carries_any_codec_arrays():
    z = torch.randn(3, C)
    b = StoredBatch(torch.arange(3), None, logits=z.half())
    assert set(b.labels) == {"logits"} and b.logits is b.labels["logits"]
    assert b.hard is None  # another codec's array: absent
    with pytest.raises(AttributeError, match="no field or label array"):
        _ = b.not_an_array
    b.hard = z.argmax(1)  # assigning an array puts it with the others
    assert set(b.labels) == {"logits", "hard"}
    import dataclasses

    c = dataclasses.replace(b, quant=quant.QuantConfig("none"), num_classes=C)  # what device moves do
    assert c.labels.keys() == b.labels.keys() and torch.equal(c.decode(2.0), torch.softmax(z.half().float() / 2, 1))


# ---------------------------------------------------------------------------------------------- student losses
def loss_inputs(student: torch.Tensor, z: torch.Tensor, labels: torch.Tensor, options: dict) -> kd_loss.LossInputs:
    t = 2.0
    return kd_loss.LossInputs(
        logits=student,
        labels=labels,
        partner=None,
        lam=None,
        stored=SimpleNamespace(logits=z.half(), hard=z.argmax(1)),
        rows=slice(0, B),
        quant_mode="none",
        target=lambda: torch.softmax(z / t, dim=1),
        teacher_t=t,
        student_t=t,
        options=options,
    )


@pytest.mark.parametrize("name", kd_loss.list_student_losses())
@pytest.mark.parametrize("options", [{}, {"gamma": 0.1, "t2": True, "mse_target": "logits"}])
def test_loss_is_smallest_when_the_student_matches_the_teacher(name, options):
    z, labels = teacher_logits(2)
    fn = kd_loss.get_student_loss(name)
    same, _ = fn(loss_inputs(z.clone(), z, labels, options))
    g = torch.Generator().manual_seed(3)
    worse = [fn(loss_inputs(torch.randn(B, C, generator=g) * 3, z, labels, options))[0] for _ in range(5)]
    assert same.dim() == 0 and torch.isfinite(same) and same >= 0
    assert all(same < w for w in worse)


@pytest.mark.parametrize("name", kd_loss.list_student_losses())
def test_soft_losses_vanish_at_the_teacher(name):
    """Without their hard-label (GT) term, the soft losses are zero when student == teacher."""
    z, labels = teacher_logits(4)
    loss, target = kd_loss.get_student_loss(name)(loss_inputs(z.clone(), z, labels, {"gamma": 0.0}))
    if name == "ce":
        assert target is None  # a hard-label loss: no soft target (and no Calibrated Alignment)
    else:
        assert float(loss) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------------- pruning metrics
@pytest.mark.parametrize("name", prune_metrics.list_prune_metrics())
def test_metric_scores_each_row_once_and_ranks_a_confident_correct_row_first(name):
    scorer = prune_metrics.get_prune_metric(name)
    if scorer is None:  # random: the pool is drawn without scores
        with pytest.raises(ValueError, match="no scores"):
            prune_metrics.per_sample_scores(name, torch.zeros(2, dtype=torch.long))
        return
    z, labels = teacher_logits(5)
    z[0] = 0.0
    z[0, (labels[0] + 1) % C] = 1.0  # row 0: the teacher is unsure and wrong
    s = prune_metrics.per_sample_scores(
        name, labels, probs=torch.softmax(z, 1), logits=z, hard=z.argmax(1), cut_lambda=0.3
    )
    assert s.shape == (B,) and s.dtype == torch.float64 and torch.isfinite(s).all()
    assert np.isfinite(prune_metrics.batch_score(s))
    assert (s[1:] >= s[0]).all()  # higher = easier
