"""Image grids of distilled datasets (LPLD Fig. 2 / Appendix F style) as uint8 tensors and PNG files.

Layout (same convention as torchvision's ``make_grid``, written independently): image k goes to row
k // ncol, column k % ncol; its top-left pixel is at (pad + row * (H + pad), pad + col * (W + pad)).
Everything stays uint8, which is also what W&B images must be.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from lpld.core.io import atomic_write_bytes


def make_grid_uint8(images: torch.Tensor, ncol: int, padding: int = 2, pad_value: int = 255) -> torch.Tensor:
    """Tile images into one grid image.

    Args:
        images: (N, C, H, W) uint8, N >= 1.
        ncol: images per grid row (the last row may be partly empty = pad_value).
        padding: pixels of pad_value between images and around the border.
        pad_value: 0..255 fill value.

    Returns:
        (C, rows * (H + padding) + padding, ncol * (W + padding) + padding) uint8 grid,
        rows = ceil(N / ncol).
    """
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be a (N, C, H, W) uint8 tensor, got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("cannot make a grid of zero images")
    if ncol < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(f"need ncol >= 1, padding >= 0, 0 <= pad_value <= 255; got {ncol}, {padding}, {pad_value}")
    n, c, h, w = images.shape
    rows = -(-n // ncol)
    grid = torch.full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value, dtype=torch.uint8)
    for k in range(n):
        r, col = divmod(k, ncol)
        y0, x0 = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y0 : y0 + h, x0 : x0 + w] = images[k]
    return grid


def class_rows_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[int],
    per_class: int,
    padding: int = 2,
    pad_value: int = 255,
) -> torch.Tensor:
    """Fig. 2 style grid: one row per class in ``classes``, the class's first ``per_class`` images.

    A class with fewer images leaves its remaining cells at pad_value.

    Args:
        images: (N, C, H, W) uint8. labels: (N,) class of each image.
        classes: class indices, one grid row each, in this order.
        per_class: images (columns) per row.

    Returns:
        (C, len(classes) * (H + padding) + padding, per_class * (W + padding) + padding) uint8 grid.
    """
    if images.ndim != 4 or images.dtype != torch.uint8 or labels.shape != (images.shape[0],):
        raise ValueError("images must be (N, C, H, W) uint8 and labels (N,)")
    if not classes or per_class < 1:
        raise ValueError("need at least one class and per_class >= 1")
    _, c, h, w = images.shape
    # blank cells are whole pad_value images, so they are indistinguishable from padding
    blank = torch.full((c, h, w), pad_value, dtype=torch.uint8)
    cells: list[torch.Tensor] = []
    for cls in classes:
        idx = (labels == int(cls)).nonzero(as_tuple=True)[0][:per_class]
        row = [images[i] for i in idx.tolist()]
        row += [blank] * (per_class - len(row))
        cells.extend(row)
    return make_grid_uint8(torch.stack(cells), ncol=per_class, padding=padding, pad_value=pad_value)


def per_class_grids(
    images: torch.Tensor, labels: torch.Tensor, ncol: int = 10, padding: int = 2, pad_value: int = 255
) -> dict[int, torch.Tensor]:
    """One grid per class holding all of its images, ``ncol`` per row.

    Args:
        images: (N, C, H, W) uint8. labels: (N,).

    Returns:
        {class index: (C, H', W') uint8 grid} for every class present, in ascending class order.
    """
    out: dict[int, torch.Tensor] = {}
    for cls in torch.unique(labels).tolist():
        idx = (labels == cls).nonzero(as_tuple=True)[0]
        out[int(cls)] = make_grid_uint8(images[idx], ncol=min(ncol, idx.numel()), padding=padding, pad_value=pad_value)
    return out


def grid_to_png_bytes(grid: torch.Tensor) -> bytes:
    """Encode a (C, H, W) uint8 grid (C = 1 or 3) as lossless PNG bytes."""
    if grid.ndim != 3 or grid.dtype != torch.uint8 or grid.shape[0] not in (1, 3):
        raise ValueError(f"grid must be (1|3, H, W) uint8, got {grid.dtype} {tuple(grid.shape)}")
    arr = grid.permute(1, 2, 0).contiguous().numpy()
    # uint8 (H, W) -> mode L, uint8 (H, W, 3) -> RGB (inferred; the mode= argument is deprecated)
    img = Image.fromarray(arr[:, :, 0]) if arr.shape[2] == 1 else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_grid_png(grid: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a (C, H, W) uint8 grid to ``path`` as PNG, atomically."""
    atomic_write_bytes(path, grid_to_png_bytes(grid))


def read_png_uint8(path: str | os.PathLike) -> torch.Tensor:
    """Read a PNG back as a (C, H, W) uint8 tensor (C = 1 for grayscale, 3 for RGB)."""
    with Image.open(path) as img:
        arr = np.asarray(img.convert("L") if img.mode in ("L", "I", "1") else img.convert("RGB"))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
