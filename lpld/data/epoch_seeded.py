"""Teacher-training order and augmentation as pure functions of (seed, epoch, sample).

A DataLoader that shuffles with one generator and augments with each worker's RNG produces a stream
that depends on the whole history of draws: a run resumed from ``last.ckpt`` re-creates the loader
and its workers, so the resumed epochs see other orders and other crops than an uninterrupted run,
and the teacher's bytes differ. Here every draw is keyed instead:

* ``EpochShardSampler``: the permutation of epoch ``e`` is ``randperm(n)`` from a generator seeded
  with ``(seed, e)`` (Lightning calls ``set_epoch`` before each epoch, also after a resume); under DDP
  rank ``r`` of ``W`` takes ``perm[r::W]`` (the remainder ``n mod W`` dropped, so ranks run equal step
  counts), so a global batch of ``B`` = ``W`` per-rank batches of ``B / W`` holds exactly the samples of
  the one-process batch;
* ``EpochSeededDataset``: item ``(i, e)`` runs the dataset's transform with torch's RNG seeded from
  ``(seed, e, i)`` (in a forked RNG state, so the caller's stream is untouched), whatever worker or
  rank serves it.

Rank and world size are read when iterating, from the initialised process group, so one loader
built before ``ddp_spawn`` forks its ranks shards correctly in each of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch.utils.data import Dataset, Sampler

_TAG_ORDER = 0x4F524452  # "ORDR"
_TAG_ITEM = 0x4954454D  # "ITEM"


def _seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])
    return int(state.generate_state(1, np.uint64)[0]) & 0x7FFFFFFFFFFFFFFF


def _rank_world() -> tuple[int, int]:
    if tdist.is_available() and tdist.is_initialized():
        return int(tdist.get_rank()), int(tdist.get_world_size())
    return 0, 1


class EpochShardSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` pairs: this rank's share of epoch ``epoch``'s order.

    Args:
        n: dataset length.
        seed: run seed (the teacher seed for squeeze).
        shuffle: permute per epoch (train) or keep ``range(n)`` (evaluation).
        drop_remainder: drop the last ``n mod W`` samples of the order so every rank gets ``n // W``
            (train: equal step counts); keep them for evaluation, where every sample counts once.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, drop_remainder: bool = True):
        self.n, self.seed, self.shuffle, self.drop_remainder = int(n), int(seed), bool(shuffle), bool(drop_remainder)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> list[int]:
        rank, world = _rank_world()
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed(self.seed, _TAG_ORDER, self.epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.drop_remainder:
            order = order[: self.n - self.n % world]
        return order[rank::world].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        e = self.epoch
        return iter([(i, e) for i in self._indices()])

    def __len__(self) -> int:
        rank, world = _rank_world()
        if self.drop_remainder:
            return self.n // world
        return len(range(rank, self.n, world))


class EpochSeededDataset(Dataset):
    """``dataset[i]`` with torch's RNG seeded from ``(seed, epoch, i)``; keys are ``(i, epoch)`` pairs.

    A plain integer key is served as epoch 0 (e.g. for a quick look at one item).
    """

    def __init__(self, dataset: Any, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        i, epoch = (int(key), 0) if isinstance(key, int | np.integer) else (int(key[0]), int(key[1]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed(self.seed, _TAG_ITEM, epoch, i))
            return self.dataset[i]
