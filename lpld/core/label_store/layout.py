"""Layout and storage accounting of a label store: one array per component (``array_layout``), rows located
by ``row_offsets``, per-batch CRC-32 slices, and the bytes each storage component takes (LPLD Table 21)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from lpld.core.label_store.spec import INDEX_ARRAYS, StoreSpec
from lpld.core.quant import label_arrays


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: name, full shape, dtype, the storage component it counts under and whether that is
    label or record storage (``accounting``'s ``labels_bytes`` / ``records_bytes``)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    component: str
    per: str  # "batch" (leading dim M or M+1) or "row" (leading dim R)
    storage: str = "record"  # "label": the label codec's arrays it declares as labels; "record": everything else

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


# array and component names of the store's own arrays (a label codec's arrays must not take them)
RESERVED_NAMES = frozenset(
    {"batch_ids", "row_offsets", "seeds", "sample_index", "crops", "flips", "mix_index", "lam", "box", "cutout"}
    | {"cutout_rgb", "patch_perm", "checksums", "batch_index", "seed", "crop_coords", "lambda", "cutout_box"}
    | {"cutout_fill", "checksum"}
)


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
        # optional records last: with the switches off the layout (and checksum columns) is unchanged
        if spec.aug.cutout_fill == "random":
            c_in = len(spec.aug.fill_mean or ())
            arrays.append(ArraySpec("cutout_rgb", (r, c_in), np.dtype(np.uint8), "cutout_fill", "row"))
        if spec.aug.shuffle_patches:
            f = spec.aug.shuffle_patches
            arrays.append(ArraySpec("patch_perm", (r, 2, f), np.dtype(np.uint8), "patch_perm", "row"))
    # the label codec declares its arrays and whether each counts as label or record storage
    for name, a in label_arrays(spec.quant, spec.num_classes).items():
        if name in RESERVED_NAMES:
            raise ValueError(
                f"label codec {spec.quant.mode!r} declares an array {name!r}, a name the store uses for its records; "
                "rename that array in the codec"
            )
        arrays.append(ArraySpec(name, (r, *a.shape), a.dtype, name, "row", a.storage))
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
    labels = sum(a.nbytes for a in arrays if a.storage == "label")
    return {
        "components": comp,
        "labels_bytes": labels,
        "records_bytes": total - labels,
        "total": total,
        "npy_headers": headers,
        "on_disk_arrays": total + headers,
    }


def predicted_bytes(spec: StoreSpec) -> int:
    """Bytes the store's arrays will take on disk (exact) plus a manifest allowance."""
    ids = spec.batch_ids()
    offs = row_offsets(spec, ids)
    return accounting(array_layout(spec, len(ids), int(offs[-1])))["on_disk_arrays"] + 64 * 1024
