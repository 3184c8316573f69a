"""GIFT's loss (issue 21 item 5, LINs-lab/GIFT validate/losses_benchmark.py): a hand-computed value, its properties,
and a student trained with it through the stages."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg, make_tiny_chain

from lpld.core import kd_loss
from lpld.core.kd_loss import gift_loss, smoothed_one_hot


def test_gift_loss_by_hand():
    z = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 0.0, 4.0]])  # |t| = 5: t / |t| = (0.6, 0, 0.8)
    y = torch.tensor([2])
    # alpha 0.1, C = 3: s = (0.05, 0.05, 0.9), |s| = sqrt(0.815)
    n = math.sqrt(0.815)
    target = [0.6 + 0.1 * 0.05 / n, 0.1 * 0.05 / n, 0.8 + 0.1 * 0.9 / n]
    dot = 1 * target[0] + 2 * target[1] + 3 * target[2]
    cos = dot / (math.sqrt(14) * math.sqrt(sum(v * v for v in target)))
    assert float(gift_loss(z, t, y)) == pytest.approx(1 - cos, abs=1e-6)
    assert smoothed_one_hot(y, 3)[0].tolist() == pytest.approx([0.05, 0.05, 0.9])


def test_gift_loss_properties():
    g = torch.Generator().manual_seed(0)
    t, y = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    target = F.normalize(t, dim=1) + 0.1 * F.normalize(smoothed_one_hot(y, 5), dim=1)
    assert float(gift_loss(3.0 * target, t, y)) == pytest.approx(0.0, abs=1e-6)  # zero at any positive multiple
    z = torch.randn(6, 5, generator=g)
    assert float(gift_loss(z, t, y)) == pytest.approx(float(gift_loss(7.0 * z, 2.0 * t, y)), abs=1e-6)  # scale-free
    assert float(gift_loss(-target, t, y)) == pytest.approx(2.0, abs=1e-6)  # the far end
    # weight 0: plain cosine to the teacher; CutMix at lam = 1 is the unmixed loss
    cos = F.cosine_similarity(z, t, dim=1).mean()
    assert float(gift_loss(z, t, y, weight=0.0)) == pytest.approx(float(1 - cos), abs=1e-6)
    p = torch.randint(0, 5, (6,), generator=g)
    assert float(gift_loss(z, t, y, partner_labels=p, lam=1.0)) == pytest.approx(float(gift_loss(z, t, y)), abs=1e-6)
    lam = torch.rand(6, generator=g)
    s = lam[:, None] * smoothed_one_hot(y, 5) + (1 - lam[:, None]) * smoothed_one_hot(p, 5)
    ref = F.normalize(t, dim=1) + 0.1 * F.normalize(s, dim=1)
    want = 1 - F.cosine_similarity(z, ref, dim=1).mean()
    assert float(gift_loss(z, t, y, partner_labels=p, lam=lam)) == pytest.approx(float(want), abs=1e-6)
    assert "gift" in kd_loss.list_student_losses()


def test_a_gift_student_trains_on_a_label_store(tmp_path):
    from lpld.stages import run_stage

    _, ov = make_tiny_chain(tmp_path)
    out = run_stage(compose_cfg(["stage=student", *ov, "student=gift"]))
    assert 0.0 <= out["top1"] <= 1.0
