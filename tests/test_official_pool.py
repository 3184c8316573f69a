"""Issue 20, items 5 and 6: the official label pool and last-batch rule are the defaults.

Official trainer (he-y/soft-label-pruning-for-dataset-distillation, ``train_FKD_label_pruning_batch.py``,
``batch_to_epoch``): ``pool = list(range(E * n))[: int((1 - r) * E * n)]`` (the FIRST K batches), each epoch draws
n batches ``pool[torch.randint(0, len(pool))]`` (with replacement), and a drawn flat index i with
``(i + 1) % n == 0`` (the last batch of its epoch) is trained as ``i - 1``. The main-table generator runs without
``--prune_ratio``, so the short last batch is stored and every epoch has ceil(N / B) steps, 1x included.
lpld before: a random subset (``prune.pool_select=random``), draws without replacement
(``prune.draw=without_replacement``) and the short batch dropped from pruned stores (``relabel.drop_last=auto``).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compose_cfg

from lpld.core.label_pool import epoch_plan, swap_last_batches
from lpld.core.pruning import resolve_drop_last, select_batches, swaps_last_batch


def _flat(ids: np.ndarray, n: int) -> list[int]:
    return (ids[:, 0] * n + ids[:, 1]).tolist()


def test_first_k_batches_hand_computation():
    # E=3 epochs x n=4 batches, r=0.5: K = int(0.5 * 12) = 6 -> flat 0..5 = (0,0)..(0,3), (1,0), (1,1)
    ids = select_batches(3, 4, 0.5, "batch", seed=7, select="first")
    assert ids.tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1]]
    assert np.array_equal(ids, select_batches(3, 4, 0.5, "batch", seed=8, select="first"))  # no seed involved
    # in1k IPC10 40x: 300 x 79 = 23700 batches, K = int(0.025 * 23700) = 592: flat 0..591
    big = select_batches(300, 79, 0.975, "batch", seed=0)  # the core default is the official selection
    assert _flat(big, 79) == list(range(592))
    # epoch granularity: the first int(0.3 * 10) = 3 epochs
    ep = select_batches(10, 2, 0.7, "epoch", seed=3, select="first")
    assert ep.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]


def test_random_switch_is_lpld_before():
    """pool_select=random: the seeded subset lpld drew before (hand: the same PCG64 permutation, sorted)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([5, 0x5052554E])))
    want = np.sort(rng.permutation(40 * 6)[:24])
    got = select_batches(40, 6, 0.9, "batch", seed=5, select="random")
    assert _flat(got, 6) == want.tolist()
    assert _flat(got, 6) != list(range(24))
    with pytest.raises(ValueError, match="pool_select"):
        select_batches(4, 4, 0.5, "batch", seed=0, select="last")


def test_with_replacement_draw_hand_computation():
    """The plan is pool[integers(0, P, n)] from the (seed, epoch) generator, swaps applied (hand computed)."""
    n, seed = 5, 3
    ids = select_batches(4, n, 0.5, "batch", seed=seed)  # first 10 = epochs 0 and 1, batches 0..4
    pool = np.arange(len(ids))
    for epoch in range(4):
        rng = np.random.default_rng([seed, epoch, 0x1B])
        drawn = rng.integers(0, len(pool), size=n)
        want = [r - 1 if ids[r, 1] == n - 1 else r for r in pool[drawn]]  # the official i -> i - 1
        got = epoch_plan(pool, ids, n, epoch, "batch", seed)
        assert got.tolist() == want
        assert not np.any(ids[got, 1] == n - 1)  # the last batch of an epoch is never trained


def test_with_replacement_repeats_batches_within_an_epoch():
    """Drawing n of a pool of n with replacement repeats a batch in almost every epoch (1 - n!/n^n); without
    replacement (lpld before) never."""
    ids = np.array([[e, b] for e in range(20) for b in range(10)])
    pool = np.arange(len(ids))[:40]
    kw = {"swap_last": False}
    rep = [epoch_plan(pool, ids, 40, e, "batch", 0, "with_replacement", **kw) for e in range(10)]
    old = [epoch_plan(pool, ids, 40, e, "batch", 0, "without_replacement", **kw) for e in range(10)]
    assert sum(len(set(p.tolist())) < 40 for p in rep) == 10
    assert all(sorted(p.tolist()) == pool.tolist() for p in old)
    # uniform: over many epochs every pool batch is drawn about as often (40 x 10 draws -> 100 / batch)
    many = np.concatenate([epoch_plan(pool, ids, 40, e, "batch", 1, **kw) for e in range(100)])
    counts = np.bincount(many, minlength=40)
    assert counts.sum() == 4000 and counts.min() > 60 and counts.max() < 145
    with pytest.raises(ValueError, match="prune.draw"):
        epoch_plan(pool, ids, 4, 0, "batch", 0, "sometimes")


def test_swap_rule_hand_cases():
    n = 4
    # first-K pool: every last batch (b = 3) maps to b = 2 of its epoch (the official i - 1)
    ids = select_batches(3, n, 0.0, "batch", seed=0)
    swap = swap_last_batches(np.arange(12), ids, n)
    assert swap == {3: 2, 7: 6, 11: 10}
    # random pool: (0,3) -> (0,1) (the nearest stored non-last batch before it); (1,3) -> (0,1) too
    ids = np.array([[0, 1], [0, 3], [1, 3], [2, 0]])
    assert swap_last_batches(np.arange(4), ids, n) == {1: 0, 2: 0}
    # nothing stored before it: cyclic, the last stored non-last batch
    ids = np.array([[1, 2], [0, 3]])  # stored order: (0,3), (1,2)
    assert swap_last_batches(np.arange(2), ids, n) == {1: 0}
    # only last batches, or one batch per epoch: nothing to swap for
    assert swap_last_batches(np.arange(2), np.array([[0, 3], [1, 3]]), n) == {}
    assert swap_last_batches(np.arange(3), np.array([[0, 0], [1, 0], [2, 0]]), 1) == {}
    assert swaps_last_batch("swap", 2) and not swaps_last_batch("swap", 1) and not swaps_last_batch("auto", 5)


def test_swap_keeps_ceil_steps_and_stores_the_short_batch_at_every_ratio():
    # N = 30, B = 8: the store holds ceil(30 / 8) = 4 batches per epoch at 1x and pruned (drop_last=swap)
    for ratio in (0.0, 0.9):
        assert resolve_drop_last("swap", ratio, 30, 8) is False
    assert resolve_drop_last("auto", 0.9, 30, 8) is True  # lpld before: dropped from pruned stores
    ids = select_batches(10, 4, 0.0, "batch", seed=0)
    plans = [epoch_plan(np.arange(40), ids, 4, e, "batch", 2) for e in range(20)]
    assert all(len(p) == 4 for p in plans)
    assert not any(np.any(ids[p, 1] == 3) for p in plans)
    old = np.concatenate([epoch_plan(np.arange(40), ids, 4, e, "batch", 2, swap_last=False) for e in range(20)])
    assert np.any(ids[old, 1] == 3)


def _cfg(*overrides: str):
    return compose_cfg(["dataset=in1k", "model=resnet18", "ipc=10", "stage=student", *overrides])


def test_config_defaults_are_official_and_switches_restore_lpld():
    from lpld.artifacts import labels as labels_artifact
    from lpld.config.student import pool_draw_settings

    cfg = _cfg("prune=40x")
    spec = labels_artifact.store_spec(cfg)
    assert spec.pool_select == "first" and spec.drop_last is False and spec.batches_per_epoch == 79
    assert _flat(spec.batch_ids(), 79) == list(range(592))
    assert spec.to_dict()["prune"]["select"] == "first"
    assert pool_draw_settings(cfg) == {"draw": "with_replacement", "swap_last": True}

    old = _cfg("prune=40x", "prune.pool_select=random", "prune.draw=without_replacement", "relabel.drop_last=auto")
    spec_old = labels_artifact.store_spec(old)
    assert spec_old.pool_select == "random" and spec_old.drop_last is True and spec_old.batches_per_epoch == 78
    assert "select" not in spec_old.to_dict()["prune"]  # stores written before issue 20 keep their identity
    assert type(spec).from_dict(spec_old.to_dict()) == spec_old and type(spec).from_dict(spec.to_dict()) == spec
    assert pool_draw_settings(old) == {"draw": "without_replacement", "swap_last": False}
    # 1x: one store for either selection
    one = labels_artifact.store_spec(_cfg("prune=1x", "prune.pool_select=random"))
    assert one.to_dict() == labels_artifact.store_spec(_cfg("prune=1x")).to_dict()


def test_bad_values_name_the_key():
    from lpld.artifacts import labels as labels_artifact
    from lpld.config.student import pool_draw_settings
    from lpld.errors import ConfigError

    with pytest.raises(ConfigError, match="prune.pool_select"):
        labels_artifact.store_spec(_cfg("prune=40x", "prune.pool_select=last"))
    with pytest.raises(ConfigError, match="prune.draw"):
        pool_draw_settings(_cfg("prune.draw=sometimes"))
    with pytest.raises(ConfigError, match="relabel.drop_last"):
        pool_draw_settings(_cfg("relabel.drop_last=never"))
