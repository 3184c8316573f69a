"""Per-step augmentation of the images being synthesised: RandomResizedCrop + flip + roll.

The SRe2L-family recover loop applies, at every iteration, one RandomResizedCrop (output size
= input size) and one horizontal flip to the whole batch, then rolls it by a random offset
("jitter"). Here every *segment* (the images whose BN statistics are matched together) gets its
own draw from its own ``torch.Generator``, so the draws do not depend on which other segments
share the device batch. All draws of a segment for all iterations are made up front
(:func:`draw_jitter_plan`), and one ``grid_sample`` applies crop, flip and roll to every image
of the device batch at once (:func:`jitter_grid`, :func:`apply_jitter`).

Crop semantics are those of ``torchvision``'s tensor ``resized_crop`` (slice, then bilinear
resize with ``align_corners=False``): a crop is never larger than the image, so the resize only
upsamples and the anti-aliasing filter has no effect. :func:`reference_jitter` is the slice +
interpolate + flip + roll reference the tests compare against.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# torchvision RandomResizedCrop defaults
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# RandomResizedCrop tries this many (area, aspect) samples before falling back to a centre crop
_RRC_TRIES = 10


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple (run seed, stream name, class/segment ids).

    Hashing (rather than ``seed + class``) keeps streams of nearby classes and different
    purposes (init noise, jitter) statistically unrelated.
    """
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass(frozen=True)
class JitterPlan:
    """All augmentation draws of one segment, one entry per iteration (each tensor (T,) int64/bool).

    ``top, left, h, w``: the crop box in pixels; ``flip``: horizontal flip after the crop;
    ``dy, dx``: the roll (circular shift) applied last, as ``torch.roll(x, (dy, dx), (2, 3))``.
    """

    top: torch.Tensor
    left: torch.Tensor
    h: torch.Tensor
    w: torch.Tensor
    flip: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor

    @staticmethod
    def stack(plans: list[JitterPlan]) -> JitterPlan:
        """Stack S plans of T iterations into one plan with tensors (S, T)."""
        return JitterPlan(*(torch.stack([getattr(p, f) for p in plans]) for f in _FIELDS))

    def at(self, t: int) -> JitterPlan:
        """Iteration ``t`` of a stacked plan: tensors (S,)."""
        return JitterPlan(*(getattr(self, f)[:, t] for f in _FIELDS))

    def index(self, idx: torch.Tensor) -> JitterPlan:
        """Rows ``idx`` of a per-segment plan (S,) -> per-image plan (B,)."""
        return JitterPlan(*(getattr(self, f)[idx] for f in _FIELDS))

    def to(self, device: torch.device | str) -> JitterPlan:
        return JitterPlan(*(getattr(self, f).to(device) for f in _FIELDS))


_FIELDS = ("top", "left", "h", "w", "flip", "dy", "dx")


def cda_scale_min(
    iterations: int, schedule: str, milestone: float, start: float = 1.0, end: float = 0.08
) -> torch.Tensor:
    """CDA's curriculum on RandomResizedCrop's lower scale bound, per iteration.

    Before ``milestone * iterations`` the bound goes from ``start`` (whole image, easy) towards
    ``end``: ``step`` holds ``start``, ``linear`` and ``cosine`` anneal; afterwards it is ``end``.

    Returns:
        (T,) float64 lower bounds.
    """
    if schedule not in ("step", "linear", "cosine"):
        raise ValueError(f"unknown CDA schedule '{schedule}'; choose step, linear or cosine")
    if not 0.0 <= milestone <= 1.0:
        raise ValueError(f"CDA milestone must be in [0, 1], got {milestone}")
    t = torch.arange(iterations, dtype=torch.float64)
    span = milestone * iterations
    out = torch.full((iterations,), float(end), dtype=torch.float64)
    if span <= 0:
        return out
    before = t < span
    frac = t / span
    if schedule == "step":
        val = torch.full_like(t, float(start))
    elif schedule == "linear":
        val = end + (start - end) * (1.0 - frac)
    else:
        val = end + (start - end) * 0.5 * (1.0 + torch.cos(math.pi * frac))
    out[before] = val[before]
    return out


def draw_jitter_plan(
    generator: torch.Generator,
    iterations: int,
    height: int,
    width: int,
    scale_min: float | torch.Tensor = 0.08,
    scale_max: float = 1.0,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    flip: bool = True,
    roll: int = 0,
    crop: bool = True,
) -> JitterPlan:
    """Draw every augmentation of one segment for ``iterations`` steps.

    The crop follows RandomResizedCrop: up to 10 tries of (area fraction ~ U(scale_min, scale_max),
    log aspect ~ U(log r0, log r1)); the first box that fits is used, else the centre crop with the
    aspect clamped to ``ratio``. A fixed number of values is drawn per iteration whatever is
    accepted, so the stream is a pure function of the generator state.

    Args:
        generator: the segment's own generator (see :func:`make_generator`).
        iterations: T.
        height, width: image size (H, W).
        scale_min: lower area bound, a float or (T,) per iteration (CDA curriculum).
        scale_max: upper area bound.
        ratio: aspect-ratio range (w / h).
        flip: draw a horizontal flip with probability 0.5 (else never flip).
        roll: maximum roll in pixels; ``dy, dx`` ~ U{0..roll} (as ``random.randint(0, roll)``).
        crop: draw the RandomResizedCrop box; False = the whole image every step and no flip, i.e. only the
            roll (SRe2L's small-image recover, ``small_dataset/recover_cifar.py``: ``torch.roll`` by
            ``randint(0, jitter)`` and nothing else). The same values are drawn either way.

    Returns:
        JitterPlan with tensors of shape (T,).
    """
    T = int(iterations)
    smin = torch.as_tensor(scale_min, dtype=torch.float64).expand(T)
    area = float(height * width)
    u = torch.rand((T, _RRC_TRIES, 2), generator=generator, dtype=torch.float64)
    pos = torch.rand((T, 2), generator=generator, dtype=torch.float64)
    flip_u = torch.rand((T,), generator=generator, dtype=torch.float64)
    shifts = torch.randint(0, int(roll) + 1, (T, 2), generator=generator)

    target = area * (smin[:, None] + (float(scale_max) - smin[:, None]) * u[..., 0])
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_r0 + (log_r1 - log_r0) * u[..., 1])
    w_try = torch.round(torch.sqrt(target * aspect)).long()
    h_try = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
    first = ok.long().argmax(dim=1)  # index of the first fitting try (0 if none fits)
    any_ok = ok.any(dim=1)
    w = w_try.gather(1, first[:, None])[:, 0]
    h = h_try.gather(1, first[:, None])[:, 0]

    # centre-crop fallback of RandomResizedCrop
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    # top ~ U{0..H-h}, left ~ U{0..W-w}; the fallback is centred
    top = torch.floor(pos[:, 0] * (height - h + 1).double()).long().clamp_max(height - h)
    left = torch.floor(pos[:, 1] * (width - w + 1).double()).long().clamp_max(width - w)
    top = torch.where(any_ok, top, (height - h) // 2)
    left = torch.where(any_ok, left, (width - w) // 2)
    do_flip = (flip_u < 0.5) if flip and crop else torch.zeros(T, dtype=torch.bool)
    if not crop:  # roll only: the box is the whole image (no resize), drawn values above left unused
        top, left = torch.zeros_like(top), torch.zeros_like(left)
        h, w = torch.full_like(h, height), torch.full_like(w, width)
    return JitterPlan(top=top, left=left, h=h, w=w, flip=do_flip, dy=shifts[:, 0], dx=shifts[:, 1])


def _axis_coords(start: torch.Tensor, length: torch.Tensor, size: int, shift: torch.Tensor, flip: torch.Tensor | None):
    """Normalised sampling coordinate per output pixel along one axis: (B, size).

    Output pixel i reads the rolled position (i - shift) mod size, optionally mirrored, of the
    resized crop, which samples the source at ``start + (k + 0.5) * length / size - 0.5``
    (``align_corners=False``) clamped to the crop box (as slicing before the resize does).
    """
    dev = start.device
    i = torch.arange(size, device=dev)
    k = (i[None, :] - shift[:, None]) % size
    if flip is not None:
        k = torch.where(flip[:, None], size - 1 - k, k)
    lf = length.to(torch.float32)[:, None]
    st = start.to(torch.float32)[:, None]
    src = st + (k.to(torch.float32) + 0.5) * (lf / size) - 0.5
    src = torch.minimum(torch.maximum(src, st), st + lf - 1.0)
    return (2.0 * src + 1.0) / size - 1.0


def jitter_grid(plan: JitterPlan, height: int, width: int) -> torch.Tensor:
    """Sampling grid for ``F.grid_sample`` that crops, resizes, flips and rolls each image.

    Args:
        plan: per-image draws, tensors (B,).
        height, width: image size.

    Returns:
        grid: (B, H, W, 2) float32 in ``align_corners=False`` normalised coordinates.
    """
    gy = _axis_coords(plan.top, plan.h, height, plan.dy, None)  # (B, H)
    gx = _axis_coords(plan.left, plan.w, width, plan.dx, plan.flip)  # (B, W)
    B = gy.shape[0]
    return torch.stack((gx[:, None, :].expand(B, height, width), gy[:, :, None].expand(B, height, width)), dim=-1)


def apply_jitter(x: torch.Tensor, plan: JitterPlan) -> torch.Tensor:
    """Augment every image of ``x`` with its own draw (differentiable w.r.t. ``x``).

    Args:
        x: (B, C, H, W) images.
        plan: per-image draws, tensors (B,) on ``x.device``.

    Returns:
        (B, C, H, W) augmented images.
    """
    H, W = x.shape[-2:]
    grid = jitter_grid(plan, H, W).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def apply_roll(x: torch.Tensor, plan: JitterPlan) -> torch.Tensor:
    """Roll every image of ``x`` by its own ``(dy, dx)`` and nothing else: the crop-off path (``crop=False``).

    Exact (an index gather, no interpolation): image b equals ``torch.roll(x[b], (dy[b], dx[b]), (1, 2))``.

    Args:
        x: (B, C, H, W) images.
        plan: per-image draws, tensors (B,) on ``x.device``; only ``dy`` and ``dx`` are read.

    Returns:
        (B, C, H, W) rolled images (differentiable w.r.t. ``x``).
    """
    B, C, H, W = x.shape
    rows = (torch.arange(H, device=x.device)[None, :] - plan.dy[:, None]) % H  # (B, H): source row of row i
    cols = (torch.arange(W, device=x.device)[None, :] - plan.dx[:, None]) % W  # (B, W)
    x = x.gather(2, rows[:, None, :, None].expand(B, C, H, W))
    return x.gather(3, cols[:, None, None, :].expand(B, C, H, W))


def reference_jitter(x: torch.Tensor, plan: JitterPlan) -> torch.Tensor:
    """Slice + bilinear resize + flip + roll, one image at a time (the reference for tests)."""
    H, W = x.shape[-2:]
    outs = []
    for b in range(x.shape[0]):
        t, left, h, w = (int(plan.top[b]), int(plan.left[b]), int(plan.h[b]), int(plan.w[b]))
        crop = x[b : b + 1, :, t : t + h, left : left + w]
        y = F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)
        if bool(plan.flip[b]):
            y = y.flip(-1)
        outs.append(torch.roll(y, shifts=(int(plan.dy[b]), int(plan.dx[b])), dims=(2, 3)))
    return torch.cat(outs)
