"""Reading a label store: ``LabelStore.open`` (fast / full verification) and ``read(i)`` -> :class:`StoredBatch`
with its CRC-32s checked on every read."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format

from lpld.core import augment
from lpld.core.augment import AugRecord
from lpld.core.io import ArtifactError, read_json
from lpld.core.label_store.integrity import (
    array_files,
    corrupt_store_error,
    full_sha256,
    old_format_error,
    sampled_sha256,
)
from lpld.core.label_store.layout import batch_slices, crc32s
from lpld.core.label_store.spec import FORMAT, INDEX_ARRAYS, MANIFEST, StoreSpec, identity_diff
from lpld.core.quant import QuantConfig, array_names

# the dataclass fields of StoredBatch; any other public attribute is one of its label arrays
_BATCH_FIELDS = ("index", "aug", "labels", "epoch", "batch", "position", "quant", "num_classes", "gen_temperature")


@dataclass(init=False)
class StoredBatch:
    """One stored batch, as read from a label store.

    The label arrays are whatever the store's codec declares (``lpld.core.quant``), held generically in
    ``labels``; each also reads as an attribute (``batch.logits``, ``batch.topk_indices``; None when the
    store's codec has no array of that name) and ``StoredBatch(..., logits=z)`` / ``batch.logits = z`` put one.

    Attributes:
        index: (B,) int64 distilled-image indices.
        aug: its augmentation record (``lpld.core.augment.replay`` rebuilds the labelled tensor).
        labels: name -> (B, ...) tensor of each codec array (``LabelCodec.to_tensor``: wide unsigned
            integers as int64), e.g. ``logits`` (B, C) float16 for quant none.
        epoch, batch: position of the batch in the full schedule.
        position: row i of the store (``store.read(i)``).
        quant: the store's QuantConfig (codec and its parameters), or None.
        num_classes: C (0 when unknown).
        gen_temperature: overrides ``quant.temperature`` as the temperature the stored values were computed at
            (``quant.decode``); None: the store's.
    """

    index: torch.Tensor
    aug: AugRecord
    labels: dict[str, torch.Tensor]
    epoch: int
    batch: int
    position: int
    quant: QuantConfig | None
    num_classes: int
    gen_temperature: float | None

    def __init__(
        self,
        index: torch.Tensor,
        aug: AugRecord,
        labels: dict[str, torch.Tensor] | None = None,
        epoch: int = -1,
        batch: int = -1,
        position: int = -1,
        quant: QuantConfig | None = None,
        num_classes: int = 0,
        gen_temperature: float | None = None,
        **arrays: torch.Tensor | None,
    ):
        self.index, self.aug = index, aug
        self.labels = dict(labels or {})
        self.labels.update({k: v for k, v in arrays.items() if v is not None})
        self.epoch, self.batch, self.position = epoch, batch, position
        self.quant, self.num_classes, self.gen_temperature = quant, num_classes, gen_temperature

    def __getattr__(self, name: str) -> Any:  # only called for names that are not fields or methods
        labels = self.__dict__.get("labels", {})
        if name in labels:
            return labels[name]
        if not name.startswith("_") and name in array_names():
            return None  # an array of another codec: absent from this store
        raise AttributeError(f"StoredBatch has no field or label array {name!r} (its arrays: {sorted(labels)})")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _BATCH_FIELDS or name.startswith("_"):
            object.__setattr__(self, name, value)
        elif value is None:
            self.labels.pop(name, None)
        else:
            self.labels[name] = value

    def __len__(self) -> int:
        return int(self.index.numel())

    def decode(self, temperature: float) -> torch.Tensor:
        """(B, C) float32 teacher target at ``temperature``: the store's codec decodes its arrays."""
        if self.quant is None or self.num_classes <= 0:
            raise ValueError("this StoredBatch has no quant config / num_classes; read it with LabelStore.read")
        cfg = self.quant
        if self.gen_temperature is not None:
            cfg = replace(cfg, temperature=float(self.gen_temperature))
        return cfg.codec.decode(self.labels, cfg, float(temperature), int(self.num_classes))


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
        files = array_files(self.path, self.manifest.get("arrays"))  # all checked before any is opened
        for name, a in self.manifest["arrays"].items():
            f = files[name]
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
            files = array_files(self.path, self.manifest.get("arrays"))  # verify="none" opens here first
            self._mm = {n: np.load(f, mmap_mode="r") for n, f in files.items()}
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
        codec = spec.quant.codec
        labels: dict[str, torch.Tensor] = {}
        for name in codec.arrays(spec.quant, spec.num_classes):
            if name not in mm:
                raise corrupt_store_error(
                    self.path, f"the manifest lists no {name}.npy, which quant={spec.quant.mode} stores"
                )
            labels[name] = codec.to_tensor(name, mm[name][r0:r1])
        out = StoredBatch(index, rec, labels, e, b, i, quant=spec.quant, num_classes=spec.num_classes)
        return out


def disk_bytes(path: str | os.PathLike) -> int:
    """Sum of the sizes of every file in a store directory (manifest included)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())
