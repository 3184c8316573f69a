"""Optimisation-free baselines: RDED patch stitching and random real images.

RDED (Sun et al., CVPR 2024): take random crops of real images of a class, score each crop
by the teacher's confidence in the true class (the negative cross-entropy), keep the most
confident ones, and stitch ``factor x factor`` of them (each downsampled by ``factor``) into
one distilled image. "A label is worth a thousand images": IPC random real images per class.

Two styles (``recover.rded.style``):

* ``official`` (default; LINs-lab/RDED ``synthesize/utils.py``): square crops
  (RandomResizedCrop to ``size / factor``, ratio (1, 1)), each scored as a half-size patch
  zero-padded (centred) to full size (``pad``); the best crop of each real image represents it;
  the ``n = ipc * factor^2`` best are tiled rank-interleaved (``mix_images``): position k
  (row-major) of image r holds the (k * ipc + r)-th best patch.
* ``lpld`` (lpld's earlier variant): RandomResizedCrop boxes with aspect 3:4-4:3, scored at full
  resolution, tiled consecutively (image r holds the patches r*f^2 .. (r+1)*f^2 - 1).

Every draw comes from a generator keyed by (seed, method, class), so a class's output does
not depend on which other classes a process handles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lpld.core.jitter import DEFAULT_RATIO, JitterPlan, apply_jitter, draw_jitter_plan, make_generator

RDED_STYLES = ("official", "lpld")


def class_indices(targets: Sequence[int], cls: int) -> torch.Tensor:
    """Dataset indices of class ``cls`` in ascending order: (n_c,) int64."""
    t = torch.as_tensor(list(targets), dtype=torch.long)
    return torch.nonzero(t == int(cls)).flatten()


def sample_class_indices(targets: Sequence[int], cls: int, n: int, seed: int, stream: str) -> torch.Tensor:
    """``n`` distinct dataset indices of class ``cls``, drawn with the class's own generator.

    Raises:
        ValueError: the class has fewer than ``n`` images.
    """
    idx = class_indices(targets, cls)
    if len(idx) < n:
        raise ValueError(f"class {cls} has {len(idx)} real images, fewer than the {n} requested ({stream})")
    perm = torch.randperm(len(idx), generator=make_generator(seed, stream, cls))
    return idx[perm[:n]]


def random_real_indices(targets: Sequence[int], cls: int, ipc: int, seed: int) -> torch.Tensor:
    """The random-real baseline: ``ipc`` real images of class ``cls`` (indices (ipc,))."""
    return sample_class_indices(targets, cls, ipc, seed, "random_real")


@torch.no_grad()
def rded_class_images(
    model: nn.Module,
    real: torch.Tensor,
    cls: int,
    ipc: int,
    seed: int,
    factor: int = 2,
    crops_per_image: int = 5,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    style: str = "official",
) -> tuple[torch.Tensor, torch.Tensor]:
    """RDED images of one class.

    Args:
        model: the teacher (eval mode, used for scoring only).
        real: (M, C, H, W) candidate real images of the class, normalised.
        cls: the class id (target of the confidence score; keys the generator).
        ipc: images to produce.
        seed: run seed.
        factor: patches per side; each image holds ``factor**2`` patches.
        crops_per_image: random crops scored per candidate image; the best one represents it.
        crop_scale: RandomResizedCrop area range of the crops.
        batch_size: scoring batch size.
        device: where to score.
        style: ``official`` (RDED's code) or ``lpld`` (see the module docstring).

    Returns:
        images (ipc, C, H, W) normalised; scores (ipc * factor**2,) of the selected patches, best first.

    Raises:
        ValueError: fewer candidates than ``ipc * factor**2`` or H, W not divisible by ``factor``.
    """
    M, C, H, W = real.shape
    need = ipc * factor * factor
    if style not in RDED_STYLES:
        raise ValueError(f"unknown RDED style {style!r}; choose one of {RDED_STYLES}")
    if M < need:
        raise ValueError(f"RDED needs >= {need} candidate images for class {cls} (ipc x factor^2), got {M}")
    if H % factor or W % factor:
        raise ValueError(f"image size {H}x{W} is not divisible by rded.factor={factor}")
    was_training = model.training
    model.eval()
    g = make_generator(seed, "rded_crops", cls)
    official = style == "official"
    ratio = (1.0, 1.0) if official else DEFAULT_RATIO
    plan = draw_jitter_plan(g, M * crops_per_image, H, W, crop_scale[0], crop_scale[1], ratio, flip=False, roll=0)
    src = torch.arange(M).repeat_interleave(crops_per_image)
    ph, pw = H // factor, W // factor
    scores = torch.empty(M * crops_per_image)
    for s in range(0, len(src), batch_size):
        sl = slice(s, s + batch_size)
        if official:  # half-size square patches, zero-padded to full size for scoring (RDED's `pad`)
            patch = half_size_patches(real, src[sl], plan, sl, ph, pw).to(device)
            crops = center_pad(patch, H, W)
        else:
            sub = plan.index(torch.arange(len(src))[sl]).to(device)
            crops = apply_jitter(real[src[sl]].to(device), sub)
        logp = F.log_softmax(model(crops).float(), dim=1)[:, cls]
        scores[sl] = logp.cpu()
    model.train(was_training)
    per_img = scores.view(M, crops_per_image)
    best_val, best_crop = per_img.max(dim=1)  # the most confident crop of each real image
    order = torch.argsort(best_val, descending=True, stable=True)[:need]
    flat = order * crops_per_image + best_crop[order]
    if official:
        patches = half_size_patches(real, order, plan, flat, ph, pw)  # (need, C, H/f, W/f), best first
        # rank-interleaved tiling: position k of image r holds patch k * ipc + r
        p = patches.view(factor, factor, ipc, C, ph, pw).permute(2, 3, 0, 4, 1, 5)
    else:
        sel = plan.index(flat)
        patches = apply_jitter(real[order], sel)  # (need, C, H, W) full-resolution crops
        patches = F.interpolate(patches, size=(ph, pw), mode="bilinear", antialias=True, align_corners=False)
        # consecutive tiling: image k holds patches k*f^2 .. (k+1)*f^2 - 1, row-major
        p = patches.view(ipc, factor, factor, C, ph, pw).permute(0, 3, 1, 4, 2, 5)
    images = p.reshape(ipc, C, H, W)
    return images.cpu(), best_val[order]


def half_size_patches(
    real: torch.Tensor, src: torch.Tensor, plan: JitterPlan, rows: slice | torch.Tensor, ph: int, pw: int
) -> torch.Tensor:
    """Crops ``plan[rows]`` of images ``real[src]``, each resized to (ph, pw) (RandomResizedCrop to a patch).

    Bilinear with anti-aliasing, as torchvision's ``RandomResizedCrop(size, antialias=True)``.

    Returns:
        (len(src), C, ph, pw) patches.
    """
    top, left, h, w = (getattr(plan, f)[rows].tolist() for f in ("top", "left", "h", "w"))
    out = []
    for i, t, lf, hh, ww in zip(src.tolist(), top, left, h, w):
        crop = real[i : i + 1, :, t : t + hh, lf : lf + ww]
        out.append(F.interpolate(crop, size=(ph, pw), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(out)


def center_pad(patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad (B, C, h, w) patches to (B, C, height, width), centred (extra row/column at the bottom/right)."""
    dv, dh = height - patches.shape[-2], width - patches.shape[-1]
    return F.pad(patches, (dh // 2, dh - dh // 2, dv // 2, dv - dv // 2))
