"""A torch Dataset over a label store whose item is a whole stored batch (``DataLoader(ds, batch_size=None)``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lpld.core import augment
from lpld.core.label_store.reader import LabelStore


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
