"""Writing a label store: ``prepare`` (preallocate or check / resume), ``StoreWriter`` (one committed batch at
a time, per-rank progress bitmaps) and ``finalize`` (hashes, complete manifest, lock released)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format

from lpld.core import augment
from lpld.core.augment import AugRecord
from lpld.core.io import (
    ArtifactError,
    _launched_rank,
    acquire_lock,
    atomic_write_bytes,
    atomic_write_json,
    drop_aside,
    move_aside,
    read_json,
    release_lock,
)
from lpld.core.label_store.integrity import (
    array_files,
    corrupt_store_error,
    full_sha256,
    old_format_error,
    sampled_sha256,
)
from lpld.core.label_store.layout import (
    ArraySpec,
    accounting,
    array_layout,
    batch_slices,
    checksummed,
    crc32s,
    predicted_bytes,
    row_offsets,
)
from lpld.core.label_store.spec import FORMAT, MANIFEST, StoreSpec, identity, identity_diff, spec_achieved


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
            raise corrupt_store_error(path, f"{MANIFEST} is unreadable: {e.__cause__}") from e
        if old.get("format") != FORMAT and str(old.get("format", "")).startswith("lpld-label-store/"):
            raise old_format_error(path, old.get("format"))
        if old.get("format") == FORMAT and old.get("identity") == ident:
            if old.get("complete"):
                release_lock(path)  # nothing to write
                return "complete"
            return "resume"
        if not overwrite:
            diff = identity_diff(old.get("identity") or {}, ident)
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
    # the writer names its files itself; still checked, so a codec's array name can never be a path
    files = array_files(path, {a.name: {"file": f"{a.name}.npy"} for a in layout}, what="label codec layout")
    for a in layout:
        mm = npy_format.open_memmap(files[a.name], mode="w+", dtype=a.dtype, shape=a.shape)
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
            raise old_format_error(self.path, self.manifest.get("format"))
        self.spec = StoreSpec.from_dict(self.manifest["identity"]["spec"])
        self._sum_names = list(self.manifest["checksummed"])
        # every file name the manifest holds is checked before any is opened for writing (a crafted manifest
        # must not make a resumed relabel overwrite a file outside the store)
        files = array_files(self.path, self.manifest.get("arrays"))
        self._mm = {name: np.load(f, mmap_mode="r+") for name, f in files.items()}
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
            if "cutout_rgb" in mm:
                mm["cutout_rgb"][r0:r1] = _host(rec.cutout_rgb)
            if "patch_perm" in mm:
                mm["patch_perm"][r0:r1] = _host(rec.patch_perm)
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
    files = array_files(path, man.get("arrays"))
    for name, a in man["arrays"].items():
        f = files[name]
        size = f.stat().st_size
        a["file_bytes"] = size
        a["sha256"] = full_sha256(f)
        a["sampled_sha256"] = sampled_sha256(f, size)
    man["complete"] = True
    atomic_write_json(path / MANIFEST, man)
    for p in path.glob("progress.*.npy"):
        p.unlink()
    drop_aside(path)  # an overwritten store is deleted only now that its replacement is complete
    release_lock(path)
    return man
