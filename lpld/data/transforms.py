"""Image transforms built from a dataset config.

The same pipeline accepts PIL images (file-backed datasets) and uint8 tensors (C, H, W)
(in-memory datasets): torchvision's v2 transforms treat both as images, so geometric
augmentation runs on uint8 before the single float conversion + normalisation at the end.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2

from lpld.data.config import cfg_get, cfg_require
from lpld.data.errors import DatasetError

# images at most this size train with pad-and-crop (CIFAR-style); larger ones with RandomResizedCrop.
SMALL_IMAGE_MAX = 32
TRAIN_AUGS = ("pad_crop_flip", "rrc_flip", "none")


def normalize_params(ds_cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the dataset config, each of length ``channels``."""
    channels = int(cfg_require(ds_cfg, "channels"))
    mean = tuple(float(m) for m in cfg_require(ds_cfg, "mean"))
    std = tuple(float(s) for s in cfg_require(ds_cfg, "std"))
    if len(mean) != channels or len(std) != channels:
        raise DatasetError(
            f"dataset.mean/std have {len(mean)}/{len(std)} entries but dataset.channels={channels}; "
            "give one value per channel"
        )
    if min(std) <= 0:
        raise DatasetError(f"dataset.std must be positive, got {list(std)}")
    return mean, std


def _to_float_normalized(ds_cfg: Any) -> list[v2.Transform]:
    mean, std = normalize_params(ds_cfg)
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def eval_transform(ds_cfg: Any) -> v2.Compose:
    """Deterministic transform: resize (shorter side) + center-crop to ``image_size``, to float, normalize.

    The resize target is ``image_size / eval_crop_ratio`` (0.875 gives the usual 256 -> 224 for
    ImageNet; 1.0, the default, keeps the whole image). Images already at the target size pass
    through the resize untouched.

    Returns:
        a callable mapping a PIL image or uint8 tensor (C, H, W) to float32 (C, image_size, image_size).
    """
    size = int(cfg_require(ds_cfg, "image_size"))
    ratio = float(cfg_get(ds_cfg, "eval_crop_ratio", 1.0))
    if not 0 < ratio <= 1:
        raise DatasetError(f"dataset.eval_crop_ratio must be in (0, 1], got {ratio}")
    resize = int(round(size / ratio))
    return v2.Compose(
        [v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(size), *_to_float_normalized(ds_cfg)]
    )


def train_transform(ds_cfg: Any) -> v2.Compose:
    """Teacher-training augmentation (``train_aug``, default by image size).

    - ``pad_crop_flip`` (default for images <= 32 px): random crop of ``image_size`` from the image
      zero-padded by ``crop_padding`` (default 4) pixels, then a horizontal flip with p=0.5.
    - ``rrc_flip`` (default for larger images): RandomResizedCrop(image_size, scale=``rrc_scale``,
      default (0.08, 1)) then a horizontal flip with p=0.5.
    - ``none``: the eval transform.
    ``hflip: false`` disables the flip. Random draws come from torch's global RNG (seeded per
    DataLoader worker by the loader's generator).
    """
    size = int(cfg_require(ds_cfg, "image_size"))
    default = "pad_crop_flip" if size <= SMALL_IMAGE_MAX else "rrc_flip"
    aug = str(cfg_get(ds_cfg, "train_aug", default))
    if aug not in TRAIN_AUGS:
        raise DatasetError(f"dataset.train_aug={aug!r} is not one of {TRAIN_AUGS}")
    if aug == "none":
        return eval_transform(ds_cfg)
    flip = [v2.RandomHorizontalFlip(0.5)] if bool(cfg_get(ds_cfg, "hflip", True)) else []
    if aug == "pad_crop_flip":
        pad = int(cfg_get(ds_cfg, "crop_padding", 4))
        geo = [v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.RandomCrop(size, padding=pad)]
    else:
        scale = tuple(float(s) for s in cfg_get(ds_cfg, "rrc_scale", (0.08, 1.0)))
        geo = [v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    return v2.Compose([v2.ToImage(), *geo, *flip, *_to_float_normalized(ds_cfg)])


def rrc_flip_transform(ds_cfg: Any) -> v2.Compose:
    """RandomResizedCrop(image_size, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip, whatever ``train_aug`` is.

    The images the official class-wise statistics pass sees (``ClassificationPresetTrain`` /
    tiny_forward ``forward_once.py``), used by ``stage=stats`` in ``official`` mode on every dataset.
    """
    size = int(cfg_require(ds_cfg, "image_size"))
    geo = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(0.5)]
    return v2.Compose([v2.ToImage(), *geo, *_to_float_normalized(ds_cfg)])


def _stats_like(x: torch.Tensor, ds_cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = normalize_params(ds_cfg)
    if x.dim() < 3 or x.shape[-3] != len(mean):
        raise DatasetError(f"expected (..., {len(mean)}, H, W) images, got shape {tuple(x.shape)}")
    shape = (len(mean), 1, 1)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    as_t = lambda v: torch.tensor(v, dtype=dtype, device=x.device).view(shape)
    return as_t(mean), as_t(std)


def normalize(x: torch.Tensor, ds_cfg: Any) -> torch.Tensor:
    """Map pixels in [0, 1] to model inputs: (x - mean) / std.

    Args:
        x: (B, C, H, W) or (C, H, W) float images in [0, 1].
    """
    mean, std = _stats_like(x, ds_cfg)
    return (x - mean) / std


def denormalize(x: torch.Tensor, ds_cfg: Any) -> torch.Tensor:
    """Inverse of :func:`normalize`: model inputs back to pixels, x * std + mean (not clamped).

    Args:
        x: (B, C, H, W) or (C, H, W) normalized images.
    """
    mean, std = _stats_like(x, ds_cfg)
    return x * std + mean
