"""Dataset containers: uint8 images held in memory, or image files decoded per item.

Both yield ``(transform(image), int label)`` and expose ``.targets: list[int]`` and
``.classes: list[str]`` (label i is ``classes[i]``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lpld.data.errors import DatasetError, dataset_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

Transform = Callable[[object], torch.Tensor]


class TensorImageDataset(Dataset):
    """Images decoded once into a uint8 tensor (N, C, H, W); each item is converted on access.

    Keeping uint8 (not float) quarters the memory and lets augmentation run on bytes; the
    transform (see lpld.data.transforms) does the single float conversion + normalisation.
    ``transform=None`` returns the raw uint8 (C, H, W) tensor.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: Sequence[int],
        classes: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DatasetError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(targets) != images.shape[0]:
            raise DatasetError(f"{images.shape[0]} images but {len(targets)} labels")
        self.images = images.contiguous()
        self.targets = [int(t) for t in targets]
        self.classes = [str(c) for c in classes]
        self.transform = transform

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


class FileImageDataset(Dataset):
    """Image files decoded (PIL, converted to ``mode``) on every access; for datasets too large for RAM.

    ``transform=None`` returns the PIL image. ``draft``: the shorter side the transform resizes to (the
    eval transform's ``image_size / eval_crop_ratio``, see ``eval_draft_side``): JPEGs at least twice
    that size are decoded at a reduced DCT scale that keeps both sides >= ``draft`` (``load_image``).
    Only for a resize-then-crop transform; None (default) decodes every file at full size, as the
    official loaders do. Set it as an attribute or argument.
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int],
        classes: Sequence[str],
        mode: str = "RGB",
        transform: Transform | None = None,
        draft: int | None = None,
    ) -> None:
        if len(paths) != len(targets):
            raise DatasetError(f"{len(paths)} files but {len(targets)} labels")
        self.draft = draft
        self.paths = [str(p) for p in paths]
        self.targets = [int(t) for t in targets]
        self.classes = [str(c) for c in classes]
        self.mode = mode
        self.transform = transform

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        d = self.draft
        img = load_image(self.paths[index], self.mode, draft=(d, d) if d else None)
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


def load_image(path: str | Path, mode: str, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode one image file and convert it to ``mode`` ("L" or "RGB").

    ``draft=(w, h)``: let a JPEG decode at 1/2, 1/4 or 1/8 scale (PIL ``Image.draft``: DCT scaling,
    several times faster on ImageNet-sized files) as long as the result stays at least (w, h); other
    formats, and JPEGs less than twice that size, decode exactly as without it.

    A truncated or corrupt file raises a DatasetError naming it. Datasets held in memory decode every
    file when they are built, so a damaged file stops the stage up front; datasets read from disk per
    item (too large for RAM) stop at the first read of that file. Files are never skipped silently
    (a skipped image would shift nothing but would change what a run trains on).
    """
    try:
        with Image.open(path) as im:
            if draft is not None:
                im.draft(None, draft)  # mode None: colour conversion stays convert()'s
            return im.convert(mode)  # convert forces the full decode (PIL opens lazily)
    except FileNotFoundError as e:
        raise DatasetError(f"image file {path} disappeared since the dataset was listed; restore it and rerun") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(
            f"image file {path} cannot be decoded ({type(e).__name__}: {e}); it is truncated or corrupt. "
            "Replace it with a good copy or delete it (then its class folder has one image fewer), and rerun"
        ) from e


def _fit(img: Image.Image, size: int) -> Image.Image:
    # shorter side to `size`, then center crop: same geometry as the eval transform at ratio 1.
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def eval_draft_side(image_size: int, eval_crop_ratio: float = 1.0) -> int:
    """Shorter side the eval transform resizes to (``lpld.data.transforms.eval_transform``): the ``draft`` to use."""
    return int(round(int(image_size) / float(eval_crop_ratio)))


def decode_to_uint8(paths: Sequence[str], mode: str, size: int, draft: bool = False) -> torch.Tensor:
    """Decode all ``paths`` into one uint8 tensor (N, C, size, size), fitting other sizes by resize + center crop.

    ``draft=True`` lets large JPEGs decode at a reduced scale whose sides stay >= ``size`` (see ``load_image``);
    files already at most twice ``size`` give identical bytes either way.
    """
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    hint = (size, size) if draft else None
    for i, p in enumerate(paths):
        arr = np.asarray(_fit(load_image(p, mode, draft=hint), size), dtype=np.uint8)
        out[i] = arr.reshape(size, size, channels)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def list_images(folder: Path) -> list[str]:
    """Image files directly in ``folder`` (by extension, case-insensitive), sorted by name."""
    with os.scandir(folder) as it:
        names = [e.name for e in it if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    return [str(folder / n) for n in sorted(names)]


def list_class_dirs(split_dir: Path) -> list[str]:
    """Names of the sub-directories of ``split_dir`` (hidden ones skipped), sorted."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def scan_class_folders(
    ds_type: str, split_dir: Path, classes: Sequence[str], sub: str = ""
) -> tuple[list[str], list[int]]:
    """Files of ``split_dir/<class>/<sub>/`` for each class in order; label = position in ``classes``.

    Raises:
        DatasetError: a class folder is missing or holds no image.
    """
    paths: list[str] = []
    targets: list[int] = []
    for label, name in enumerate(classes):
        folder = split_dir / name / sub if sub else split_dir / name
        if not folder.is_dir():
            raise dataset_error(
                ds_type, f"class folder missing: {folder}", "make both splits hold the same class folders"
            )
        files = list_images(folder)
        if not files:
            raise dataset_error(
                ds_type,
                f"class folder {folder} holds no image file ({', '.join(IMAGE_EXTENSIONS)})",
                "remove the empty folder or add its images (every class needs at least one)",
            )
        paths += files
        targets += [label] * len(files)
    return paths, targets
