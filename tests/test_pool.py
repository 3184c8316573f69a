"""Label pool: metric-based selection with calibration, epoch plans, DDP sharding, metric scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpld.core.label_pool import epoch_plan, pool_size, select_pool, shard_plan
from lpld.core.prune_metrics import MetricInputError, batch_score, per_sample_scores

SCORES = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0])  # a permutation of 0.0 .. 0.9
BY_SCORE = {round(v, 1): i for i, v in enumerate(SCORES)}


def _rows(values):
    return sorted(BY_SCORE[round(v, 1)] for v in values)


def test_select_easy_hard_uniform():
    assert select_pool(SCORES, 3, "easy").tolist() == _rows([0.9, 0.8, 0.7])
    assert select_pool(SCORES, 3, "hard").tolist() == _rows([0.0, 0.1, 0.2])
    # uniform: evenly spaced ranks including both ends: ranks 0, 4.5->4 (banker's round), 9 -> .9, .5, .0
    assert select_pool(SCORES, 3, "uniform").tolist() == _rows([0.9, 0.5, 0.0])
    assert select_pool(SCORES, 10, "uniform").tolist() == list(range(10))


def test_select_calibration_discards_ends_first():
    # discard the 2 easiest (.9, .8) and 3 hardest (.0, .1, .2) first
    assert select_pool(SCORES, 2, "easy", drop_easy=0.2, drop_hard=0.3).tolist() == _rows([0.7, 0.6])
    assert select_pool(SCORES, 2, "hard", drop_easy=0.2, drop_hard=0.3).tolist() == _rows([0.3, 0.4])
    r = select_pool(SCORES, 4, "random", drop_easy=0.2, drop_hard=0.3, seed=3)
    assert set(r.tolist()) <= set(_rows([0.7, 0.6, 0.5, 0.4, 0.3])) and len(set(r.tolist())) == 4
    assert np.array_equal(r, select_pool(SCORES, 4, "random", drop_easy=0.2, drop_hard=0.3, seed=3))
    with pytest.raises(ValueError, match="cannot keep 6"):
        select_pool(SCORES, 6, "easy", drop_easy=0.2, drop_hard=0.3)
    with pytest.raises(ValueError, match="unknown metric order"):
        select_pool(SCORES, 2, "middle")


def test_pool_size_matches_relabel_count():
    assert pool_size(3000, 0.9) == 300
    assert pool_size(3000, 0.975) == 75
    assert pool_size(10, 0.99) == 1


def test_epoch_plan_epoch_granularity_cycles_stored_epochs():
    # pool = stored epochs 3 and 7 (4 batches each), listed out of order
    ids = np.array([[7, 0], [7, 1], [7, 2], [7, 3], [3, 0], [3, 1], [3, 2], [3, 3]])
    pool = np.arange(8)
    e0 = epoch_plan(pool, ids, 4, 0, "epoch", seed=0)
    e1 = epoch_plan(pool, ids, 4, 1, "epoch", seed=0)
    e2 = epoch_plan(pool, ids, 4, 2, "epoch", seed=0)
    assert ids[e0].tolist() == [[3, 0], [3, 1], [3, 2], [3, 3]]
    assert ids[e1].tolist() == [[7, 0], [7, 1], [7, 2], [7, 3]]
    assert np.array_equal(e2, e0)


def test_epoch_plan_batch_granularity_redraws_per_epoch_and_is_reproducible():
    ids = np.array([[e, b] for e in range(10) for b in range(4)])
    pool = np.array([1, 5, 9, 14, 22, 27, 31, 38])  # batches of several stored epochs
    legacy = {"draw": "without_replacement", "swap_last": False}  # lpld's draws before issue 20
    plans = [epoch_plan(pool, ids, 4, e, "batch", seed=11, **legacy) for e in range(6)]
    for p in plans:
        assert len(p) == 4 and len(set(p.tolist())) == 4 and set(p.tolist()) <= set(pool.tolist())
    assert len({tuple(p) for p in plans}) > 1  # re-drawn every epoch
    again = [epoch_plan(pool, ids, 4, e, "batch", seed=11, **legacy) for e in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(plans, again))  # resume replays the same draws
    mixed = np.concatenate(plans)
    assert len(set(ids[mixed][:, 0].tolist())) > 1  # an epoch mixes stored epochs
    # a pool smaller than an epoch: every pool batch is used before any repeats
    small = epoch_plan(pool[:3], ids, 7, 0, "batch", seed=0, **legacy)
    assert sorted(small[:3].tolist()) == sorted(pool[:3].tolist()) and len(small) == 7
    with pytest.raises(ValueError, match="granularity"):
        epoch_plan(pool, ids, 4, 0, "sample", seed=0)


def test_shard_plan_partitions_with_equal_counts():
    plan = np.array([10, 11, 12, 13, 14])
    a, b = shard_plan(plan, 0, 2), shard_plan(plan, 1, 2)
    assert a.tolist() == [10, 12, 14] and b.tolist() == [11, 13, 10]
    assert set(a.tolist()) | set(b.tolist()) == set(plan.tolist())
    assert shard_plan(plan, 0, 1).tolist() == plan.tolist()


def test_metric_scores_on_hand_made_batch():
    labels = torch.tensor([0, 1, 2])
    logits = torch.tensor([[3.0, 1.0, 0.0], [2.0, 1.5, 0.0], [0.0, 0.0, 4.0]])
    probs = torch.softmax(logits, 1)
    assert per_sample_scores("correct", labels, probs=probs).tolist() == [1.0, 0.0, 1.0]
    assert per_sample_scores("correct", labels, hard=torch.tensor([0, 0, 0])).tolist() == [1.0, 0.0, 0.0]
    conf = per_sample_scores("confidence", labels, probs=probs)
    assert torch.allclose(conf, probs.max(1).values.double())
    diff = per_sample_scores("diff", labels, probs=probs)
    s = probs.sort(1, descending=True).values.double()
    assert torch.allclose(diff, s[:, 0] - s[:, 1])
    signed = per_sample_scores("diff_signed", labels, logits=logits)
    assert signed.tolist() == [2.0, -0.5, 4.0]  # true logit minus the largest other
    cut = per_sample_scores("cut_ratio", labels, cut_lambda=0.3)
    assert cut.tolist() == [0.7, 0.7, 0.7]
    assert batch_score(signed) == pytest.approx(5.5 / 3)


def test_metric_missing_fields_raise_clear_errors():
    labels = torch.tensor([0, 1])
    with pytest.raises(MetricInputError, match="quant=none"):
        per_sample_scores("diff_signed", labels, probs=torch.full((2, 3), 1 / 3))
    with pytest.raises(MetricInputError, match="CutMix"):
        per_sample_scores("cut_ratio", labels, cut_lambda=None)
    with pytest.raises(MetricInputError, match="quant=hard"):
        per_sample_scores("confidence", labels, hard=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown pruning metric"):
        per_sample_scores("entropy", labels, probs=torch.full((2, 3), 1 / 3))
