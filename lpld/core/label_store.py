"""The label store: fixed-layout, memory-mapped, checksummed soft labels of the relabel stage.

One directory per (images, teacher, augmentation, prune, quant, record mode, seed) holding

* ``manifest.json``: the spec (what was generated), fingerprints of images and teacher, the
  array table (file, dtype, shape, storage component, sha256, sampled sha256) and the storage
  accounting by component; ``complete`` is false until every kept batch is written;
* one ``.npy`` file per array (numpy's documented, pickle-free format, opened with
  ``mmap_mode="r"``), rows of all batches concatenated (ragged: a short last batch takes only
  its own rows, so no padding inflates the store), located by ``row_offsets``;
* during generation only: ``progress.<rank>.npy`` bitmaps of committed batches (resume).

Arrays (M stored batches, R = total rows = sum of their sizes):

==================  ============  ===========  ==============================================
array               shape         dtype        component
==================  ============  ===========  ==============================================
batch_ids           (M, 2)        int32        batch_index  (epoch, batch_in_epoch)
row_offsets         (M + 1,)      int64        batch_index
seeds               (M,)          uint64       seed         record_mode=seed only
sample_index        (R,)          uint16/32    sample_index explicit only (seed: regenerated)
crops               (R, 4)        uint16       crop_coords  explicit (top, left, h, w)
flips               (R,)          uint8        flips        explicit, aug.flip
mix_index           (R,)          uint8/16     mix_index    explicit, cutmix
lam                 (M,)          float32      lambda       explicit, cutmix
box                 (M, 4)        uint16       box          explicit, cutmix (y1, x1, y2, x2)
cutout              (R, 4)        uint16       cutout_box   explicit, cutout
logits              (R, C)        float16      logits       quant=none
topk_values         (R, k)        float16      topk_values  quant=mr (logits) / ms (probs)
topk_indices        (R, k)        uint16/32    topk_indices quant=mr/ms
hard                (R,)          uint16/32    hard         quant=hard
==================  ============  ===========  ==============================================

Record modes: ``explicit`` stores every augmentation parameter (the paper's accounting,
Table 21 components 1-5); ``seed`` stores one 64-bit seed per batch and regenerates the image
order and the parameters at read time with ``lpld.core.augment`` (bit-identical: same code,
same seed). Reading batch i costs O(1) array slices (seed mode: plus one cached permutation
per epoch).

checksums           (M, A)        uint32       checksum     CRC-32 of batch i's slice of each of the A
                                                            arrays written per batch (``checksummed``)

Integrity (format 2): every stored batch carries a CRC-32 per array it wrote, and ``LabelStore.read``
checks them on every read, so a flipped byte anywhere in the data stops training at the first read of
that batch, naming the batch, the file and the fix. ``LabelStore.open(verify="fast")`` checks every
file's size and npy header, hashes the small index arrays fully and the others over sampled 4 KiB
blocks; ``verify="full"`` (and ``LabelStore.verify``) hashes every byte (an audit). Format 1 stores
(no per-batch checksums) are refused with the command that regenerates them.

Writers: ``prepare`` takes the store's OS file lock (``lpld.core.io.acquire_lock``; a second writer is
refused with the holder's pid and host) and keeps it until ``finalize``; ``overwrite=True`` moves the
old store to ``<store>.replaced`` and deletes it only when the new store is finalized.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format
from torch.utils.data import Dataset

from lpld.core import augment
from lpld.core.augment import AugConfig, AugRecord
from lpld.core.io import (
    ArtifactError,
    _launched_rank,
    acquire_lock,
    aside_path,
    atomic_write_bytes,
    atomic_write_json,
    drop_aside,
    move_aside,
    read_json,
    release_lock,
)
from lpld.core.pruning import batches_per_epoch, select_batches
from lpld.core.quant import QuantConfig, label_arrays

FORMAT = "lpld-label-store/2"
# arrays written once by ``prepare`` (hashed fully by verify="fast"); every other array is written per batch
# and checksummed per batch
INDEX_ARRAYS = ("batch_ids", "row_offsets", "seeds", "checksums")
MANIFEST = "manifest.json"
RECORD_MODES = ("explicit", "seed")
_SAMPLE_BLOCK = 4096
_SAMPLE_COUNT = 16


@dataclass(frozen=True)
class StoreSpec:
    """What a label store holds: the full schedule, its pruning, quantization and records.

    Attributes:
        num_images: N distilled images (ipc x C).
        num_classes: C.
        image_hw: (H, W) of the distilled images.
        batch_size: B of the student schedule (a short last batch keeps its own size).
        epochs: E student epochs of the full schedule.
        prune_name: "1x", "10x", ...
        prune_ratio: r in [0, 1).
        granularity: "epoch" | "batch".
        quant: label quantization.
        aug: augmentation.
        record_mode: "explicit" | "seed".
        seed: seeds the image order, the augmentation draws and the pruning selection.
    """

    num_images: int
    num_classes: int
    image_hw: tuple[int, int]
    batch_size: int
    epochs: int
    prune_name: str
    prune_ratio: float
    granularity: str
    quant: QuantConfig
    aug: AugConfig
    record_mode: str = "explicit"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.record_mode not in RECORD_MODES:
            raise ValueError(f"record_mode must be one of {RECORD_MODES}, got {self.record_mode!r}")
        if self.num_images <= 0 or self.num_classes <= 1 or self.batch_size <= 0 or self.epochs <= 0:
            raise ValueError(
                "need num_images > 0, num_classes > 1, batch_size > 0, epochs > 0; got "
                f"{self.num_images}, {self.num_classes}, {self.batch_size}, {self.epochs}; set stage.epochs and "
                "stage.batch_size (stage=relabel) or dataset.recipe.student.epochs / batch_size to positive values"
            )
        if max(self.image_hw) > 65535:
            raise ValueError(f"image side {max(self.image_hw)} exceeds the uint16 crop coordinates (65535)")
        self.quant.validate(self.num_classes)

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.num_images, self.batch_size)

    def batch_ids(self) -> np.ndarray:
        """(M, 2) int64 kept (epoch, batch) pairs, sorted."""
        return select_batches(self.epochs, self.batches_per_epoch, self.prune_ratio, self.granularity, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "image_hw": list(self.image_hw),
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "batches_per_epoch": self.batches_per_epoch,
            "prune": {"name": self.prune_name, "ratio": self.prune_ratio, "granularity": self.granularity},
            "quant": self.quant.to_dict(),
            "aug": self.aug.to_dict(),
            "record_mode": self.record_mode,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreSpec:
        return cls(
            num_images=int(d["num_images"]),
            num_classes=int(d["num_classes"]),
            image_hw=(int(d["image_hw"][0]), int(d["image_hw"][1])),
            batch_size=int(d["batch_size"]),
            epochs=int(d["epochs"]),
            prune_name=str(d["prune"]["name"]),
            prune_ratio=float(d["prune"]["ratio"]),
            granularity=str(d["prune"]["granularity"]),
            quant=QuantConfig(**d["quant"]),
            aug=AugConfig.from_dict(d["aug"]),
            record_mode=str(d["record_mode"]),
            seed=int(d["seed"]),
        )


RATIO_WARN = 1.05  # achieved / requested compression factor beyond this: a warning, and the record says so
# Beyond this the run is refused: a table would call e.g. a 6x store "100x". 4x, not less: tiny schedules (the
# reduced demo: 4 stored batches at 10x keep 1 = 4x) must still run, with a warning and the achieved ratio recorded.
RATIO_REFUSE = 4.0


def achieved_ratio(units: int, kept: int, requested: float, name: str, what: str = "the schedule") -> dict[str, Any]:
    """The pruning actually achieved when ``kept`` of ``units`` survive a requested ratio, checked.

    Args:
        units: stored batches (granularity batch) or epochs (granularity epoch) of the full schedule.
        kept: how many of them are kept.
        requested: the requested ratio r (``prune.ratio``).
        name: its name ("100x").
        what: what the units are, for the message.

    Returns:
        {"ratio": 1 - kept / units, "factor": units / kept, "requested_factor", "off": bool (beyond RATIO_WARN)}.

    Raises:
        ArtifactError: the achieved factor is more than RATIO_REFUSE away from the requested one (names the fix).
    """
    factor = units / max(1, kept)
    want = 1.0 / (1.0 - requested)
    off = max(factor / want, want / factor)
    if off > RATIO_REFUSE:
        raise ArtifactError(
            f"prune={name} asks for {want:.1f}x but {what} has only {units} units, so keeping {kept} gives "
            f"{factor:.1f}x; lengthen the schedule (more student epochs: stage.epochs / dataset.recipe.student.epochs, "
            "or a smaller batch size), use prune.granularity=batch, or choose a lower ratio (e.g. prune=10x)"
        )
    return {"ratio": 1.0 - kept / units, "factor": factor, "requested_factor": want, "off": off > RATIO_WARN}


def spec_achieved(spec: StoreSpec) -> dict[str, Any]:
    """``achieved_ratio`` of a store spec (O(1): counts only)."""
    from lpld.core.pruning import num_kept

    units = spec.epochs if spec.granularity == "epoch" else spec.epochs * spec.batches_per_epoch
    what = f"the schedule ({spec.epochs} epochs x {spec.batches_per_epoch} batches, granularity {spec.granularity})"
    if spec.prune_ratio <= 0:
        return {"ratio": 0.0, "factor": 1.0, "requested_factor": 1.0, "off": False}
    return achieved_ratio(units, num_kept(units, spec.prune_ratio), spec.prune_ratio, spec.prune_name, what)


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: name, full shape, dtype and the storage component it counts under."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    component: str
    per: str  # "batch" (leading dim M or M+1) or "row" (leading dim R)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def row_offsets(spec: StoreSpec, batch_ids: np.ndarray) -> np.ndarray:
    """(M + 1,) int64 start row of each stored batch (ragged layout, last = R)."""
    b = batch_ids[:, 1].astype(np.int64)
    sizes = np.minimum(spec.batch_size, spec.num_images - b * spec.batch_size)  # = pruning.batch_size_of
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def array_layout(spec: StoreSpec, num_batches: int, num_rows: int) -> list[ArraySpec]:
    """The arrays of a store with M = num_batches batches and R = num_rows rows (see module table)."""
    m, r = num_batches, num_rows
    arrays = [
        ArraySpec("batch_ids", (m, 2), np.dtype(np.int32), "batch_index", "batch"),
        ArraySpec("row_offsets", (m + 1,), np.dtype(np.int64), "batch_index", "batch"),
    ]
    if spec.record_mode == "seed":
        arrays.append(ArraySpec("seeds", (m,), np.dtype(np.uint64), "seed", "batch"))
    else:
        img_dt = np.dtype(np.uint16) if spec.num_images <= 1 << 16 else np.dtype(np.uint32)
        arrays.append(ArraySpec("sample_index", (r,), img_dt, "sample_index", "row"))
        arrays.append(ArraySpec("crops", (r, 4), np.dtype(np.uint16), "crop_coords", "row"))
        if spec.aug.flip:
            arrays.append(ArraySpec("flips", (r,), np.dtype(np.uint8), "flips", "row"))
        if spec.aug.mix == "cutmix":
            mix_dt = np.dtype(np.uint8) if spec.batch_size <= 256 else np.dtype(np.uint16)
            arrays.append(ArraySpec("mix_index", (r,), mix_dt, "mix_index", "row"))
            arrays.append(ArraySpec("lam", (m,), np.dtype(np.float32), "lambda", "batch"))
            arrays.append(ArraySpec("box", (m, 4), np.dtype(np.uint16), "box", "batch"))
        elif spec.aug.mix == "cutout":
            arrays.append(ArraySpec("cutout", (r, 4), np.dtype(np.uint16), "cutout_box", "row"))
    for name, (tail, dt) in label_arrays(spec.quant, spec.num_classes).items():
        arrays.append(ArraySpec(name, (r, *tail), dt, name, "row"))
    n_sum = sum(a.name not in INDEX_ARRAYS for a in arrays)
    arrays.append(ArraySpec("checksums", (m, n_sum), np.dtype(np.uint32), "checksum", "batch"))
    return arrays


def checksummed(layout: Sequence[ArraySpec]) -> list[str]:
    """Names of the arrays written per batch, in the column order of ``checksums`` (M, A)."""
    return [a.name for a in layout if a.name not in INDEX_ARRAYS]


def batch_slices(mm: dict[str, np.ndarray], names: Sequence[str], i: int, r0: int, r1: int) -> list[np.ndarray]:
    """Batch i's part of each named array: rows r0:r1 of row arrays, element i of per-batch arrays (lam, box)."""
    per_batch = ("lam", "box")
    return [mm[n][i : i + 1] if n in per_batch else mm[n][r0:r1] for n in names]


def crc32s(parts: Sequence[np.ndarray]) -> np.ndarray:
    """(A,) uint32 CRC-32 of each array's bytes (C order)."""
    return np.array([zlib.crc32(np.ascontiguousarray(p).view(np.uint8).reshape(-1)) for p in parts], dtype=np.uint32)


def npy_header_bytes(a: ArraySpec) -> int:
    """Size of the .npy header numpy writes for this array (version 1.0 unless it does not fit)."""
    import io

    d = {"descr": npy_format.dtype_to_descr(a.dtype), "fortran_order": False, "shape": a.shape}
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, d)
    return buf.tell()


LABEL_COMPONENTS = ("logits", "topk_values", "topk_indices", "hard")


def accounting(arrays: Sequence[ArraySpec]) -> dict[str, Any]:
    """Storage accounting by component (bytes of array data) plus the npy container overhead.

    ``total`` = sum of components; ``on_disk_arrays`` = total + npy headers = the sum of the
    .npy file sizes exactly (the manifest is a few KB on top).
    """
    comp: dict[str, int] = {}
    for a in arrays:
        comp[a.component] = comp.get(a.component, 0) + a.nbytes
    headers = sum(npy_header_bytes(a) for a in arrays)
    total = sum(comp.values())
    labels = sum(v for k, v in comp.items() if k in LABEL_COMPONENTS)
    return {
        "components": comp,
        "labels_bytes": labels,
        "records_bytes": total - labels,
        "total": total,
        "npy_headers": headers,
        "on_disk_arrays": total + headers,
    }


@dataclass
class StoredBatch:
    """One stored batch, as read from a label store.

    Attributes:
        index: (B,) int64 distilled-image indices.
        aug: its augmentation record (``lpld.core.augment.replay`` rebuilds the labelled tensor).
        logits: (B, C) float16 (quant none) or None.
        topk_values: (B, k) float16 top-k logits (mr) or probabilities (ms), or None.
        topk_indices: (B, k) int64 class indices, or None.
        hard: (B,) int64 argmax classes (quant hard), or None.
        epoch, batch: position of the batch in the full schedule.
        position: row i of the store (``store.read(i)``).
        gen_temperature: generation temperature of ``ms`` probabilities (``quant.decode`` uses it).
    """

    index: torch.Tensor
    aug: AugRecord
    logits: torch.Tensor | None = None
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    hard: torch.Tensor | None = None
    epoch: int = -1
    batch: int = -1
    position: int = -1
    gen_temperature: float | None = field(default=None)

    def __len__(self) -> int:
        return int(self.index.numel())


def _sampled_sha256(path: Path, size: int) -> str:
    """sha256 over ``_SAMPLE_COUNT`` 4 KiB blocks spread evenly over the file (incl. first and last)."""
    h = hashlib.sha256()
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _SAMPLE_BLOCK * _SAMPLE_COUNT:
            h.update(f.read())
        else:
            span = size - _SAMPLE_BLOCK
            for i in range(_SAMPLE_COUNT):
                f.seek(span * i // (_SAMPLE_COUNT - 1))
                h.update(f.read(_SAMPLE_BLOCK))
    return h.hexdigest()


def _full_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _refuse(path: Path, what: str) -> ArtifactError:
    return ArtifactError(
        f"label store {path} is corrupt or truncated ({what}); regenerate it: rerun `python run.py stage=relabel` "
        "with the same overrides plus stage.overwrite=true (the damaged store is kept at "
        f"{aside_path(path).name} until the new one is complete)"
    )


def _old_format(path: Path, fmt: Any) -> ArtifactError:
    return ArtifactError(
        f"label store {path} has format {fmt!r}, this lpld reads {FORMAT!r} (per-batch checksums); regenerate it: "
        "rerun `python run.py stage=relabel` with the same overrides plus stage.overwrite=true"
    )


# ----------------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------------


def identity(spec: StoreSpec, meta: dict[str, Any]) -> dict[str, Any]:
    """What must match for an existing store to be resumed or reused: spec + fingerprints."""
    return {
        "spec": spec.to_dict(),
        "images_fingerprint": meta.get("images_fingerprint"),
        "teacher_fingerprint": meta.get("teacher_fingerprint"),
    }


def predicted_bytes(spec: StoreSpec) -> int:
    """Bytes the store's arrays will take on disk (exact) plus a manifest allowance."""
    ids = spec.batch_ids()
    offs = row_offsets(spec, ids)
    return accounting(array_layout(spec, len(ids), int(offs[-1])))["on_disk_arrays"] + 64 * 1024


def prepare(path: str | os.PathLike, spec: StoreSpec, meta: dict[str, Any], overwrite: bool = False) -> str:
    """Create a new store (preallocated arrays, incomplete manifest) or check an existing one.

    Args:
        path: the store directory.
        spec: what to generate.
        meta: at least ``images_fingerprint`` and ``teacher_fingerprint`` (strings); any further
            JSON-able keys are kept in the manifest (teacher names, ensemble mode, image bytes...).
        overwrite: replace an existing store made from a different spec / images / teacher.

    Returns:
        "new", "resume" (incomplete store with the same identity) or "complete" (nothing to do).

    Raises:
        ArtifactError: an existing store differs and ``overwrite`` is false, or not enough free disk
            (checked before anything is written).
    """
    from lpld.core.io import ensure_free_space

    path = Path(path)
    ident = identity(spec, meta)
    spec_achieved(spec)  # refuses a ratio the schedule cannot reach, before anything is written
    # one writer per store: a second run is refused here, before it reads a half-made store
    acquire_lock(path, "label store")
    if _launched_rank() != 0:
        overwrite = False  # rank 0 of this DDP run starts the store over; the other ranks join it
    if (path / MANIFEST).exists() and not overwrite:
        try:
            old = read_json(path / MANIFEST)
        except ArtifactError as e:
            raise _refuse(path, f"{MANIFEST} is unreadable: {e.__cause__}") from e
        if old.get("format") != FORMAT and str(old.get("format", "")).startswith("lpld-label-store/"):
            raise _old_format(path, old.get("format"))
        if old.get("format") == FORMAT and old.get("identity") == ident:
            if old.get("complete"):
                release_lock(path)  # nothing to write
                return "complete"
            return "resume"
        if not overwrite:
            diff = _identity_diff(old.get("identity") or {}, ident)
            raise ArtifactError(
                f"label store {path} was generated from a different configuration ({diff}); "
                "use a different seed/prune/quant/record_mode (another store directory) or set "
                "stage=relabel stage.overwrite=true to replace it"
            )
    elif path.exists() and any(path.iterdir()) and not overwrite:
        raise ArtifactError(
            f"{path} exists and is not a label store; move it away or run stage=relabel stage.overwrite=true"
        )
    need = predicted_bytes(spec)
    ensure_free_space(path.parent if not path.exists() else path, need, what="relabel (label store)")
    if path.exists():
        move_aside(path)  # deleted by finalize once the new store is complete
    path.mkdir(parents=True)
    ids = spec.batch_ids()
    offs = row_offsets(spec, ids)
    layout = array_layout(spec, len(ids), int(offs[-1]))
    for a in layout:
        mm = npy_format.open_memmap(path / f"{a.name}.npy", mode="w+", dtype=a.dtype, shape=a.shape)
        if a.name == "batch_ids":
            mm[:] = ids.astype(np.int32)
        elif a.name == "row_offsets":
            mm[:] = offs
        elif a.name == "seeds":
            mm[:] = np.array([augment.batch_seed(spec.seed, e, b) for e, b in ids], dtype=np.uint64)
        mm.flush()
        del mm
    manifest = _manifest(spec, meta, ident, layout, len(ids), int(offs[-1]), complete=False)
    atomic_write_json(path / MANIFEST, manifest)
    return "new"


def _identity_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _identity_diff(a, b, f"{prefix}{k}.")
            if sub:
                diffs.append(sub)
        elif a != b:
            diffs.append(f"{prefix}{k}: store has {a!r}, config asks {b!r}")
    return "; ".join(diffs)


def _manifest(
    spec: StoreSpec,
    meta: dict[str, Any],
    ident: dict[str, Any],
    layout: Sequence[ArraySpec],
    m: int,
    r: int,
    complete: bool,
) -> dict[str, Any]:
    sd = spec.to_dict()
    return {
        "format": FORMAT,
        "complete": complete,
        "identity": ident,
        # flat copies of what readers use most (contract "Label store" section)
        "images_fingerprint": meta.get("images_fingerprint"),
        "teacher_fingerprint": meta.get("teacher_fingerprint"),
        **{k: sd[k] for k in ("num_images", "num_classes", "image_hw", "batch_size", "epochs", "batches_per_epoch")},
        "granularity": spec.granularity,
        "prune": sd["prune"],
        "quant": sd["quant"],
        "aug": sd["aug"],
        "record_mode": spec.record_mode,
        "seed": spec.seed,
        "num_batches": m,
        "num_rows": r,
        "arrays": {
            a.name: {
                "file": f"{a.name}.npy",
                "dtype": a.dtype.str,
                "shape": list(a.shape),
                "component": a.component,
                "nbytes": a.nbytes,
            }
            for a in layout
        },
        "checksummed": checksummed(layout),
        "accounting": accounting(layout),
        "meta": {k: v for k, v in meta.items() if k not in ("images_fingerprint", "teacher_fingerprint")},
    }


class StoreWriter:
    """Write batches of one rank into a prepared store (disjoint rows; resumable)."""

    def __init__(self, path: str | os.PathLike, rank: int = 0):
        self.path = Path(path)
        self.rank = rank
        self.manifest = read_json(self.path / MANIFEST)
        if self.manifest.get("format") != FORMAT:
            raise _old_format(self.path, self.manifest.get("format"))
        self.spec = StoreSpec.from_dict(self.manifest["identity"]["spec"])
        self._sum_names = list(self.manifest["checksummed"])
        self._mm = {name: np.load(self.path / a["file"], mmap_mode="r+") for name, a in self.manifest["arrays"].items()}
        self.batch_ids = np.asarray(self._mm["batch_ids"]).astype(np.int64)
        self.offsets = np.asarray(self._mm["row_offsets"]).astype(np.int64)
        self.done = done_bitmap(self.path, len(self.batch_ids))
        self._mine = np.zeros(len(self.batch_ids), dtype=np.uint8)
        prev = self.path / f"progress.{rank}.npy"
        if prev.exists():
            self._mine |= _load_progress(prev, len(self.batch_ids))

    def seed_of(self, i: int) -> int:
        e, b = self.batch_ids[i]
        return augment.batch_seed(self.spec.seed, int(e), int(b))

    def write(self, i: int, index: torch.Tensor, rec: AugRecord, labels: dict[str, np.ndarray | torch.Tensor]) -> None:
        """Write stored batch i: image indices, augmentation record (explicit mode), encoded labels, checksums.

        Tensors may live on any device: each is moved to the host once, here, where it is written.
        """
        r0, r1 = int(self.offsets[i]), int(self.offsets[i + 1])
        mm = self._mm
        if self.spec.record_mode == "explicit":
            mm["sample_index"][r0:r1] = _host(index)
            mm["crops"][r0:r1] = _host(rec.crops)
            if "flips" in mm:
                mm["flips"][r0:r1] = _host(rec.flips)
            if "mix_index" in mm:
                mm["mix_index"][r0:r1] = _host(rec.mix_index)
                mm["lam"][i] = np.float32(rec.lam)
                mm["box"][i] = _host(rec.box)
            if "cutout" in mm:
                mm["cutout"][r0:r1] = _host(rec.cutout)
        for name, arr in labels.items():
            arr = _host(arr)
            if arr.shape[0] != r1 - r0:
                raise ValueError(f"labels {name} has {arr.shape[0]} rows, batch {i} has {r1 - r0}")
            mm[name][r0:r1] = arr
        # checksums of what is now in the file's pages (the bytes a reader will see), per array
        mm["checksums"][i] = crc32s(batch_slices(mm, self._sum_names, i, r0, r1))
        self._mine[i] = 1

    def commit(self) -> None:
        """Flush written rows to disk, then record them as done (atomic progress file)."""
        for a in self._mm.values():
            a.flush()
        atomic_write_bytes(self.path / f"progress.{self.rank}.npy", _npy_bytes(self._mine))

    def close(self) -> None:
        self.commit()
        self._mm.clear()


def _host(t: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy view/copy on the host of a tensor on any device (or an array, unchanged)."""
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _load_progress(p: Path, m: int) -> np.ndarray:
    try:
        a = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ArtifactError(f"progress file {p} is corrupt ({e}); delete it to recompute its batches") from e
    if a.shape != (m,):
        raise ArtifactError(f"progress file {p} does not match the store ({a.shape} vs ({m},)); delete it")
    return a.astype(np.uint8)


def done_bitmap(path: str | os.PathLike, num_batches: int) -> np.ndarray:
    """(M,) uint8 union of every rank's committed batches (ranks of earlier runs included)."""
    done = np.zeros(num_batches, dtype=np.uint8)
    for p in sorted(Path(path).glob("progress.*.npy")):
        done |= _load_progress(p, num_batches)
    return done


def finalize(path: str | os.PathLike) -> dict[str, Any]:
    """Check every batch is committed, hash every array, mark the manifest complete, drop progress files.

    Returns:
        the final manifest.
    """
    path = Path(path)
    man = read_json(path / MANIFEST)
    done = done_bitmap(path, int(man["num_batches"]))
    if not done.all():
        missing = int((done == 0).sum())
        raise ArtifactError(f"label store {path}: {missing} batches not generated yet; rerun stage=relabel to resume")
    for a in man["arrays"].values():
        f = path / a["file"]
        size = f.stat().st_size
        a["file_bytes"] = size
        a["sha256"] = _full_sha256(f)
        a["sampled_sha256"] = _sampled_sha256(f, size)
    man["complete"] = True
    atomic_write_json(path / MANIFEST, man)
    for p in path.glob("progress.*.npy"):
        p.unlink()
    drop_aside(path)  # an overwritten store is deleted only now that its replacement is complete
    release_lock(path)
    return man


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------


class LabelStore:
    """Read access to a complete label store: ``len(store)``, ``store.batch_ids``, ``store.read(i)``.

    Picklable (DataLoader workers reopen the memory maps lazily).
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.spec = StoreSpec.from_dict(manifest["identity"]["spec"])
        self._mm: dict[str, np.ndarray] | None = None
        self._perm_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._sum_names: list[str] = list(manifest.get("checksummed") or [])
        self.check_batches = True  # verify each batch's checksums as it is read (cheap: CRC-32 of its slices)

    @classmethod
    def open(cls, path: str | os.PathLike, verify: str = "fast") -> LabelStore:
        """Open a store; ``verify`` = "fast" (sizes, headers, full hash of the index arrays, sampled hashes of
        the others), "full" (every byte) or "none". Whatever ``verify`` says, every ``read(i)`` checks batch i's
        CRC-32s (``check_batches``).

        Raises:
            ArtifactError: missing, incomplete, truncated or corrupt store (message names the fix).
        """
        path = Path(path)
        if not (path / MANIFEST).exists():
            raise ArtifactError(f"no label store at {path} (no {MANIFEST}); run stage=relabel first")
        try:
            man = read_json(path / MANIFEST)
        except ArtifactError as e:
            raise _refuse(path, f"{MANIFEST} is unreadable: {e.__cause__}") from e
        if man.get("format") != FORMAT:
            if str(man.get("format", "")).startswith("lpld-label-store/"):
                raise _old_format(path, man.get("format"))
            raise ArtifactError(f"{path} is not a {FORMAT} label store; rerun stage=relabel")
        if not man.get("complete"):
            raise ArtifactError(
                f"label store {path} is incomplete (generation was interrupted); rerun stage=relabel with the same "
                "config to resume it"
            )
        store = cls(path, man)
        if verify not in ("fast", "full", "none"):
            raise ValueError(f"verify must be 'fast', 'full' or 'none', got {verify!r}")
        if verify != "none":
            store.verify(full=verify == "full")
        return store

    def check_spec(self, spec: StoreSpec) -> None:
        """Refuse a store whose spec (prune, quant, augmentation, schedule, seed...) differs from ``spec``.

        Raises:
            ArtifactError: naming every differing field.
        """
        diff = _identity_diff(self.manifest["identity"]["spec"], spec.to_dict())
        if diff:
            raise ArtifactError(
                f"label store {self.path} does not match the requested config ({diff}); "
                "run stage=relabel for this config or point to the matching store"
            )

    def verify(self, full: bool = True) -> None:
        """Check every array file against the manifest (size, npy header, sampled or full sha256)."""
        for a in self.manifest["arrays"].values():
            f = self.path / a["file"]
            if not f.exists():
                raise _refuse(self.path, f"array file {a['file']} is missing")
            size = f.stat().st_size
            if size != a.get("file_bytes"):
                raise _refuse(self.path, f"{a['file']} has {size} bytes, manifest says {a.get('file_bytes')}")
            try:
                with open(f, "rb") as fh:
                    version = npy_format.read_magic(fh)
                    read_header = (
                        npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
                    )
                    shape, fortran, dtype = read_header(fh)
            except (ValueError, OSError, SyntaxError) as e:
                raise _refuse(self.path, f"{a['file']} has a bad npy header: {e}") from e
            if list(shape) != a["shape"] or dtype.str != a["dtype"] or fortran:
                raise _refuse(self.path, f"{a['file']} header says {shape} {dtype.str}, manifest {a['shape']}")
            whole = full or Path(a["file"]).stem in INDEX_ARRAYS  # index arrays are small (8-16 bytes per batch)
            digest = _full_sha256(f) if whole else _sampled_sha256(f, size)
            if digest != a["sha256" if whole else "sampled_sha256"]:
                raise _refuse(self.path, f"checksum mismatch in {a['file']} ({'full' if whole else 'sampled'} sha256)")

    # -- pickling for DataLoader workers: drop the memory maps, reopen lazily ------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        st = dict(self.__dict__)
        st["_mm"] = None
        st["_perm_cache"] = OrderedDict()
        return st

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._mm is None:
            self._mm = {n: np.load(self.path / a["file"], mmap_mode="r") for n, a in self.manifest["arrays"].items()}
        return self._mm

    def __len__(self) -> int:
        return int(self.manifest["num_batches"])

    @property
    def batch_ids(self) -> np.ndarray:
        """(M, 2) int64 (epoch, batch_in_epoch) of every stored batch, sorted."""
        return np.asarray(self.arrays["batch_ids"]).astype(np.int64)

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = augment.epoch_permutation(self.spec.seed, epoch, self.spec.num_images)
            self._perm_cache[epoch] = perm
            while len(self._perm_cache) > 4:
                self._perm_cache.popitem(last=False)
        return perm

    def check_batch(self, i: int, e: int, b: int, r0: int, r1: int) -> None:
        """Compare stored batch i's CRC-32s with its data (rows r0:r1); raise naming the batch, file and fix."""
        mm = self.arrays
        got = crc32s(batch_slices(mm, self._sum_names, i, r0, r1))
        want = np.asarray(mm["checksums"][i])
        if not np.array_equal(got, want):
            bad = [f"{n}.npy" for n, g, w in zip(self._sum_names, got, want) if g != w]
            raise _refuse(
                self.path,
                f"stored batch {i} (epoch {e}, batch {b}, rows {r0}..{r1 - 1}) fails its checksum in {', '.join(bad)} "
                "(that data, or its CRC in checksums.npy, changed since relabel)",
            )

    def read(self, i: int) -> StoredBatch:
        """Stored batch i (0 <= i < len(store)), O(1) slices of the memory-mapped arrays."""
        m = len(self)
        if not 0 <= i < m:
            raise IndexError(f"stored batch {i} out of range 0..{m - 1}")
        mm, spec = self.arrays, self.spec
        e, b = (int(v) for v in mm["batch_ids"][i])
        r0, r1 = int(mm["row_offsets"][i]), int(mm["row_offsets"][i + 1])
        if self.check_batches:
            self.check_batch(i, e, b, r0, r1)

        def rows(name: str) -> torch.Tensor | None:
            return torch.from_numpy(np.array(mm[name][r0:r1])) if name in mm else None

        if spec.record_mode == "seed":
            index = torch.from_numpy(self._epoch_perm(e)[b * spec.batch_size : b * spec.batch_size + (r1 - r0)].copy())
            rec = augment.draw(spec.aug, r1 - r0, spec.image_hw, int(mm["seeds"][i]))
        else:
            index = rows("sample_index").long()
            flips = rows("flips")
            rec = AugRecord(
                crops=rows("crops").long(),
                flips=flips.bool() if flips is not None else torch.zeros(r1 - r0, dtype=torch.bool),
                mix=spec.aug.mix,
            )
            if spec.aug.mix == "cutmix":
                rec.mix_index = rows("mix_index").long()
                rec.lam = float(mm["lam"][i])
                rec.box = torch.from_numpy(np.array(mm["box"][i])).long()
            elif spec.aug.mix == "cutout":
                rec.cutout = rows("cutout").long()
        out = StoredBatch(index=index, aug=rec, epoch=e, batch=b, position=i)
        q = spec.quant.mode
        if q == "none":
            out.logits = rows("logits")
        elif q in ("mr", "ms"):
            out.topk_values = rows("topk_values")
            out.topk_indices = rows("topk_indices").long()
            out.gen_temperature = float(spec.quant.temperature) if q == "ms" else None
        else:
            out.hard = rows("hard").long()
        return out


def disk_bytes(path: str | os.PathLike) -> int:
    """Sum of the sizes of every file in a store directory (manifest included)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


class StoredBatchDataset(Dataset):
    """A Dataset whose item i is a whole stored batch (use ``DataLoader(ds, batch_size=None)``).

    Needs no patched PyTorch fetcher: the DataLoader only ever sees one item per step.

    Args:
        store: an open LabelStore.
        images: (N, C, H, W) float ``augment.to_model_input`` of the distilled images, or None to
            return the StoredBatch alone (replay on the training device instead).
        plan: the store positions to serve, in order (e.g. one training epoch assembled from the
            label pool); None serves every stored batch in store order.

    Item:
        ``(x, batch)`` with x (B, C, S, S) the replayed augmented images, or ``batch`` when images is None.
    """

    def __init__(self, store: LabelStore, images: torch.Tensor | None = None, plan: Sequence[int] | None = None):
        self.store = store
        self.images = images
        self.plan = np.arange(len(store)) if plan is None else np.asarray(plan, dtype=np.int64)
        self.out_size = int(store.spec.aug.out_size)
        if self.plan.size and (self.plan.min() < 0 or self.plan.max() >= len(store)):
            raise IndexError(f"plan refers to stored batches outside 0..{len(store) - 1}")
        if images is not None and images.shape[0] != store.spec.num_images:
            raise ValueError(
                f"images has {images.shape[0]} images, the label store was made for {store.spec.num_images}"
            )

    def __len__(self) -> int:
        return int(self.plan.size)

    def __getitem__(self, i: int) -> Any:
        batch = self.store.read(int(self.plan[i]))
        if self.images is None:
            return batch
        return augment.replay(self.images, batch, self.out_size), batch
