"""student.label_schedule=hald (issue 21, item 5): HALD's soft -> hard -> soft schedule against hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import compose_cfg, make_tiny_chain


def _phases(name, epochs, **params):
    from lpld.core.label_schedule import label_phase

    return "".join(label_phase(name, e, epochs, params)[0] for e in range(epochs))


def test_hald_schedule_by_hand():
    # official imagenet1k script: 300 epochs, hard_epochs 150, soft 150 -> soft 75, hard 150, soft 75
    assert _phases("hald", 300, hard_epochs=150) == "s" * 75 + "h" * 150 + "s" * 75
    # E = 7, H = null -> H = 3, S = 4: soft 2, hard 3, soft 2
    assert _phases("hald", 7) == "sshhhss"
    # E = 5, H = 2, S = 3: soft 3 // 2 = 1, hard 2, soft 3 - 1 = 2
    assert _phases("hald", 5, hard_epochs=2) == "shhss"
    assert _phases("hald", 4, hard_epochs=0) == "ssss"
    assert _phases("hald", 3, hard_epochs=3) == "hhh"
    assert _phases("none", 4) == "ssss"
    from lpld.core.label_schedule import hald_phases, list_label_schedules

    assert hald_phases(9, 4) == [("soft", 2), ("hard", 4), ("soft", 3)]
    assert {"none", "hald"} <= set(list_label_schedules())
    with pytest.raises(ValueError, match="hard_epochs"):
        hald_phases(4, 5)


def _module(ov, *extra):
    from lpld.stages.student_store import load_inputs
    from lpld.stages.student_train import build_module

    inp = load_inputs(compose_cfg(["stage=student", *ov, *extra]))
    return inp, build_module(inp)


def test_hald_hard_epoch_loss_is_the_timm_mixup_target_cross_entropy(tmp_path):
    """A hard epoch: soft cross-entropy to lam (1 - eps + eps/C on y, eps/C elsewhere) + (1 - lam) (same, partner)."""
    _, ov = make_tiny_chain(tmp_path)
    inp, m = _module(ov, "student.label_schedule=hald", "student.hard_epochs=2")  # E = 2: all hard
    assert inp.settings["label_schedule"] == "hald" and inp.settings["hard_smoothing"] == 0.8
    assert m.label_phase(0) == "hard" and m.label_phase(1) == "hard"
    b = inp.store.read(0)
    n, c, eps = len(b), inp.spec.num_classes, 0.8
    torch.manual_seed(0)
    z = torch.randn(n, c)
    loss, target = m.compute_loss(z, b, slice(0, n), 4.0)
    assert target is None
    y = inp.labels[b.index]
    off, on = eps / c, 1.0 - eps + eps / c
    t = torch.full((n, c), off)
    t[torch.arange(n), y] = on
    out = int(inp.manifest["aug"]["out_size"])
    assert b.aug.mix == "cutmix"  # the tiny chain's stores mix by CutMix: the partner's label enters the target
    y1, x1, y2, x2 = (int(v) for v in b.aug.box)
    share = 1.0 - (y2 - y1) * (x2 - x1) / out**2  # the clipped box's area share, as timm's correct_lam
    tp = torch.full((n, c), off)
    tp[torch.arange(n), y[b.aug.mix_index]] = on
    t = share * t + (1.0 - share) * tp
    want = -(t * F.log_softmax(z, dim=1)).sum(1).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    # no hard epoch: the configured KL on the stored labels, as without a schedule
    _, m0 = _module(ov, "student.label_schedule=hald", "student.hard_epochs=0")
    _, plain = _module(ov)
    assert m0.label_phase(0) == "soft"
    l0, t0 = m0.compute_loss(z, b, slice(0, n), 4.0)
    lp, tp_ = plain.compute_loss(z, b, slice(0, n), 4.0)
    assert float(l0) == pytest.approx(float(lp)) and torch.equal(t0, tp_)


def test_a_hald_student_trains_and_refuses_bad_knobs(tmp_path):
    from lpld.errors import ConfigError
    from lpld.stages import run_stage

    _, ov = make_tiny_chain(tmp_path)
    out = run_stage(compose_cfg(["stage=student", *ov, "student.label_schedule=hald"]))
    assert 0.0 <= out["top1"] <= 1.0
    from lpld.config import student_settings

    with pytest.raises(ConfigError, match="student.label_schedule"):
        student_settings(compose_cfg(["stage=student", *ov, "student.label_schedule=shs"]))
    with pytest.raises(ConfigError, match="student.hard_epochs"):
        student_settings(compose_cfg(["stage=student", *ov, "student.label_schedule=hald", "student.hard_epochs=9"]))
    # an unscheduled run's settings (its run key) are unchanged by the new knobs
    assert "label_schedule" not in student_settings(compose_cfg(["stage=student", *ov]))


def test_the_frontier_table_names_the_label_recipe():
    from lpld.report.frontier import label_recipe

    assert label_recipe({"labels": "soft", "student": {"loss": "kl"}}) == "soft"
    assert label_recipe({"labels": "soft", "student": {"loss": "kl", "label_schedule": "hald"}}) == "soft hald"
    assert label_recipe({"labels": "online", "student": {"loss": "gift", "labels": "online"}}) == "online gift"
    assert label_recipe({"labels": "hard", "student": {"loss": "ce"}}) == "hard"
    assert label_recipe({"student": {"loss": "ce"}}) == "hard"  # an older record: the loss says hard
