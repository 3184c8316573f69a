"""What a run shows while it works: rich progress bars (on unless ``LPLD_NO_RICH=1``) and image grids in W&B."""

from __future__ import annotations

import os
from typing import Any

import torch


def progress_enabled() -> bool:
    """Rich progress bars are wanted (``LPLD_NO_RICH=1`` turns them off, e.g. in tests and batch jobs)."""
    return os.environ.get("LPLD_NO_RICH", "0") != "1"


def log_images_uint8(
    logger: Any, key: str, images: torch.Tensor, step: int | None = None, caption: str | None = None
) -> None:
    """Log a grid of images to W&B. ``images``: uint8 (B, C, H, W) (float images save black in wandb 0.31).

    Any logger other than a WandbLogger (or none) ignores the call.
    """
    if logger is None or images.numel() == 0:
        return
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    import torchvision

    assert images.dtype == torch.uint8, "log images as uint8"
    grid = torchvision.utils.make_grid(images, nrow=min(10, len(images)), padding=1)  # uint8 (C, H, W)
    arr = grid.permute(1, 2, 0).cpu().numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    kw = {"caption": [caption]} if caption else {}  # WandbLogger.log_image takes len(caption)
    logger.log_image(key=key, images=[arr], step=step, **kw)
