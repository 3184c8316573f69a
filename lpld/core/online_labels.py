"""Online soft labels (issue 21, item 2): no label store; the teacher labels each augmented batch during student
training (the SRe2L / RDED "online" protocol).

:class:`OnlineSchedule` stands where a label store stands for the student's data pipeline: the full 1x schedule of a
:class:`~lpld.core.label_store.StoreSpec` (every epoch's every batch), whose ``read(i)`` returns the batch's image
indices and augmentation record drawn exactly as ``lpld.core.relabel.generate`` draws them (the epoch's seeded image
order, ``augment.draw`` from ``augment.batch_seed(seed, epoch, batch)``), with no label array. The student module
runs the teacher on the replayed batch and decodes its logits like a ``quant=none`` store (:func:`teacher_logits`).
So the online student at batch (e, b) sees the same crops as a 1x store of the same spec, and its target differs
from the stored one only by the store's fp16 rounding of the logits.

Nothing is shipped for labels or records; the teacher is (``storage_accounting.model_bytes``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from lpld.core import augment
from lpld.core.label_store import StoredBatch, StoreSpec
from lpld.core.label_store.layout import row_offsets
from lpld.core.quant import QuantConfig

LABEL_SOURCES = ("stored", "online", "generator")  # student.labels


def online_spec(spec: StoreSpec) -> StoreSpec:
    """The spec of the schedule an online student trains on: ``spec`` unpruned (every epoch's every batch), its
    labels the teacher's full logits (quant none), its records drawn from seeds (nothing stored either way)."""
    return dataclasses.replace(
        spec, prune_name="1x", prune_ratio=0.0, granularity="epoch", quant=QuantConfig("none"), record_mode="seed"
    )


class OnlineSchedule:
    """The full schedule of ``spec`` as a label store without labels (see the module docstring).

    Offers what the student's data pipeline reads of a ``LabelStore``: ``len``, ``spec``, ``batch_ids``,
    ``manifest`` (the schedule's keys, ``accounting`` all 0) and ``read(i)``. Picklable.
    """

    def __init__(self, spec: StoreSpec, meta: dict[str, Any] | None = None):
        self.spec = online_spec(spec)
        self._ids = self.spec.batch_ids()
        self._offsets = row_offsets(self.spec, self._ids)
        sd = self.spec.to_dict()
        keys = ("num_images", "num_classes", "image_hw", "batch_size", "epochs", "batches_per_epoch")
        self.manifest: dict[str, Any] = {
            **{k: sd[k] for k in keys},
            "granularity": "epoch",
            "prune": sd["prune"],
            "quant": sd["quant"],
            "aug": sd["aug"],
            "record_mode": "online",
            "seed": self.spec.seed,
            "num_batches": len(self._ids),
            "num_rows": int(self._offsets[-1]),
            "accounting": {"total": 0, "labels_bytes": 0, "records_bytes": 0, "components": {}, "npy_headers": 0},
            **(meta or {}),
        }

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def batch_ids(self) -> np.ndarray:
        """(M, 2) int64 (epoch, batch) of every batch of the schedule, sorted."""
        return self._ids.astype(np.int64)

    def read(self, i: int) -> StoredBatch:
        """Batch i: its image indices and augmentation record (no label arrays; ``labels`` is empty)."""
        if not 0 <= i < len(self):
            raise IndexError(f"batch {i} out of range 0..{len(self) - 1}")
        spec = self.spec
        e, b = (int(v) for v in self._ids[i])
        size = int(self._offsets[i + 1] - self._offsets[i])
        perm = augment.epoch_permutation(spec.seed, e, spec.num_images)
        index = torch.from_numpy(perm[b * spec.batch_size : b * spec.batch_size + size].copy())
        rec = augment.draw(spec.aug, size, spec.image_hw, augment.batch_seed(spec.seed, e, b))
        return StoredBatch(index, rec, {}, e, b, i, quant=spec.quant, num_classes=spec.num_classes)


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C) float32 logits of the teacher (eval mode, no autocast) on the augmented batch ``x``."""
    teacher.eval()
    with torch.autocast(device_type=x.device.type, enabled=False):
        return teacher(x.float()).float()


def with_teacher_logits(batch: StoredBatch, logits: torch.Tensor) -> StoredBatch:
    """``batch`` carrying ``logits`` as its ``quant=none`` label array (decoded like a stored fp32 logit row)."""
    return StoredBatch(
        batch.index,
        batch.aug,
        {"logits": logits},
        batch.epoch,
        batch.batch,
        batch.position,
        quant=batch.quant,
        num_classes=batch.num_classes,
    )
