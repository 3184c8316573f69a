"""What a label store holds: :class:`StoreSpec` (schedule, pruning, quantization, records), the format
constants, the compression actually achieved and the identity an existing store must match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lpld.core.augment import AugConfig
from lpld.core.io import ArtifactError
from lpld.core.pruning import POOL_SELECTS, batches_per_epoch, select_batches
from lpld.core.quant import QuantConfig

FORMAT = "lpld-label-store/2"


# arrays written once by ``prepare`` (hashed fully by verify="fast"); every other array is written per batch
# and checksummed per batch
INDEX_ARRAYS = ("batch_ids", "row_offsets", "seeds", "checksums")


MANIFEST = "manifest.json"


RECORD_MODES = ("explicit", "seed")


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
        drop_last: the short last batch of each epoch is left out of the schedule (resolved by
            ``pruning.resolve_drop_last``; true only when N mod B != 0).
        pool_select: which units pruning keeps: ``first`` K of the schedule (official) or a ``random`` subset.
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
    drop_last: bool = False
    pool_select: str = "first"

    def __post_init__(self) -> None:
        if self.record_mode not in RECORD_MODES:
            raise ValueError(f"record_mode must be one of {RECORD_MODES}, got {self.record_mode!r}")
        if self.num_images <= 0 or self.num_classes <= 1 or self.batch_size <= 0 or self.epochs <= 0:
            raise ValueError(
                "need num_images > 0, num_classes > 1, batch_size > 0, epochs > 0; got "
                f"{self.num_images}, {self.num_classes}, {self.batch_size}, {self.epochs}; set relabel.epochs and "
                "relabel.batch_size or dataset.recipe.student.epochs / batch_size to positive values"
            )
        if self.pool_select not in POOL_SELECTS:
            raise ValueError(f"prune.pool_select must be {'|'.join(POOL_SELECTS)}, got {self.pool_select!r}")
        if self.prune_ratio <= 0:  # nothing pruned: every selection keeps the whole schedule (one identity)
            object.__setattr__(self, "pool_select", "first")
        if max(self.image_hw) > 65535:
            raise ValueError(f"image side {max(self.image_hw)} exceeds the uint16 crop coordinates (65535)")
        if self.drop_last and self.num_images < self.batch_size:
            raise ValueError(
                f"drop_last with {self.num_images} images and batch size {self.batch_size} leaves no batch per epoch"
            )
        self.quant.validate(self.num_classes)

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.num_images, self.batch_size, self.drop_last)

    def batch_ids(self) -> np.ndarray:
        """(M, 2) int64 kept (epoch, batch) pairs, sorted."""
        return select_batches(
            self.epochs, self.batches_per_epoch, self.prune_ratio, self.granularity, self.seed, self.pool_select
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "image_hw": list(self.image_hw),
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "batches_per_epoch": self.batches_per_epoch,
            # pool_select only when it is not the random subset every store before issue 20 holds (their identity
            # stays); unpruned stores hold every batch either way and keep one identity
            "prune": {
                "name": self.prune_name,
                "ratio": self.prune_ratio,
                "granularity": self.granularity,
                **({"select": self.pool_select} if self.pool_select != "random" and self.prune_ratio > 0 else {}),
            },
            "quant": self.quant.to_dict(),
            "aug": self.aug.to_dict(),
            "record_mode": self.record_mode,
            "seed": self.seed,
            # only when set: stores that keep the short batch (all stores written before the switch) keep
            # their identity, and a store that drops it differs in batches_per_epoch and here
            **({"drop_last": True} if self.drop_last else {}),
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
            pool_select=str(d["prune"].get("select", "random" if float(d["prune"]["ratio"]) > 0 else "first")),
            quant=QuantConfig(**d["quant"]),
            aug=AugConfig.from_dict(d["aug"]),
            record_mode=str(d["record_mode"]),
            seed=int(d["seed"]),
            drop_last=bool(d.get("drop_last", False)),
        )


RATIO_WARN = 1.05  # achieved / requested compression factor beyond this: a warning, and the record says so


# Beyond this the run is refused: a table would call e.g. a 6x store "100x". 4x, not less: tiny schedules (the
# reduced demo: 4 stored batches at 10x keep 1 = 4x) must still run, with a warning and the achieved ratio recorded.
RATIO_REFUSE = 4.0


def achieved_ratio(
    units: int, kept: int, requested: float, name: str, what: str = "the schedule", granularity: str = "batch"
) -> dict[str, Any]:
    """The pruning actually achieved when ``kept`` of ``units`` survive a requested ratio, checked.

    Args:
        units: stored batches (granularity batch) or epochs (granularity epoch) of the full schedule.
        kept: how many of them are kept.
        requested: the requested ratio r (``prune.ratio``).
        name: its name ("100x").
        what: what the units are, for the message.
        granularity: the pool's granularity (the advice names ``prune.granularity=batch`` only when it is not).

    Returns:
        {"ratio": 1 - kept / units, "factor": units / kept, "requested_factor", "off": bool (beyond RATIO_WARN)}.

    Raises:
        ArtifactError: the achieved factor is more than RATIO_REFUSE away from the requested one (names the fix).
    """
    factor = units / max(1, kept)
    want = 1.0 / (1.0 - requested)
    off = max(factor / want, want / factor)
    if off > RATIO_REFUSE:
        finer = "" if granularity == "batch" else "use prune.granularity=batch (finer units), "
        raise ArtifactError(
            f"prune={name} asks for {want:.1f}x but {what} has only {units} units, so keeping {kept} gives "
            f"{factor:.1f}x; lengthen the schedule (more student epochs: relabel.epochs / "
            f"dataset.recipe.student.epochs, or a smaller batch size), {finer}or choose a lower ratio (e.g. prune=10x)"
        )
    return {"ratio": 1.0 - kept / units, "factor": factor, "requested_factor": want, "off": off > RATIO_WARN}


def spec_achieved(spec: StoreSpec) -> dict[str, Any]:
    """``achieved_ratio`` of a store spec (O(1): counts only)."""
    from lpld.core.pruning import num_kept

    units = spec.epochs if spec.granularity == "epoch" else spec.epochs * spec.batches_per_epoch
    what = f"the schedule ({spec.epochs} epochs x {spec.batches_per_epoch} batches, granularity {spec.granularity})"
    if spec.prune_ratio <= 0:
        return {"ratio": 0.0, "factor": 1.0, "requested_factor": 1.0, "off": False}
    return achieved_ratio(
        units, num_kept(units, spec.prune_ratio), spec.prune_ratio, spec.prune_name, what, spec.granularity
    )


def identity(spec: StoreSpec, meta: dict[str, Any]) -> dict[str, Any]:
    """What must match for an existing store to be resumed or reused: spec + fingerprints."""
    return {
        "spec": spec.to_dict(),
        "images_fingerprint": meta.get("images_fingerprint"),
        "teacher_fingerprint": meta.get("teacher_fingerprint"),
    }


def identity_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = identity_diff(a, b, f"{prefix}{k}.")
            if sub:
                diffs.append(sub)
        elif a != b:
            diffs.append(f"{prefix}{k}: store has {a!r}, config asks {b!r}")
    return "; ".join(diffs)
