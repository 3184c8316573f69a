"""The distilled-image artifact: image files in class folders plus ``manifest.json``.

Layout (``paths.images_dir(cfg)``)::

    manifest.json
    0000_<class name>/00000.jpg 00001.jpg ...   (00000.png ... with recover.image_format=png)
    0001_<class name>/...

The class folders sort in class order, so the tree is also a plain ``imagefolder`` dataset.
Storage (``recover.image_format`` / ``recover.quantize``, issue 20): every official recover script (LPLD
``data_synthesis_class.py`` ``save_images``, SRe2L, RDED) writes ``Image.fromarray((x * 255).astype(np.uint8))``
to a ``.jpg`` path, i.e. truncation to uint8 and JPEG at PIL's default quality 75; that is the default here
(``jpeg`` + ``truncate``), and relabel and the student read the decoded JPEG pixels. ``png`` + ``round`` is the
lossless switch (lpld before). Both encoders write no timestamps, so the same pixels give the same bytes and the
same :func:`images_fingerprint` (for one libjpeg build).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lpld.core.io import ArtifactError, atomic_write_bytes, read_json

MANIFEST = "manifest.json"
_CLASS_DIR = re.compile(r"^(\d{4,})_")
IMAGE_FORMATS = ("jpeg", "png")  # recover.image_format
QUANTIZE_MODES = ("truncate", "round")  # recover.quantize
SUFFIX = {"jpeg": ".jpg", "png": ".png"}
PIL_DEFAULT_JPEG_QUALITY = 75  # what Image.save(path.jpg) uses without a quality argument


def to_uint8(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], quantize: str = "round"
) -> torch.Tensor:
    """De-normalise and quantise: (N, C, H, W) float in normalised space -> uint8 (N, C, H, W).

    ``round``: ``round(clamp(x * std + mean, 0, 1) * 255)`` (a pixel that was exactly representable survives a
    save/load round trip). ``truncate``: ``floor(clamp(x * std + mean, 0, 1) * 255)``, the official scripts'
    ``(x * 255).astype(np.uint8)`` on their clipped images (values in [0, 1], so the cast floors).
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"recover.quantize must be {'|'.join(QUANTIZE_MODES)}, got {quantize!r}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (images.detach().float().cpu() * s + m).clamp(0.0, 1.0) * 255.0
    return (torch.round(x) if quantize == "round" else torch.floor(x)).to(torch.uint8)


def safe_class_name(name: str) -> str:
    """A class name usable as a folder-name suffix (path separators and odd characters replaced)."""
    out = re.sub(r"[^A-Za-z0-9._+-]", "_", str(name)).strip("._")
    return out or "class"


def class_dir_name(class_idx: int, class_name: str) -> str:
    """``<class_idx:04d>_<class name>``."""
    return f"{int(class_idx):04d}_{safe_class_name(class_name)}"


def png_bytes(image: torch.Tensor) -> bytes:
    """Encode one uint8 image (C, H, W), C in {1, 3}, as PNG (greyscale or RGB)."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"png_bytes needs uint8 (C, H, W) with C in (1, 3); got {image.dtype} {tuple(image.shape)}")
    arr = image.permute(1, 2, 0).contiguous().cpu().numpy()
    pil = Image.fromarray(arr[:, :, 0]) if arr.shape[2] == 1 else Image.fromarray(arr)  # uint8 -> "L" / "RGB"
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def jpeg_bytes(image: torch.Tensor, quality: int = PIL_DEFAULT_JPEG_QUALITY) -> bytes:
    """Encode one uint8 image (C, H, W), C in {1, 3}, as JPEG with PIL's encoder and default settings but
    ``quality`` (75 = PIL's default: the bytes of the official ``pil_image.save('x.jpg')``)."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"jpeg_bytes needs uint8 (C, H, W) with C in (1, 3); got {image.dtype} {tuple(image.shape)}")
    arr = image.permute(1, 2, 0).contiguous().cpu().numpy()
    pil = Image.fromarray(arr[:, :, 0]) if arr.shape[2] == 1 else Image.fromarray(arr)
    buf = io.BytesIO()
    if int(quality) == PIL_DEFAULT_JPEG_QUALITY:
        pil.save(buf, format="JPEG")  # exactly the official call (no arguments)
    else:
        pil.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def image_settings(settings: dict[str, Any]) -> tuple[str, str, int]:
    """(format, quantize, jpeg quality) of a recover job's settings; folders written before issue 20 have none of
    these keys and are PNG + round."""
    fmt = str(settings.get("image_format", "png"))
    return fmt, str(settings.get("quantize", "round")), int(settings.get("jpeg_quality", PIL_DEFAULT_JPEG_QUALITY))


def encode_image(image: torch.Tensor, fmt: str, quality: int = PIL_DEFAULT_JPEG_QUALITY) -> bytes:
    """The stored bytes of one uint8 image (C, H, W) in ``fmt`` (jpeg | png)."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"recover.image_format must be {'|'.join(IMAGE_FORMATS)}, got {fmt!r}")
    return jpeg_bytes(image, quality) if fmt == "jpeg" else png_bytes(image)


def image_path(class_dir: str | os.PathLike, j: int, fmt: str) -> Path:
    """``<class dir>/<j:05d>.jpg`` (or ``.png``)."""
    return Path(class_dir) / f"{int(j):05d}{SUFFIX[fmt]}"


def write_class_images(class_dir: str | os.PathLike, images_u8: torch.Tensor, settings: dict[str, Any]) -> None:
    """Write one class's uint8 images (ipc, C, H, W) as the job's settings store them, each atomically."""
    fmt, _, quality = image_settings(settings)
    for j in range(images_u8.shape[0]):
        atomic_write_bytes(image_path(class_dir, j, fmt), encode_image(images_u8[j], fmt, quality))


def quantize_images(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], settings: dict[str, Any]
) -> torch.Tensor:
    """The uint8 pixels a recover job stores for its normalised float images (``recover.quantize``)."""
    return to_uint8(images, mean, std, image_settings(settings)[1])


def save_png(path: str | os.PathLike, image: torch.Tensor) -> None:
    """Write one uint8 image (C, H, W) as a lossless PNG, atomically."""
    atomic_write_bytes(path, png_bytes(image))


def read_png(path: str | os.PathLike) -> torch.Tensor:
    """Read a PNG written by :func:`save_png` back to uint8 (C, H, W)."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def list_pngs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(class index, path) of every stored image (``.jpg`` or ``.png``) under ``<root>/<NNNN_name>/``, in sorted
    relative-path order. (The name predates JPEG storage.)"""
    root = Path(root)
    out: list[tuple[int, Path]] = []
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir() and _CLASS_DIR.match(p.name)):
        cls = int(_CLASS_DIR.match(d.name).group(1))  # type: ignore[union-attr]
        out += [(cls, f) for f in sorted(d.iterdir()) if f.is_file() and f.suffix in _SUFFIXES]
    return out


_SUFFIXES = tuple(SUFFIX.values())
list_images = list_pngs


def image_file_bytes(root: str | os.PathLike) -> int:
    """Bytes of every stored image file under ``root`` (the images' storage as written: JPEG or PNG)."""
    return int(sum(f.stat().st_size for _, f in list_pngs(root)))


def images_fingerprint(root: str | os.PathLike, n_hex: int = 16) -> str:
    """sha256 over every PNG's relative path and bytes, in sorted path order.

    The relative path is included so that moving an image to another class (a label change)
    changes the fingerprint too.
    """
    root = Path(root)
    h = hashlib.sha256()
    for _, f in list_pngs(root):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:n_hex]


def file_hash(data: bytes) -> str:
    """The per-file hash recorded in an images manifest (``file_hashes``): sha256 of the bytes, 16 hex digits."""
    return hashlib.sha256(data).hexdigest()[:16]


def image_hashes(root: str | os.PathLike) -> dict[str, str]:
    """``{relative path: file_hash}`` of every PNG under ``root`` (the manifest's ``file_hashes``)."""
    root = Path(root)
    return {f.relative_to(root).as_posix(): file_hash(f.read_bytes()) for _, f in list_pngs(root)}


def check_image_files(
    root: str | os.PathLike, man: dict[str, Any], files: list[tuple[int, Path]], cause: BaseException | None = None
) -> None:
    """Name the image files that differ from the hashes recorded in the manifest (``file_hashes``).

    :func:`load_distilled` calls it when decoding fails or the folder's fingerprint differs, so the
    error names the damaged file instead of showing a decoder traceback.

    Raises:
        ArtifactError: naming the changed, missing or extra files and the command that regenerates the images;
            or ``cause`` itself when no file differs (or the manifest predates per-file hashes).
    """
    root = Path(root)
    hashes = man.get("file_hashes") or {}
    bad: list[str] = []
    if hashes:
        present = set()
        for _, f in files:
            rel = f.relative_to(root).as_posix()
            present.add(rel)
            if hashes.get(rel) != file_hash(f.read_bytes()):
                bad.append(f"{rel} ({'extra file' if rel not in hashes else 'changed or damaged'})")
        bad += [f"{rel} (missing)" for rel in sorted(set(hashes) - present)]
    elif cause is not None and isinstance(cause, (OSError, ValueError, SyntaxError)):
        bad = [str(getattr(cause, "filename", None) or cause)]
    if not bad:
        if cause is not None:
            raise cause
        return
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise ArtifactError(
        f"distilled images under {root} differ from {MANIFEST}: {shown}; regenerate them: rerun "
        "`python run.py stage=recover` with the same overrides plus recover.overwrite=true (the old folder is "
        "kept aside until the new one is complete)"
    ) from cause


def read_manifest(root: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of an image folder, or None when there is none."""
    p = Path(root) / MANIFEST
    return read_json(p) if p.exists() else None


def load_distilled(
    root: str | os.PathLike,
    expect_teacher_fingerprint: str | None = None,
    allow_other_teacher: bool = False,
    verify: bool = True,
    workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Load a distilled dataset written by ``stage=recover``.

    Args:
        root: the images directory (``paths.images_dir(cfg)``).
        expect_teacher_fingerprint: the current teacher; images made by another teacher are
            refused unless ``allow_other_teacher``.
        allow_other_teacher: accept images whose manifest names a different teacher.
        verify: recompute the images fingerprint and compare it with the manifest.
        workers: decoding threads (None: this node's CPUs / its ranks, at most 16).

    Returns:
        images: uint8 (N, C, H, W) in class order then image order, held once (never as float);
        labels: int64 (N,);
        manifest: the parsed manifest.

    Raises:
        ArtifactError: no/incomplete manifest, teacher mismatch, fingerprint mismatch, no images,
            images of different sizes.
    """
    root = Path(root)
    man = read_manifest(root)
    if man is None:
        raise ArtifactError(f"no distilled images at {root} (manifest.json missing); run `python run.py stage=recover`")
    if not man.get("complete", False):
        raise ArtifactError(
            f"distilled images at {root} are incomplete (an interrupted recover run); rerun `stage=recover` "
            "with the same config to finish them"
        )
    fp = man.get("teacher_fingerprint")
    if expect_teacher_fingerprint is not None and fp != expect_teacher_fingerprint and not allow_other_teacher:
        raise ArtifactError(
            f"images at {root} were synthesised with teacher {fp}, but the current teacher is "
            f"{expect_teacher_fingerprint}. Rerun `stage=recover` for this teacher, or set "
            "stage.allow_other_teacher=true (e.g. `python run.py stage=student stage.allow_other_teacher=true`) "
            "to use them anyway"
        )
    files = list_pngs(root)
    if not files:
        raise ArtifactError(f"{root} has a manifest but no PNG images; delete it and rerun `stage=recover`")
    try:
        images, h = _decode_all(root, files, verify, workers)
        if verify and man.get("images_fingerprint") and h.hexdigest()[:16] != man["images_fingerprint"]:
            raise ArtifactError(
                f"images under {root} do not match their manifest fingerprint (files changed since recover); "
                "rerun `stage=recover` with the same overrides plus recover.overwrite=true"
            )
    except (ArtifactError, OSError, ValueError, SyntaxError) as e:
        check_image_files(root, man, files, cause=e)  # names the damaged file(s) from the per-file hashes
    return images, torch.tensor([c for c, _ in files], dtype=torch.long), man


def _decode_one(f: Path) -> tuple[bytes, np.ndarray]:
    """(file bytes, decoded HWC uint8 array) of one PNG."""
    data = f.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im)
    arr = np.array(arr, copy=True)  # PIL's array view is read-only; torch wants a writable buffer
    return data, arr[:, :, None] if arr.ndim == 2 else arr


def _decode_all(
    root: Path, files: list[tuple[int, Path]], verify: bool, workers: int | None
) -> tuple[torch.Tensor, Any]:
    """Decode every PNG into one preallocated uint8 (N, C, H, W) tensor; sha256 over (path, bytes) in order.

    PIL releases the GIL while inflating, so a thread pool decodes in parallel (ImageNet IPC 200 is
    200k files); results are consumed in file order, in windows, so the hash is order-exact and at
    most one window of file bytes is held at a time. Peak host memory = the uint8 set + one window.
    """
    from concurrent.futures import ThreadPoolExecutor

    # default: the CPUs of this node shared among its ranks (torchrun sets LOCAL_WORLD_SIZE), at most 16
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    n_workers = int(workers) if workers is not None else max(1, min(16, (os.cpu_count() or 1) // local))
    h = hashlib.sha256()
    out: torch.Tensor | None = None
    shape0: tuple[int, ...] | None = None
    window = max(64, 16 * n_workers)
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        for start in range(0, len(files), window):
            part = files[start : start + window]
            for j, (data, arr) in enumerate(pool.map(_decode_one, [f for _, f in part])):
                f = part[j][1]
                if verify:
                    h.update(f.relative_to(root).as_posix().encode())
                    h.update(data)
                chw = (arr.shape[2], arr.shape[0], arr.shape[1])
                if out is None:
                    shape0 = chw
                    out = torch.empty((len(files), *chw), dtype=torch.uint8)
                if chw != shape0:
                    raise ArtifactError(
                        f"images under {root} have different shapes ({shape0} and {chw} at {f.name}); "
                        "rerun `stage=recover`"
                    )
                out[start + j] = torch.from_numpy(arr).permute(2, 0, 1)
    assert out is not None
    return out, h
