"""RelabelDataModule: the kept, still uncommitted batches of a label store, in groups, sharded across ranks.

Each item is a ``RelabelItem``: a group of up to ``batches_per_forward`` consecutive store positions
with, for each, its image indices and its augmentation record (drawn from the batch seed in the
DataLoader workers: a few numpy draws, no pixels). The pixels never leave the device: the module
holds the distilled images once as uint8 and replays the augmentation inside ``predict_step``
(``lpld.lit.relabel_module.RelabelModule``), so a worker ships a few hundred bytes per batch
instead of a float batch (128 x 3 x 224 x 224 x 4 B = 77 MB at ImageNet's batch 128).

Groups are fixed blocks of the *whole* store (positions ``[g k, (g + 1) k)``), dealt to ranks
``rank, rank + world, ...`` without padding: which stored batches share a teacher forward does not
depend on the world size or on where an interrupted run resumed, so neither can change a byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lpld.core import augment
from lpld.core.io import read_json
from lpld.core.label_store import MANIFEST, StoreSpec, done_bitmap
from lpld.lit.sharding import ShardSampler

# auto batches_per_forward fills a teacher forward up to this many rows (in21k's stored batch is 32;
# a forward of 32 ResNet-18 images leaves a large GPU mostly idle)
AUTO_ROWS = 256


@dataclass
class RelabelItem:
    """One teacher forward's worth of stored batches (host-only: never moved to the device).

    Attributes:
        positions: (G,) store positions.
        index: G tensors (B_g,) int64, the distilled images of each batch.
        records: G ``AugRecord`` s.
    """

    positions: list[int]
    index: list[torch.Tensor]
    records: list[augment.AugRecord]


def auto_batches_per_forward(batch_size: int, rows: int = AUTO_ROWS) -> int:
    """Stored batches per teacher forward when ``stage.batches_per_forward`` is null: fill ``rows`` rows."""
    return max(1, int(rows) // max(1, int(batch_size)))


def groups(num_batches: int, k: int, done: np.ndarray | None = None) -> list[list[int]]:
    """Fixed blocks ``[g k, (g + 1) k)`` of store positions, keeping the blocks with a batch still to do.

    A block is computed whole (its done batches are rewritten with the same bytes), so the teacher
    always sees the same groups. Commits happen between blocks, so on resume a block is all or nothing
    anyway unless ``chunk`` changed.
    """
    out = []
    for g0 in range(0, num_batches, k):
        blk = list(range(g0, min(num_batches, g0 + k)))
        if done is None or not all(done[i] for i in blk):
            out.append(blk)
    return out


class AugmentedGroups(Dataset):
    """Item j = ``RelabelItem`` of group ``blocks[j]`` (index + augmentation records only).

    Args:
        spec: the store spec.
        batch_ids: (M, 2) kept (epoch, batch) pairs; offsets: (M + 1,) row offsets.
        blocks: groups of store positions to serve.
    """

    def __init__(self, spec: StoreSpec, batch_ids: np.ndarray, offsets: np.ndarray, blocks: list[list[int]]):
        self.spec, self.batch_ids, self.offsets, self.blocks = spec, batch_ids, offsets, blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, j: int) -> RelabelItem:
        if j < 0:  # the placeholder of a rank with nothing left to do (see RelabelDataModule)
            return RelabelItem([], [], [])
        s = self.spec
        idxs, recs = [], []
        for i in self.blocks[j]:
            e, b = (int(v) for v in self.batch_ids[i])
            size = int(self.offsets[i + 1] - self.offsets[i])
            idx = augment.batch_indices(s.seed, e, b, s.num_images, s.batch_size)
            assert idx.numel() == size, "row offsets disagree with the schedule"
            idxs.append(idx)
            recs.append(augment.draw(s.aug, size, s.image_hw, augment.batch_seed(s.seed, e, b)))
        return RelabelItem(list(self.blocks[j]), idxs, recs)


def _identity(x: RelabelItem) -> RelabelItem:
    return x


class RelabelDataModule(L.LightningDataModule):
    """Predict-loop data for ``stage=relabel``: this rank's share of the groups still to compute.

    Args:
        store_path: a store prepared by ``lpld.core.label_store.prepare``.
        batches_per_forward: stored batches per teacher forward (None: ``auto_batches_per_forward``).
        num_workers: DataLoader workers (augmentation draws).
    """

    def __init__(self, store_path: str | os.PathLike, batches_per_forward: int | None = None, num_workers: int = 0):
        super().__init__()
        self.store_path = str(store_path)
        self.batches_per_forward = batches_per_forward
        self.num_workers = int(num_workers)
        self._ds: AugmentedGroups | None = None

    def setup(self, stage: str | None = None) -> None:
        path = Path(self.store_path)
        man = read_json(path / MANIFEST)
        spec = StoreSpec.from_dict(man["identity"]["spec"])
        ids = np.load(path / "batch_ids.npy").astype(np.int64)
        offs = np.load(path / "row_offsets.npy").astype(np.int64)
        k = self.batches_per_forward or auto_batches_per_forward(spec.batch_size)
        if int(k) < 1:
            raise ValueError(f"stage.batches_per_forward must be >= 1 or null (auto), got {k}")
        self._ds = AugmentedGroups(spec, ids, offs, groups(len(ids), int(k), done_bitmap(path, len(ids))))

    def predict_dataloader(self) -> DataLoader:
        assert self._ds is not None, "call setup() first"
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = int(self.trainer.global_rank), int(self.trainer.world_size)
        sampler: Any = ShardSampler(len(self._ds), rank=rank, world=world)
        if len(sampler) == 0:
            # fewer groups left than ranks (a small store, or a resume near the end): Lightning refuses an
            # empty rank, so this one gets a single empty item and writes nothing
            sampler = [-1]
        return DataLoader(
            self._ds,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_identity,
            persistent_workers=False,
        )
