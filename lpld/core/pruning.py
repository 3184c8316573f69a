"""Label pruning at generation time: which batches of the full relabel schedule are computed.

The full FKD-style schedule has ``epochs x batches_per_epoch`` augmented batches (one per
student step). Label pruning at ratio ``r`` (LPLD Sec. 3.3; ``10x`` = r 0.9, ``100x`` = r 0.99)
keeps a fraction ``1 - r`` of them. Because the selection is random and made before any
label is computed, generating only the kept batches is equivalent to generating everything
and discarding, and ``1 / (1 - r)`` times cheaper.

Granularity:
    * ``epoch``: keep whole epochs (all batches of the chosen epochs), LPLD's plain pruning.
    * ``batch``: keep individual batches from any epoch: the "improved label pool" (ILP), from
      which the student later assembles each training epoch out of batches of different epochs.

Which units are kept (``prune.pool_select``):
    * ``first`` (default, the official trainer): the first K units of the schedule in (epoch, batch) order,
      ``pool[:int((1 - r) * total)]`` (``train_FKD_label_pruning_batch.py``; LPQLD ``train_FKD_LPQLD.py`` the same).
    * ``random``: a seeded random subset of K units, as the paper's text describes (lpld before).

Kept count: ``max(1, floor(units x (1 - r) + 1e-6))`` units (epochs or batches). The official code's
``int(total * (1 - r))`` floors the same except where ``1 - r`` is not exact in binary: at r = 0.9 it keeps one
unit fewer (``23700 x 0.09999999999999998`` -> 2369); the 1e-6 absorbs that error (documented difference).
"""

from __future__ import annotations

import math

import numpy as np

GRANULARITIES = ("epoch", "batch")
POOL_SELECTS = ("first", "random")  # prune.pool_select: official first K | lpld's random subset

# Domain tags keep the random streams of different purposes independent for the same seed.
_TAG_PRUNE = 0x5052554E  # "PRUN"


# swap: the official pair (the generator stores the short last batch, the trainer never trains on the last batch of an
# epoch: ``label_pool.swap_last_batches``); auto / true / false decide whether the store holds it at all.
DROP_LAST_MODES = ("swap", "auto", "true", "false")


def batches_per_epoch(num_images: int, batch_size: int, drop_last: bool = False) -> int:
    """``ceil(N / B)``: a short last batch is kept (with its own size and augmentation); ``floor(N / B)`` with
    ``drop_last`` (the N mod B images at the end of each epoch's order are not seen that epoch)."""
    if num_images <= 0 or batch_size <= 0:
        raise ValueError(f"need num_images > 0 and batch_size > 0, got {num_images}, {batch_size}")
    return num_images // batch_size if drop_last else math.ceil(num_images / batch_size)


def resolve_drop_last(mode: str | bool, prune_ratio: float, num_images: int, batch_size: int) -> bool:
    """Whether the short last batch of each epoch is dropped from the relabel schedule.

    ``swap`` (the default) never drops it: the main-table scripts call the official generator without
    ``--prune_ratio`` (so ``drop_last`` is false and every batch is stored, ceil(N / B) per epoch) and the trainer
    swaps the last batch of an epoch for the previous one when it draws it (``swaps_last_batch``). ``auto`` (lpld's
    default before issue 20) is the official generator's own rule when it is given a ratio
    (``generate_soft_label_pruning.py``: ``drop_last = prune_ratio > 0``, i.e. drop it only when pruning; the paper:
    "For label pruning, we exclude the last batch"), except when an epoch has no full batch (N < B), where dropping
    would leave nothing (the official loader would yield zero batches): the one short batch is then kept. ``true``
    drops it also unpruned (refused when N < B), ``false`` keeps it always and trains on it.
    """
    m = str(mode).lower()
    if m not in DROP_LAST_MODES:
        raise ValueError(f"drop_last must be one of {DROP_LAST_MODES}, got {mode!r}")
    if m == "swap":
        return False
    if m == "auto":
        return prune_ratio > 0 and num_images % batch_size != 0 and num_images >= batch_size
    if m == "true" and num_images < batch_size:
        raise ValueError(
            f"drop_last=true with {num_images} images and batch size {batch_size} leaves no batch; "
            "set relabel drop_last=auto or false, or a smaller batch size"
        )
    return m == "true" and num_images % batch_size != 0


def swaps_last_batch(mode: str | bool, batches_per_epoch: int) -> bool:
    """Whether the student replaces every drawn last batch of an epoch by the batch before it (``drop_last=swap``).

    The official ``batch_to_epoch`` trainer rewrites each drawn index with ``(i + 1) % n == 0`` to ``i - 1``, short or
    not, at every ratio (1x included). With one batch per epoch (N <= B) there is no batch before it in the epoch, so
    nothing is swapped (the official rewrite would point at the previous epoch's, or at index -1).
    """
    return str(mode).lower() == "swap" and int(batches_per_epoch) >= 2


def batch_size_of(batch: int, num_images: int, batch_size: int) -> int:
    """Number of images in batch ``batch`` of an epoch (the last one may be short)."""
    return min(batch_size, num_images - batch * batch_size)


def num_kept(units: int, ratio: float) -> int:
    """How many of ``units`` survive pruning at ratio ``ratio`` (at least one)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    return max(1, min(units, math.floor(units * (1.0 - ratio) + 1e-6)))


def select_batches(
    epochs: int, batches_per_epoch: int, ratio: float, granularity: str, seed: int, select: str = "first"
) -> np.ndarray:
    """The kept batches of the full schedule, sorted by (epoch, batch).

    Args:
        epochs: student epochs E of the full schedule.
        batches_per_epoch: batches per epoch, ``ceil(N / B)`` (``floor`` when the short last batch is dropped).
        ratio: pruning ratio r in [0, 1).
        granularity: "epoch" (whole epochs) or "batch" (individual batches from any epoch).
        seed: selection seed of ``random`` (same seed => same selection, whatever the ranks or the resume point).
        select: ``first`` (the first K units of the schedule, the official trainer) or ``random`` (a seeded subset).

    Returns:
        (M, 2) int64 array of (epoch, batch_in_epoch), lexicographically sorted.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"prune granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if select not in POOL_SELECTS:
        raise ValueError(f"prune pool_select must be one of {POOL_SELECTS}, got {select!r}")
    if epochs <= 0 or batches_per_epoch <= 0:
        raise ValueError(f"need epochs > 0 and batches_per_epoch > 0, got {epochs}, {batches_per_epoch}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), _TAG_PRUNE])))

    def pick(units: int) -> np.ndarray:
        k = num_kept(units, ratio)
        return np.arange(k) if select == "first" else np.sort(rng.permutation(units)[:k])

    if granularity == "epoch":
        keep = pick(epochs)
        ep = np.repeat(keep, batches_per_epoch)
        b = np.tile(np.arange(batches_per_epoch), len(keep))
    else:
        total = epochs * batches_per_epoch
        flat = pick(total)
        ep, b = flat // batches_per_epoch, flat % batches_per_epoch
    return np.stack([ep, b], axis=1).astype(np.int64)
