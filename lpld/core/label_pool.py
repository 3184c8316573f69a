"""The student's label pool: which stored batches exist, and which of them each epoch replays.

Two random processes (LPLD Sec. 3.3.2, "Pruning Setting"):

1. **Candidate selection** (the pool). With ``metric=random`` the label store itself *is* the
   pool: relabel generated only the kept (1 - r) share of batches. With a pruning metric
   (Table 5a) the student reads a store generated at ``metric.source_prune`` (1x by default),
   scores every stored batch, and keeps ``pool_size(M, r)`` of them by ``select_pool``:
   the score of a batch is the mean of its per-sample scores (``lpld.core.prune_metrics``;
   higher = easier), ``order`` keeps the ``easy`` end, the ``hard`` end, ``uniform``
   (evenly spaced ranks) or ``random`` batches, after the calibration of Table 5b first
   discards a share of the easiest and/or hardest batches.
2. **Reuse** (the epoch plan). Every student epoch replays ``batches_per_epoch`` stored
   batches (the full schedule's count), chosen by ``epoch_plan``:

   * ``granularity="epoch"``: the pool in stored (epoch, batch) order, cycled: epoch e takes
     the consecutive slice [e * n, (e + 1) * n) modulo the pool size. When the pool holds
     whole stored epochs (epoch-level pruning) this is exactly "the stored epochs, cycled".
   * ``granularity="batch"`` (the improved label pool, ILP): batches drawn from any stored
     epoch, re-drawn every epoch from a generator seeded by (seed, epoch), so a resumed run
     replays the same draws. ``draw`` (``prune.draw``): ``with_replacement`` (default, the
     official trainer: ``torch.randint(0, len(pool))`` once per step of the epoch) or
     ``without_replacement`` (lpld before: a permutation of the pool, a fresh one appended when an
     epoch needs more batches than the pool holds).
   * ``swap_last`` (``relabel.drop_last=swap``, the default; batch granularity only): a drawn
     batch that is the last of its stored epoch is replaced by the stored batch before it
     (``swap_last_batches``), as the official trainer's ``step_list[i] = batch_idx - 1``.
"""

from __future__ import annotations

import math

import numpy as np

from lpld.core.pruning import num_kept

GRANULARITIES = ("epoch", "batch")
DRAWS = ("with_replacement", "without_replacement")  # prune.draw
ORDERS = ("easy", "hard", "uniform", "random")


def pool_size(total_batches: int, prune_ratio: float) -> int:
    """Number of batches a metric keeps at pruning ratio r: the relabel stage's count.

    Same rule as random pruning at generation time (``lpld.core.pruning.num_kept``), so a
    metric-selected pool and a random store at the same ratio hold the same number of batches.

    Args:
        total_batches: M, batches in the source store.
        prune_ratio: r in [0, 1).
    """
    return num_kept(int(total_batches), float(prune_ratio))


def easy_to_hard(scores: np.ndarray) -> np.ndarray:
    """Indices of ``scores`` sorted from easiest (highest score) to hardest; ties by index.

    Args:
        scores: (M,) per-batch easiness scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    # lexsort sorts by the last key first: primary -score (descending score), secondary index.
    return np.lexsort((np.arange(len(scores)), -scores))


def select_pool(
    scores: np.ndarray,
    keep: int,
    order: str,
    drop_easy: float = 0.0,
    drop_hard: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Metric-based candidate selection with calibration (LPLD Table 5a/5b).

    The batches are ranked easiest -> hardest; the first ``floor(drop_easy * M)`` and the last
    ``floor(drop_hard * M)`` are discarded (calibration); of the remaining ranks ``keep`` are
    chosen: ``easy`` the first ones, ``hard`` the last ones, ``uniform`` evenly spaced ranks
    (including both ends), ``random`` a seeded random subset.

    Args:
        scores: (M,) per-batch scores, higher = easier.
        keep: number of batches to keep (``pool_size``).
        order: one of ORDERS.
        drop_easy: share of the easiest batches discarded first, in [0, 1).
        drop_hard: share of the hardest batches discarded first, in [0, 1).
        seed: seed of the ``random`` order.

    Returns:
        (keep,) sorted int64 indices into ``scores`` (stored order, so epoch plans are stable).
    """
    if order not in ORDERS:
        raise ValueError(f"unknown metric order '{order}'; valid: {', '.join(ORDERS)}")
    m = len(scores)
    if not (0.0 <= drop_easy < 1.0 and 0.0 <= drop_hard < 1.0):
        raise ValueError(f"calibration shares must be in [0, 1), got drop_easy={drop_easy}, drop_hard={drop_hard}")
    ranked = easy_to_hard(scores)
    n_easy = int(math.floor(drop_easy * m))
    n_hard = int(math.floor(drop_hard * m))
    ranked = ranked[n_easy : m - n_hard]
    if keep < 1 or keep > len(ranked):
        raise ValueError(
            f"cannot keep {keep} of {m} batches after discarding {n_easy} easiest and {n_hard} hardest "
            f"({len(ranked)} left); lower the calibration shares (metric.drop_easy / metric.drop_hard) "
            "or the pruning ratio"
        )
    if order == "easy":
        chosen = ranked[:keep]
    elif order == "hard":
        chosen = ranked[len(ranked) - keep :]
    elif order == "uniform":
        pos = np.unique(np.round(np.linspace(0, len(ranked) - 1, keep)).astype(np.int64))
        chosen = ranked[pos]
    else:
        rng = np.random.default_rng([int(seed), 0x900D])
        chosen = rng.choice(ranked, size=keep, replace=False)
    return np.sort(chosen.astype(np.int64))


def stored_order(batch_ids: np.ndarray) -> np.ndarray:
    """Permutation putting stored batches in (epoch, batch_in_epoch) order.

    Args:
        batch_ids: (M, 2) int array of (stored epoch, batch index within that epoch).
    """
    batch_ids = np.asarray(batch_ids)
    if batch_ids.ndim != 2 or batch_ids.shape[1] != 2:
        raise ValueError(f"batch_ids must be (M, 2) (epoch, batch), got shape {batch_ids.shape}")
    return np.lexsort((batch_ids[:, 1], batch_ids[:, 0]))


def swap_last_batches(pool: np.ndarray, batch_ids: np.ndarray, batches_per_epoch: int) -> dict[int, int]:
    """Replacement of each pool row that is the last batch of its stored epoch (``drop_last=swap``).

    The official trainer (``batch_to_epoch``, flat index i = epoch x n + batch) trains batch ``i - 1`` whenever it
    draws an i with ``(i + 1) % n == 0``; its pool is the first K batches, so ``i - 1`` is always stored. Here the
    replacement is the nearest stored batch before it in (epoch, batch) order that is not itself a last batch,
    which is ``i - 1`` for that pool; for a random pool (``prune.pool_select=random``) ``i - 1`` may be missing, and
    the search goes further back (cyclically). With no such batch in the pool (or n < 2) nothing is replaced.

    Args:
        pool: (P,) store rows of the label pool.
        batch_ids: (M, 2) (stored epoch, batch) of every store row.
        batches_per_epoch: n.

    Returns:
        {pool row that is a last batch: store row trained instead}.
    """
    n = int(batches_per_epoch)
    pool = np.asarray(pool, dtype=np.int64)
    if n < 2 or len(pool) == 0:
        return {}
    ordered = pool[stored_order(np.asarray(batch_ids)[pool])]
    last = np.asarray(batch_ids)[ordered, 1] == n - 1
    full = np.flatnonzero(~last)
    if len(full) == 0:
        return {}
    pos = np.flatnonzero(last)
    prev = np.searchsorted(full, pos) - 1  # the last full position before each last batch; -1: wrap to the end
    repl = full[np.where(prev >= 0, prev, len(full) - 1)]
    return dict(zip(ordered[pos].tolist(), ordered[repl].tolist(), strict=True))


def epoch_plan(
    pool: np.ndarray,
    batch_ids: np.ndarray,
    batches_per_epoch: int,
    epoch: int,
    granularity: str,
    seed: int,
    draw: str = "with_replacement",
    swap_last: bool = True,
) -> np.ndarray:
    """Stored-batch rows replayed in student epoch ``epoch`` (see the module docstring).

    Args:
        pool: (P,) rows of the store that form the label pool.
        batch_ids: (M, 2) (stored epoch, batch) of every store row.
        batches_per_epoch: n, batches in one student epoch (the full schedule's count).
        epoch: 0-based student epoch.
        granularity: ``epoch`` or ``batch``.
        seed: run seed (``batch`` draws use the generator seeded by (seed, epoch)).
        draw: ``with_replacement`` (official) or ``without_replacement`` (``batch`` granularity).
        swap_last: replace drawn last batches of a stored epoch (``swap_last_batches``; ``batch`` granularity).

    Returns:
        (n,) int64 store rows, in training order.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown pool granularity '{granularity}'; valid: {', '.join(GRANULARITIES)}")
    if draw not in DRAWS:
        raise ValueError(f"unknown pool draw '{draw}'; valid: {', '.join(DRAWS)} (prune.draw)")
    pool = np.asarray(pool, dtype=np.int64)
    if len(pool) == 0:
        raise ValueError("the label pool is empty")
    if batches_per_epoch < 1:
        raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
    n = int(batches_per_epoch)
    if granularity == "epoch":
        ordered = pool[stored_order(np.asarray(batch_ids)[pool])]
        start = (epoch * n) % len(ordered)
        return ordered[(start + np.arange(n)) % len(ordered)]
    rng = np.random.default_rng([int(seed), int(epoch), 0x1B])
    if draw == "with_replacement":
        draws = pool[rng.integers(0, len(pool), size=n)]
    else:
        reps = -(-n // len(pool))
        draws = np.concatenate([rng.permutation(pool) for _ in range(reps)])[:n]
    swap = swap_last_batches(pool, batch_ids, n) if swap_last else {}
    return np.array([swap.get(int(r), int(r)) for r in draws], dtype=np.int64) if swap else draws


def shard_plan(plan: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """A batch-level split of an epoch plan: rows rank, rank + W, ...; padded by wrapping.

    Not what the student does: giving each rank whole stored batches makes the global batch W x the
    recipe's with 1/W of the optimizer steps (and replays the wrapped batches twice). The student serves
    the whole plan on every rank and splits each stored batch's rows instead
    (``lpld.lit.student_module.rank_rows``), so the recipe does not change with W. Kept for callers that
    want disjoint whole batches per rank (e.g. read-only scoring).

    Args:
        plan: (n,) store rows of the epoch.
        rank: this process's rank.
        world_size: W.
    """
    if world_size <= 1:
        return np.asarray(plan, dtype=np.int64)
    n = len(plan)
    per_rank = -(-n // world_size)
    idx = (rank + world_size * np.arange(per_rank)) % n
    return np.asarray(plan, dtype=np.int64)[idx]
