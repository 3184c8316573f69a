"""The recover optimisation loop: synthesise images from noise by Adam on Eq. 6 (or Eq. 3).

Vocabulary:

* **segment**: images whose BN statistics are matched together (one LPLD class; one SRe2L
  batch slot). Each segment draws its own augmentation per step from its own generator.
* **unit**: the smallest set of classes that must be optimised together because segments
  couple them. LPLD / ``lpld_c``: one class. SRe2L / CDA: a group of ``group_classes``
  consecutive classes (absolute class ids ``k*G .. k*G+G-1``), whose IPC images form IPC
  segments "image j of every class of the group" (SRe2L's batch of one image per class).
* **device batch**: several units concatenated. Because every loss term is per segment and
  the optimised scalar is their sum, and Adam is element-wise, an image's trajectory does
  not depend on which other units share its device batch: K units in one batch produce the
  images of K separate runs (up to floating-point summation order in the convolutions).

Randomness is keyed, never sequential: the initial noise of class c comes from a generator
seeded with (seed, "init", c) and the augmentation of a segment from (seed, "jitter", key),
so results are independent of grouping, of the class range a process handles and of DDP
sharding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lpld.core.bn_hooks import BNInputHooks, bn_layers
from lpld.core.jitter import JitterPlan, apply_jitter, apply_roll, cda_scale_min, draw_jitter_plan, make_generator
from lpld.core.recover_loss import LossWeights, SegmentLosses, recover_losses, segment_counts

BATCHING = ("class", "slot")


@dataclass(frozen=True)
class Segment:
    """Images matched together: ``images`` index the unit's images (class-major: pos * ipc + j).

    ``stats_class`` is the class whose recorded statistics are the BN target (class-wise
    supervision), or None for the teacher's global running statistics.
    """

    key: tuple[int, ...]
    images: tuple[int, ...]
    stats_class: int | None


@dataclass(frozen=True)
class Unit:
    """Classes optimised together; their images are ``ipc`` per class, class-major."""

    classes: tuple[int, ...]
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class SynthesisConfig:
    """Everything the loop needs besides the teacher and the statistics.

    ``pixel_min/max``: per-channel bounds in normalised space (the values that map to 0 and 1
    after de-normalisation); images are clipped to them after every step.
    """

    iterations: int
    lr: float
    ipc: int
    channels: int
    image_size: int
    weights: LossWeights
    pixel_min: tuple[float, ...]
    pixel_max: tuple[float, ...]
    seed: int = 0
    rrc_scale_min: float = 0.08
    rrc_scale_max: float = 1.0
    flip: bool = True
    roll: int = 0
    crop: bool = True  # False: roll only, no RandomResizedCrop and no flip (SRe2L recover_cifar.py)
    cda_schedule: str | None = None
    cda_milestone: float = 0.0
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-8


@dataclass
class UnitResult:
    """The synthesised images of one unit and its final losses."""

    classes: tuple[int, ...]
    images: torch.Tensor  # (n_classes * ipc, C, H, W) float32, normalised space, on CPU
    labels: torch.Tensor  # (n,) int64
    class_loss: dict[int, dict[str, float]] = field(default_factory=dict)


def plan_units(
    classes: Sequence[int], ipc: int, batching: str, classwise_stats: bool, group_classes: int = 1
) -> list[Unit]:
    """Split ``classes`` into units and segments for a method.

    Args:
        classes: class ids to synthesise (ascending).
        ipc: images per class.
        batching: ``class`` (LPLD: one segment = the IPC images of one class) or ``slot``
            (SRe2L: one segment = image j of every class in a group of ``group_classes``).
        classwise_stats: match class-wise statistics (LPLD) instead of global ones.
        group_classes: G for ``slot`` batching; groups are ``c // G``.

    Returns:
        Units in ascending class order.
    """
    if ipc < 1:
        raise ValueError(f"ipc must be >= 1, got {ipc}")
    if batching not in BATCHING:
        raise ValueError(f"unknown batching '{batching}'; choose one of {BATCHING}")
    units: list[Unit] = []
    if batching == "class":
        for c in classes:
            seg = Segment(key=(int(c),), images=tuple(range(ipc)), stats_class=int(c) if classwise_stats else None)
            units.append(Unit(classes=(int(c),), segments=(seg,)))
        return units
    if classwise_stats:
        raise ValueError("slot batching mixes classes in a segment, so it can only match global statistics")
    if group_classes < 1:
        raise ValueError(f"group_classes must be >= 1, got {group_classes}")
    groups: dict[int, list[int]] = {}
    for c in classes:
        groups.setdefault(int(c) // group_classes, []).append(int(c))
    for g, cls in sorted(groups.items()):
        segs = tuple(
            Segment(key=(g, j), images=tuple(p * ipc + j for p in range(len(cls))), stats_class=None)
            for j in range(ipc)
        )
        units.append(Unit(classes=tuple(cls), segments=segs))
    return units


def cosine_lr(base_lr: float, t: int, iterations: int) -> float:
    """SRe2L's cosine schedule without warm-up: lr_t = lr * (1 + cos(pi t / T)) / 2."""
    return 0.5 * (1.0 + math.cos(math.pi * t / iterations)) * base_lr


def initial_images(cls: int, cfg: SynthesisConfig) -> torch.Tensor:
    """Gaussian-noise initialisation of class ``cls``: (ipc, C, H, W), drawn on CPU from its own generator."""
    g = make_generator(cfg.seed, "init", cls)
    return torch.randn((cfg.ipc, cfg.channels, cfg.image_size, cfg.image_size), generator=g)


def segment_plan(seg: Segment, cfg: SynthesisConfig) -> JitterPlan:
    """All augmentation draws of one segment (T,)."""
    if cfg.cda_schedule:
        smin: float | torch.Tensor = cda_scale_min(
            cfg.iterations, cfg.cda_schedule, cfg.cda_milestone, start=cfg.rrc_scale_max, end=cfg.rrc_scale_min
        )
    else:
        smin = cfg.rrc_scale_min
    g, size = make_generator(cfg.seed, "jitter", *seg.key), cfg.image_size
    return draw_jitter_plan(
        g, cfg.iterations, size, size, smin, cfg.rrc_scale_max, flip=cfg.flip, roll=cfg.roll, crop=cfg.crop
    )


def global_bn_targets(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Running mean / variance of every BN layer (the SRe2L targets, Eq. 2): lists of (C_l,)."""
    layers = bn_layers(model)
    return [m.running_mean.detach() for _, m in layers], [m.running_var.detach() for _, m in layers]


def synthesize(
    model: nn.Module,
    units: Sequence[Unit],
    cfg: SynthesisConfig,
    class_mean: Sequence[torch.Tensor] | None = None,
    class_var: Sequence[torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, SegmentLosses], None] | None = None,
) -> list[UnitResult]:
    """Optimise the images of ``units`` together in one device batch.

    Args:
        model: the teacher (its mode is set to eval; its parameters get no gradient).
        units: units to synthesise in this batch (see :func:`plan_units`).
        cfg: loop settings.
        class_mean, class_var: per BN layer (num_classes, C_l) class-wise statistics; needed
            when a segment has ``stats_class``.
        device: where to run.
        on_step: called after each step's loss with (t, detached per-segment losses).

    Returns:
        One UnitResult per unit (images on CPU, normalised space, clipped).
    """
    device = torch.device(device)
    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        return _synthesize(model, units, cfg, class_mean, class_var, device, on_step)
    finally:
        for p, f in zip(model.parameters(), grad_flags):
            p.requires_grad_(f)
        model.train(was_training)


@dataclass
class _Layout:
    """The device batch of :func:`synthesize`: every unit's images, class-major, one segment id per image.

    Attributes:
        x0: per class, its (ipc, C, H, W) initial images, in batch order.
        labels: (n,) class of every image.
        seg: (n,) segment id of every image (host tensor).
        segments: the segments, indexed by id.
        offsets: first image of each unit.
    """

    x0: list[torch.Tensor]
    labels: list[int]
    seg: torch.Tensor
    segments: list[Segment]
    offsets: list[int]


def _layout(units: Sequence[Unit], cfg: SynthesisConfig) -> _Layout:
    """Lay out the device batch; raises ValueError unless each unit's segments partition its images."""
    ipc = cfg.ipc
    x0, labels, seg_ids, segments, offsets = [], [], [], [], []
    n = 0
    for u in units:
        offsets.append(n)
        for c in u.classes:
            x0.append(initial_images(c, cfg))
            labels += [c] * ipc
        for s in u.segments:
            seg_ids.append((len(segments), [n + i for i in s.images]))
            segments.append(s)
        n += len(u.classes) * ipc
    seg = torch.full((n,), -1, dtype=torch.long)
    hits = torch.zeros(n, dtype=torch.long)
    for sid, idx in seg_ids:
        seg[idx] = sid
        hits[idx] += 1
    if not bool((hits == 1).all()):
        raise ValueError("every image must belong to exactly one segment (a unit's segments must partition it)")
    return _Layout(x0, labels, seg, segments, offsets)


def _bn_targets(
    model: nn.Module,
    segments: Sequence[Segment],
    class_mean: Sequence[torch.Tensor] | None,
    class_var: Sequence[torch.Tensor] | None,
    device: torch.device,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """BN targets per layer l: (S, C_l) means and variances, a segment's row being its class's statistics
    (class-wise supervision, Eq. 3) or the teacher's running statistics (Eq. 2)."""
    g_mean, g_var = global_bn_targets(model)
    t_mean, t_var = [], []
    for li in range(len(g_mean)):
        rows_m, rows_v = [], []
        for s in segments:
            if s.stats_class is None:
                rows_m.append(g_mean[li].float())
                rows_v.append(g_var[li].float())
            else:
                if class_mean is None or class_var is None:
                    raise ValueError("class-wise supervision needs class_mean/class_var (the stats artifact)")
                rows_m.append(class_mean[li][s.stats_class].float())
                rows_v.append(class_var[li][s.stats_class].float())
        t_mean.append(torch.stack([r.to(device) for r in rows_m]))
        t_var.append(torch.stack([r.to(device) for r in rows_v]))
    return t_mean, t_var


def _unit_results(
    units: Sequence[Unit], lay: _Layout, images: torch.Tensor, last: SegmentLosses | None, ipc: int
) -> list[UnitResult]:
    """Cut the optimised batch (CPU) back into units, with each class's final losses."""
    results: list[UnitResult] = []
    sid = 0
    for u, off in zip(units, lay.offsets):
        k = len(u.classes) * ipc
        res = UnitResult(
            classes=u.classes, images=images[off : off + k].clone(), labels=torch.tensor(lay.labels[off : off + k])
        )
        seg_range = range(sid, sid + len(u.segments))
        sid += len(u.segments)
        for p, c in enumerate(u.classes):
            mine = [s for s in seg_range if any(i // ipc == p for i in lay.segments[s].images)]
            res.class_loss[c] = _mean_losses(last, mine) if last is not None else {}
        results.append(res)
    return results


def _synthesize(model, units, cfg, class_mean, class_var, device, on_step) -> list[UnitResult]:
    """The loop of :func:`synthesize` (model already in eval mode with frozen weights)."""
    lay = _layout(units, cfg)
    S = len(lay.segments)
    # images per segment: counted once on the host (a per-step bincount would sync with the device)
    counts = segment_counts(lay.seg, S).to(device)
    seg = lay.seg.to(device)
    targets = torch.tensor(lay.labels, dtype=torch.long, device=device)
    t_mean, t_var = _bn_targets(model, lay.segments, class_mean, class_var, device)

    plans = JitterPlan.stack([segment_plan(s, cfg) for s in lay.segments]).to(device)
    lo = torch.tensor(cfg.pixel_min, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    hi = torch.tensor(cfg.pixel_max, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    x = torch.cat(lay.x0).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    last: SegmentLosses | None = None
    with BNInputHooks(model) as hooks:
        for t in range(cfg.iterations):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.lr, t, cfg.iterations)
            step_plan = plans.at(t).index(seg)  # per-image draws (B,)
            x_aug = apply_jitter(x, step_plan) if cfg.crop else apply_roll(x, step_plan)
            logits = model(x_aug)
            losses = recover_losses(
                logits, targets, x_aug, hooks.inputs, seg, S, t_mean, t_var, cfg.weights, counts=counts
            )
            opt.zero_grad(set_to_none=True)
            losses.objective().backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))  # keep pixels de-normalisable to [0, 1]
            last = SegmentLosses(*(v.detach() for v in (losses.total, losses.ce, losses.bn, losses.tv, losses.l2)))
            if on_step is not None:
                on_step(t, last)
    return _unit_results(units, lay, x.detach().cpu(), last, cfg.ipc)


def _mean_losses(losses: SegmentLosses, idx: list[int]) -> dict[str, float]:
    """Average of the final per-segment terms over the segments holding a class's images."""
    sel = torch.tensor(idx, dtype=torch.long, device=losses.total.device)
    return {k: float(getattr(losses, k)[sel].mean()) for k in ("total", "ce", "bn", "tv", "l2")}
