"""The short-last-batch switches (issue 12, item 8): the official generator drops it when given a ratio (`auto`).

The default is `swap` since issue 20 (tests/test_official_pool.py); these tests pin `auto` / `true` / `false`.

``generate_soft_label_pruning.py``: ``drop_last = True if args.prune_ratio > 0 else False``. lpld's
``relabel drop_last: auto`` follows it (and the paper: "For label pruning, we exclude the last batch");
``true`` drops it also at 1x, ``false`` keeps it always (lpld before).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_label_store import HW, B, N, Recorder, build, make_teacher, spec_of

from lpld.core import augment
from lpld.core.label_store import LabelStore, disk_bytes
from lpld.core.pruning import batches_per_epoch, resolve_drop_last
from lpld.core.storage_accounting import predict_paper, predict_store


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (N, 3, HW, HW), dtype=torch.uint8, generator=g)
    return augment.to_model_input(u8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


@pytest.mark.parametrize(
    "mode,ratio,n,b,want",
    [
        ("auto", 0.0, 30, 8, False),  # 1x: the official generator keeps the short batch
        ("auto", 0.9, 30, 8, True),  # pruned: dropped
        ("auto", 0.9, 32, 8, False),  # no short batch to drop
        ("auto", 0.9, 6, 8, False),  # no full batch: keeping the only batch (dropping leaves nothing)
        ("true", 0.0, 30, 8, True),  # always dropped, also at 1x
        ("false", 0.9, 30, 8, False),
        (True, 0.0, 30, 8, True),  # YAML booleans
        (False, 0.9, 30, 8, False),
    ],
)
def test_resolution_table(mode, ratio, n, b, want):
    assert resolve_drop_last(mode, ratio, n, b) is want


def test_true_with_no_full_batch_and_unknown_mode_are_refused():
    with pytest.raises(ValueError, match="leaves no batch"):
        resolve_drop_last("true", 0.9, 6, 8)
    with pytest.raises(ValueError, match="drop_last must be one of"):
        resolve_drop_last("sometimes", 0.9, 30, 8)


def test_batches_per_epoch_floor_vs_ceil():
    for n in range(1, 40):
        for b in range(1, 12):
            assert batches_per_epoch(n, b) == -(-n // b)
            if n >= b:
                assert batches_per_epoch(n, b, drop_last=True) == n // b


def test_identity_unchanged_when_kept_and_split_when_dropped():
    keep, drop = spec_of(), spec_of(drop_last=True)
    assert "drop_last" not in keep.to_dict()  # stores written before the switch keep their identity
    assert drop.to_dict()["drop_last"] is True and drop.to_dict()["batches_per_epoch"] == N // B
    assert type(keep).from_dict(drop.to_dict()) == drop and type(keep).from_dict(keep.to_dict()) == keep


@pytest.mark.parametrize("record", ["explicit", "seed"])
def test_dropped_store_holds_only_full_batches_of_each_epoch_order(tmp_path, images, record):
    """Every stored batch has B rows, its images are positions b*B..(b+1)*B-1 of the epoch's seeded order, and
    replay reproduces what the teacher saw; the schedule has floor(N/B) batches per epoch."""
    rec = Recorder(make_teacher())
    spec = spec_of(record=record, drop_last=True, prune_ratio=0.5, granularity="epoch", epochs=4)
    store = LabelStore.open(build(tmp_path, spec, images, rec), verify="full")
    ids = store.batch_ids
    assert len(store) == 2 * (N // B)  # 2 of 4 epochs kept, 3 full batches each (30 = 3 x 8 + 6 dropped)
    for i in range(len(store)):
        b = store.read(i)
        e, bi = (int(v) for v in ids[i])
        assert len(b) == B
        want = augment.epoch_permutation(spec.seed, e, N)[bi * B : (bi + 1) * B]
        assert np.array_equal(b.index.numpy(), want)
        assert torch.equal(augment.replay(images, b, HW), rec.seen[i])
    acc = store.manifest["accounting"]
    assert predict_store(spec)["total"] == acc["total"]
    assert disk_bytes(store.path) > acc["total"]


def test_paper_accounting_counts_only_full_batches():
    """Hand computation: 300 epochs, N=1000, B=128 -> 7 full batches (896 images) per epoch when dropping."""
    keep = predict_paper(1000, 10, 300, 128, 0.9, "epoch", "cutmix")
    drop = predict_paper(1000, 10, 300, 128, 0.9, "epoch", "cutmix", drop_last=True)
    assert keep["num_batches"] == 30 * 8 and drop["num_batches"] == 30 * 7
    assert drop["components"]["logits"] == 30 * 896 * 10 * 2
    assert keep["components"]["logits"] == 30 * 1000 * 10 * 2
