"""Recover core: loss terms vs hand computations, jitter vs a slice+resize reference, batching equivalence."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpld.core.jitter import (
    JitterPlan,
    apply_jitter,
    cda_scale_min,
    draw_jitter_plan,
    make_generator,
    reference_jitter,
)
from lpld.core.recover_loss import (
    LossWeights,
    bn_matching_loss,
    image_l2_loss,
    recover_losses,
    segment_moments,
    tv_l2_loss,
)
from lpld.core.synthesis import SynthesisConfig, plan_units, synthesize


class TinyBN(nn.Module):
    """Two conv+BN blocks and a linear head; BN running stats made non-trivial."""

    def __init__(self, num_classes: int = 5, ch: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(ch, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def tiny_teacher(num_classes: int = 5) -> TinyBN:
    torch.manual_seed(0)
    m = TinyBN(num_classes)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 8, 8) * 1.5 + 0.3)
    return m.eval()


def tiny_class_stats(num_classes: int = 5):
    g = torch.Generator().manual_seed(1)
    mean = [torch.randn(num_classes, 6, generator=g) * 0.1, torch.randn(num_classes, 8, generator=g) * 0.1]
    var = [torch.rand(num_classes, 6, generator=g) + 0.5, torch.rand(num_classes, 8, generator=g) + 0.5]
    return mean, var


# --------------------------------------------------------------------------- loss terms


def test_segment_moments_match_concatenated_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 4, 5, generator=g) * 2 + 1
    seg = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    mu, var = segment_moments(x, seg, 3)
    for s in range(3):
        xs = x[seg == s]
        flat = xs.transpose(0, 1).reshape(3, -1)
        assert torch.allclose(mu[s], flat.mean(1), atol=1e-6)
        assert torch.allclose(var[s], flat.var(1, unbiased=False), atol=1e-5)


def test_bn_loss_hand_computation_and_zero_at_match():
    # one layer, one channel, two 1x2 images in one segment: values {1, 3} and {5, 7}
    x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])
    seg = torch.zeros(2, dtype=torch.long)
    # mean 4, biased var ((9+1+1+9)/4) = 5
    loss = bn_matching_loss([x], seg, 1, [torch.tensor([[1.0]])], [torch.tensor([[1.0]])], [2.0])
    assert torch.allclose(loss, torch.tensor([2.0 * (3.0 + 4.0)]))
    zero = bn_matching_loss([x], seg, 1, [torch.tensor([[4.0]])], [torch.tensor([[5.0]])], [1.0])
    assert torch.allclose(zero, torch.zeros(1), atol=1e-6)
    # L2 norm over channels (not squared, not a sum of abs)
    x2 = torch.zeros(1, 2, 1, 1)
    norm_loss = bn_matching_loss(
        [x2], torch.zeros(1, dtype=torch.long), 1, [torch.tensor([[3.0, 4.0]])], [torch.zeros(1, 2)], [1.0]
    )
    assert torch.allclose(norm_loss, torch.tensor([5.0]))


def test_classwise_term_depends_only_on_own_images():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, 3, 3, generator=g, requires_grad=True)
    seg = torch.tensor([0, 0, 1, 1, 2, 2])
    tm, tv = [torch.randn(3, 2, generator=g)], [torch.rand(3, 2, generator=g)]
    loss = bn_matching_loss([x], seg, 3, tm, tv, [1.0])
    (gx,) = torch.autograd.grad(loss[1], x)
    assert gx[seg != 1].abs().max() == 0 and gx[seg == 1].abs().max() > 0
    x2 = x.detach().clone()
    x2[seg != 1] += 10.0
    assert torch.allclose(bn_matching_loss([x2], seg, 3, tm, tv, [1.0])[1], loss[1].detach())


def test_tv_and_l2_priors_match_per_segment_reference():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 6, 6, generator=g)
    seg = torch.tensor([1, 0, 1, 1, 0])
    tv = tv_l2_loss(x, seg, 2)
    l2 = image_l2_loss(x, seg, 2)
    for s in range(2):
        xs = x[seg == s]
        ref = (
            torch.norm(xs[:, :, :, :-1] - xs[:, :, :, 1:])
            + torch.norm(xs[:, :, :-1, :] - xs[:, :, 1:, :])
            + torch.norm(xs[:, :, 1:, :-1] - xs[:, :, :-1, 1:])
            + torch.norm(xs[:, :, :-1, :-1] - xs[:, :, 1:, 1:])
        )
        assert torch.allclose(tv[s], ref, rtol=1e-5)
        assert torch.allclose(l2[s], torch.norm(xs.reshape(len(xs), -1), dim=1).mean(), rtol=1e-5)


def test_recover_losses_sum_of_segments_equals_separate_evaluation():
    model = tiny_teacher()
    from lpld.core.bn_hooks import BNInputHooks

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 8, 8, generator=g)
    y = torch.tensor([0, 0, 0, 3, 3, 3])
    seg = torch.tensor([0, 0, 0, 1, 1, 1])
    cm, cv = tiny_class_stats()
    w = LossWeights(alpha=0.3, first_bn_multiplier=10.0, tv_l2=1e-3, l2=1e-2)

    def run(xb, yb, sb, rows):
        with BNInputHooks(model) as h:
            out = model(xb)
            ns = int(sb.max()) + 1
            return recover_losses(out, yb, xb, h.inputs, sb, ns, [m[rows] for m in cm], [v[rows] for v in cv], w)

    both = run(x, y, seg, torch.tensor([0, 3]))
    a = run(x[:3], y[:3], seg[:3], torch.tensor([0]))
    b = run(x[3:], y[3:], seg[3:] - 1, torch.tensor([3]))
    assert torch.allclose(both.total, torch.cat([a.total, b.total]), atol=1e-5)
    # hand composition of one segment: CE mean + alpha * BN + priors
    assert torch.allclose(a.total, a.ce + 0.3 * a.bn + 1e-3 * a.tv + 1e-2 * a.l2)
    assert torch.allclose(a.ce, F.cross_entropy(model(x[:3]), y[:3]))


# --------------------------------------------------------------------------- jitter


@pytest.mark.parametrize("H,W", [(8, 8), (7, 10)])
def test_grid_jitter_equals_slice_resize_flip_roll(H, W):
    g = make_generator(0, "t")
    plan = draw_jitter_plan(g, 12, H, W, scale_min=0.08, roll=3)
    x = torch.randn(12, 2, H, W, generator=g)
    got = apply_jitter(x, plan)
    ref = reference_jitter(x, plan)
    assert torch.allclose(got, ref, atol=1e-5)
    assert plan.flip.any() and (~plan.flip).any() and (plan.dy > 0).any()


def test_jitter_plan_valid_deterministic_and_scale_bounded():
    p1 = draw_jitter_plan(make_generator(1, "a"), 500, 16, 16, scale_min=0.5, scale_max=1.0, roll=4)
    p2 = draw_jitter_plan(make_generator(1, "a"), 500, 16, 16, scale_min=0.5, scale_max=1.0, roll=4)
    for f in ("top", "left", "h", "w", "flip", "dy", "dx"):
        assert torch.equal(getattr(p1, f), getattr(p2, f))
    assert (p1.top >= 0).all() and (p1.top + p1.h <= 16).all() and (p1.left + p1.w <= 16).all()
    frac = (p1.h * p1.w).double() / 256
    assert frac.min() > 0.5 * 0.75 and frac.max() <= 1.0  # rounding of w, h blurs the bound slightly
    assert p1.dy.max() == 4 and p1.dy.min() == 0
    full = draw_jitter_plan(make_generator(1, "b"), 50, 16, 16, scale_min=1.0, scale_max=1.0, flip=False)
    assert (full.h == 16).all() and (full.w == 16).all() and not full.flip.any()


def test_cda_schedules():
    T = 10
    assert torch.allclose(cda_scale_min(T, "step", 0.5), torch.tensor([1.0] * 5 + [0.08] * 5, dtype=torch.float64))
    lin = cda_scale_min(T, "linear", 0.5)
    assert lin[0] == 1.0 and torch.allclose(lin[1], torch.tensor(0.08 + 0.92 * 0.8, dtype=torch.float64))
    cos = cda_scale_min(T, "cosine", 1.0)
    assert cos[0] == 1.0 and (cos[1:] < cos[:-1]).all() and cos[-1] > 0.08
    assert (cda_scale_min(T, "linear", 0.0) == 0.08).all()
    with pytest.raises(ValueError, match="schedule"):
        cda_scale_min(T, "exp", 0.5)


# --------------------------------------------------------------------------- batching equivalence


def _cfg(**kw) -> SynthesisConfig:
    base = dict(
        iterations=6,
        lr=0.1,
        ipc=3,
        channels=3,
        image_size=8,
        weights=LossWeights(alpha=0.05, first_bn_multiplier=10.0, tv_l2=1e-4, l2=1e-5),
        pixel_min=(-2.0, -2.1, -1.8),
        pixel_max=(2.2, 2.0, 2.4),
        seed=7,
        roll=2,
    )
    base.update(kw)
    return SynthesisConfig(**base)


@pytest.mark.parametrize(
    "batching,classwise,group,extra",
    [
        ("class", True, 1, {}),
        ("class", False, 1, {}),
        ("slot", False, 2, {}),
        ("slot", False, 2, {"cda_schedule": "cosine", "cda_milestone": 0.5}),
    ],
    ids=["lpld", "lpld_c", "sre2l", "cda"],
)
def test_k_units_in_one_batch_equal_separate_runs(batching, classwise, group, extra):
    model = tiny_teacher()
    cm, cv = tiny_class_stats()
    cfg = _cfg(**extra)
    units = plan_units([0, 1, 2, 3, 4], cfg.ipc, batching, classwise, group)
    together = synthesize(model, units, cfg, cm, cv)
    apart = [synthesize(model, [u], cfg, cm, cv)[0] for u in units]
    for a, b in zip(together, apart):
        assert a.classes == b.classes
        assert torch.allclose(a.images, b.images, atol=1e-4), (a.images - b.images).abs().max()
        for c in a.classes:
            assert abs(a.class_loss[c]["total"] - b.class_loss[c]["total"]) < 1e-4
    # the images moved away from the initial noise and stay inside the clip range
    imgs = torch.cat([r.images for r in together])
    lo = torch.tensor(cfg.pixel_min).view(1, 3, 1, 1)
    hi = torch.tensor(cfg.pixel_max).view(1, 3, 1, 1)
    assert (imgs >= lo - 1e-6).all() and (imgs <= hi + 1e-6).all()
    # grouping matters for the *math* only through segments: a different seed changes images
    other = synthesize(model, units[:1], _cfg(seed=8, **extra), cm, cv)[0]
    assert not torch.allclose(other.images, together[0].images)


def test_sre2l_units_couple_image_j_across_classes():
    units = plan_units([0, 1, 2, 3, 4], 2, "slot", False, 2)
    assert [u.classes for u in units] == [(0, 1), (2, 3), (4,)]
    assert [s.images for s in units[0].segments] == [(0, 2), (1, 3)]
    lp = plan_units([3, 4], 2, "class", True)
    assert lp[0].segments[0].stats_class == 3 and lp[0].segments[0].images == (0, 1)
    with pytest.raises(ValueError, match="ipc"):
        plan_units([0], 0, "class", True)


def test_recover_lowers_objective_on_tiny_teacher():
    model = tiny_teacher()
    cm, cv = tiny_class_stats()
    hist = []
    cfg = _cfg(iterations=40, lr=0.2, roll=0, rrc_scale_min=1.0, flip=False)
    synthesize(
        model,
        plan_units([2], cfg.ipc, "class", True),
        cfg,
        cm,
        cv,
        on_step=lambda t, losses: hist.append(float(losses.total.sum())),
    )
    assert len(hist) == 40 and sum(hist[-5:]) / 5 < 0.7 * sum(hist[:5]) / 5


def test_core_imports_no_lightning_or_hydra():
    code = (
        "import sys; import lpld.core.synthesis, lpld.core.recover_loss, lpld.core.jitter, lpld.core.rded, "
        "lpld.core.images; bad=[m for m in ('lightning','hydra','omegaconf') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_stack_and_index_shapes():
    plans = [draw_jitter_plan(make_generator(0, i), 4, 8, 8) for i in range(3)]
    st = JitterPlan.stack(plans)
    assert st.top.shape == (3, 4)
    per_img = st.at(2).index(torch.tensor([0, 0, 2]))
    assert per_img.h.tolist() == [plans[0].h[2].item(), plans[0].h[2].item(), plans[2].h[2].item()]


# --------------------------------------------------------------------------- RDED / random real


def test_rded_keeps_the_most_confident_crops_and_tiles_them():
    from lpld.core.rded import rded_class_images

    model = tiny_teacher()
    g = torch.Generator().manual_seed(11)
    real = torch.randn(12, 3, 8, 8, generator=g)
    # full-image "crops", one per image: selection must equal ranking the images by log p(class)
    imgs, scores = rded_class_images(
        model, real, cls=2, ipc=3, seed=0, factor=1, crops_per_image=1, crop_scale=(1.0, 1.0), style="lpld"
    )
    with torch.no_grad():
        ref_scores = F.log_softmax(model(real), 1)[:, 2]
    top = torch.argsort(ref_scores, descending=True)[:3]
    assert torch.allclose(imgs, real[top], atol=1e-5)
    assert torch.allclose(scores, ref_scores[top], atol=1e-5)
    # factor 2: each image is a 2x2 mosaic of half-resolution patches, best patch top-left of image 0
    imgs2, _ = rded_class_images(
        model, real, cls=2, ipc=2, seed=0, factor=2, crops_per_image=1, crop_scale=(1.0, 1.0), style="lpld"
    )
    best = F.interpolate(real[top[:1]], size=(4, 4), mode="bilinear", antialias=True, align_corners=False)
    assert imgs2.shape == (2, 3, 8, 8) and torch.allclose(imgs2[0, :, :4, :4], best[0], atol=1e-5)
    with pytest.raises(ValueError, match="candidate"):
        rded_class_images(model, real[:5], cls=2, ipc=2, seed=0, factor=2)


def test_random_real_indices_are_seeded_per_class():
    from lpld.core.rded import random_real_indices

    targets = [i % 4 for i in range(40)]
    a = random_real_indices(targets, 1, 5, seed=0)
    assert len(set(a.tolist())) == 5 and all(targets[i] == 1 for i in a.tolist())
    assert torch.equal(a, random_real_indices(targets, 1, 5, seed=0))
    assert not torch.equal(a, random_real_indices(targets, 1, 5, seed=1))
    with pytest.raises(ValueError, match="fewer"):
        random_real_indices(targets, 1, 11, seed=0)
