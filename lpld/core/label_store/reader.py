"""Reading a label store: ``LabelStore.open`` (fast / full verification) and ``read(i)`` -> :class:`StoredBatch`
with its CRC-32s checked on every read."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format

from lpld.core import augment
from lpld.core.augment import AugRecord
from lpld.core.io import ArtifactError, read_json
from lpld.core.label_store.integrity import corrupt_store_error, full_sha256, old_format_error, sampled_sha256
from lpld.core.label_store.layout import batch_slices, crc32s
from lpld.core.label_store.spec import FORMAT, INDEX_ARRAYS, MANIFEST, StoreSpec, identity_diff


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
            raise corrupt_store_error(path, f"{MANIFEST} is unreadable: {e.__cause__}") from e
        if man.get("format") != FORMAT:
            if str(man.get("format", "")).startswith("lpld-label-store/"):
                raise old_format_error(path, man.get("format"))
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
        diff = identity_diff(self.manifest["identity"]["spec"], spec.to_dict())
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
                raise corrupt_store_error(self.path, f"array file {a['file']} is missing")
            size = f.stat().st_size
            if size != a.get("file_bytes"):
                raise corrupt_store_error(
                    self.path, f"{a['file']} has {size} bytes, manifest says {a.get('file_bytes')}"
                )
            try:
                with open(f, "rb") as fh:
                    version = npy_format.read_magic(fh)
                    read_header = (
                        npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
                    )
                    shape, fortran, dtype = read_header(fh)
            except (ValueError, OSError, SyntaxError) as e:
                raise corrupt_store_error(self.path, f"{a['file']} has a bad npy header: {e}") from e
            if list(shape) != a["shape"] or dtype.str != a["dtype"] or fortran:
                raise corrupt_store_error(
                    self.path, f"{a['file']} header says {shape} {dtype.str}, manifest {a['shape']}"
                )
            whole = full or Path(a["file"]).stem in INDEX_ARRAYS  # index arrays are small (8-16 bytes per batch)
            digest = full_sha256(f) if whole else sampled_sha256(f, size)
            if digest != a["sha256" if whole else "sampled_sha256"]:
                raise corrupt_store_error(
                    self.path, f"checksum mismatch in {a['file']} ({'full' if whole else 'sampled'} sha256)"
                )

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
            raise corrupt_store_error(
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
            if spec.aug.cutout_fill == "random":
                rec.cutout_rgb, rec.fill_norm = rows("cutout_rgb"), spec.aug.fill_norm
            if spec.aug.shuffle_patches:
                rec.patch_perm = rows("patch_perm").long()
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
