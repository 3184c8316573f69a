"""DD-Ranking's label-robust scores (NUS-HPC-AI-Lab/DD-Ranking, ``doc/introduction.md`` and
``ddranking/metrics/soft_label.py``): how much of a method's accuracy the distilled images earn themselves.

With accuracies as *fractions* in [0, 1]:

* IOR (improvement over random) = acc(method, its label recipe) - acc(random real images, the same recipe);
* HLR (hard label recovery) = acc(real training set, hard labels) - acc(method's images, hard labels);
* LRS (label-robust score) = (e^a - e^-1) / (e - e^-1) with a = w IOR - (1 - w) HLR, w = 0.5.

a lies in [-1, 1] when the accuracies are fractions, so LRS lies in [0, 1] (DD-Ranking's docs print it x 100%).
DD-Ranking's code applies the same expression to accuracies in percent, where e^a is no longer normalised; we
follow the documented definition (fractions), which is the one whose normalisation holds. DD-Ranking averages
the per-round LRS over its evaluation rounds: :func:`scores_from_records` does the same, pairing rounds by seed,
when the method, random-real and hard rows share the same seeds; otherwise it scores the seed means (IOR and HLR
are linear, so their means are the same either way).

In the results records: the method row is any record; its random-real row has ``method == "random_real"`` and
every other identity field equal (same label recipe: prune, quant, metric, student, epochs); its hard row is the
same method / images trained with ``labels == "hard"`` (``student=hard``); the real-hard accuracy comes from a
record with ``method == "full_real"`` of the same dataset and student model, or is given by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lpld.report.accounting import is_hard
from lpld.report.table import canonical, get_field

DEFAULT_W = 0.5
RANDOM_METHOD = "random_real"
FULL_REAL_METHOD = "full_real"
# fields a row and its references must share (the method's images: everything but the label recipe)
IMAGE_FIELDS = ("dataset", "teacher", "ipc", "student_model")
# the label recipe: the random-real row must share these too
RECIPE_FIELDS = ("prune", "quant", "metric", "student", "epochs")


def improvement_over_random(acc_method: float, acc_random: float) -> float:
    """IOR = acc(method) - acc(random real, same label recipe); accuracies as fractions."""
    return float(acc_method) - float(acc_random)


def hard_label_recovery(acc_real_hard: float, acc_method_hard: float) -> float:
    """HLR = acc(full real data, hard labels) - acc(method's images, hard labels); accuracies as fractions."""
    return float(acc_real_hard) - float(acc_method_hard)


def label_robust_score(ior: float, hlr: float, w: float = DEFAULT_W) -> float:
    """LRS = (e^a - e^-1) / (e - e^-1), a = w IOR - (1 - w) HLR (in [0, 1] for IOR, HLR in [-1, 1])."""
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"the LRS weight w must lie in [0, 1], got {w}")
    a = w * float(ior) - (1.0 - w) * float(hlr)
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


@dataclass(frozen=True)
class DDRankingScores:
    """IOR / HLR / LRS of one row (None where its reference rows are missing)."""

    ior: float | None
    hlr: float | None
    lrs: float | None


def _acc(rec: Mapping[str, Any], value: str) -> float:
    return float(get_field(rec, value))


def _key(rec: Mapping[str, Any], fields: Iterable[str]) -> tuple[str, ...]:
    return tuple(canonical(get_field(rec, f, None)) for f in fields)


def _is_hard(rec: Mapping[str, Any]) -> bool:
    return is_hard(rec)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def scores_from_records(
    records: Iterable[Mapping[str, Any]],
    row: Mapping[str, Any],
    value: str = "top1",
    real_hard: float | None = None,
    w: float = DEFAULT_W,
) -> DDRankingScores:
    """DD-Ranking scores of the configuration of ``row`` from the records that hold its reference rows.

    Args:
        records: results records (accuracies as fractions in ``value``).
        row: one record of the configuration to score (its seeds are averaged with the others of its identity).
        value: the accuracy field.
        real_hard: acc(real training set, hard labels) as a fraction; defaults to the mean of matching
            ``full_real`` records.
        w: the LRS weight.

    Returns:
        IOR needs a random-real row with the same recipe, HLR a hard row of the same method and images plus the
        real-hard accuracy, LRS both; a missing one is None. A random-real or full-real row scores None.
    """
    recs = list(records)
    method = get_field(row, "method", None)
    if method in (RANDOM_METHOD, FULL_REAL_METHOD):
        return DDRankingScores(None, None, None)
    img, recipe = _key(row, IMAGE_FIELDS), _key(row, RECIPE_FIELDS)
    hard = _is_hard(row)
    own_rows = [
        r
        for r in recs
        if get_field(r, "method", None) == method
        and _key(r, IMAGE_FIELDS) == img
        and _key(r, RECIPE_FIELDS) == recipe
        and _is_hard(r) == hard
    ]
    rand_rows = [
        r
        for r in recs
        if get_field(r, "method", None) == RANDOM_METHOD
        and _key(r, IMAGE_FIELDS) == img
        and _key(r, RECIPE_FIELDS) == recipe
        and _is_hard(r) == hard
    ]
    acc = _mean([_acc(r, value) for r in own_rows])
    acc_rand = _mean([_acc(r, value) for r in rand_rows])
    ior = improvement_over_random(acc, acc_rand) if acc is not None and acc_rand is not None else None
    # the method's images with hard labels: the hard row itself, else a hard row of the same images
    if hard:
        used_hard = own_rows
    else:
        hard_rows = [
            r for r in recs if get_field(r, "method", None) == method and _key(r, IMAGE_FIELDS) == img and _is_hard(r)
        ]
        same = [r for r in hard_rows if _key(r, ("prune", "epochs")) == _key(row, ("prune", "epochs"))]
        used_hard = same or hard_rows
    acc_hard = _mean([_acc(r, value) for r in used_hard])
    if real_hard is None:
        real_key = _key(row, ("dataset", "student_model"))
        real_hard = _mean(
            [
                _acc(r, value)
                for r in recs
                if get_field(r, "method", None) == FULL_REAL_METHOD
                and _key(r, ("dataset", "student_model")) == real_key
            ]
        )
    hlr = hard_label_recovery(real_hard, acc_hard) if real_hard is not None and acc_hard is not None else None
    lrs = None
    if ior is not None and hlr is not None:
        per_seed = _per_seed_lrs(own_rows, rand_rows, used_hard, float(real_hard), value, w)
        lrs = per_seed if per_seed is not None else label_robust_score(ior, hlr, w)
    return DDRankingScores(ior, hlr, lrs)


def _seed_map(rows: list[Mapping[str, Any]], value: str) -> dict[str, float] | None:
    """seed -> accuracy, or None when a seed repeats (then the rows cannot be paired by seed)."""
    out: dict[str, float] = {}
    for r in rows:
        seed = str(get_field(r, "seed", None))
        if seed in out:
            return None
        out[seed] = _acc(r, value)
    return out


def _per_seed_lrs(
    own: list[Mapping[str, Any]],
    rand: list[Mapping[str, Any]],
    hard: list[Mapping[str, Any]],
    real_hard: float,
    value: str,
    w: float,
) -> float | None:
    """DD-Ranking's average of the per-round LRS, pairing rounds by seed, when the three row sets share the same
    seeds (each once); else None (the caller scores the seed means)."""
    maps = [_seed_map(rows, value) for rows in (own, rand, hard)]
    if any(m is None for m in maps) or not (set(maps[0]) == set(maps[1]) == set(maps[2])) or not maps[0]:
        return None
    a, r, h = maps
    scores = [
        label_robust_score(improvement_over_random(a[s], r[s]), hard_label_recovery(real_hard, h[s]), w) for s in a
    ]
    return float(np.mean(scores))
