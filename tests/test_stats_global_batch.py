"""Issue 20: a class-wise statistics file written by an EMA pass (official / ema) before the global-batch fix has the
same name as a correct one but no ``global_batch``; on several processes its EMA saw one rank's rows per update.
The consumers refuse it with one ArtifactError naming the fix (``stage=stats stage.overwrite=true``): recover's
loading (``load_classwise_stats``, also behind ``recover.stats_path``) and stage=stats' reuse decision (``prepare``)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from torch import nn

from lpld.core.bnstats import ClasswiseBNStats, load_classwise_stats
from lpld.core.io import ArtifactError, atomic_torch_save, release_lock


def _stats(mode: str, **extra) -> dict:
    """A real finalized pass of a tiny BN net (what StatsModule saves, before its stage fields)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU()).eval()
    acc = ClasswiseBNStats(net, 3, mode=mode, momentum=0.1)
    acc.update(torch.randn(6, 1, 5, 5), torch.tensor([0, 1, 2, 0, 1, 2]))
    return {**acc.finalize(), "teacher_fingerprint": "t", **extra}


@pytest.mark.parametrize("mode", ["official", "ema"])
def test_an_ema_file_without_global_batch_is_refused_naming_the_fix(tmp_path, mode):
    p = tmp_path / f"{mode}.pt"
    atomic_torch_save(p, _stats(mode))
    with pytest.raises(ArtifactError, match=r"global_batch.*stage=stats stage\.overwrite=true"):
        load_classwise_stats(p, "t")
    atomic_torch_save(p, _stats(mode, global_batch=6, world_size=2))  # written after the fix: accepted
    assert load_classwise_stats(p, "t")["global_batch"] == 6


def test_an_exact_file_without_global_batch_is_accepted(tmp_path):
    p = tmp_path / "exact.pt"
    atomic_torch_save(p, _stats("exact"))  # exact sums were always reduced over ranks
    assert load_classwise_stats(p, "t")["mode"] == "exact"


def test_stats_prepare_does_not_reuse_an_old_ema_file(tmp_path):
    from lpld.artifacts.stats import prepare

    out = tmp_path / "official_x.pt"
    atomic_torch_save(out, _stats("official"))
    try:
        with pytest.raises(ArtifactError, match=r"stage\.overwrite=true"):
            prepare(out, "t", "official", overwrite=False)
    finally:
        release_lock(out)
    try:
        assert prepare(out, "t", "official", overwrite=True) == "compute"  # the fix: recompute
    finally:
        release_lock(out)
    atomic_torch_save(out, _stats("official", global_batch=6, world_size=1))
    assert prepare(out, "t", "official", overwrite=False) == "reuse"


def test_recover_opens_the_stats_artifact_through_the_check(tmp_path):
    from lpld.artifacts import stats as stats_artifact

    cfg = compose_cfg(["stage=recover", "dataset=in1k", "model=resnet18", f"paths.artifacts={tmp_path}"])
    assert stats_artifact.spec(cfg).mode == "official"
    p = stats_artifact.path(cfg)
    p.parent.mkdir(parents=True)
    atomic_torch_save(p, _stats("official"))
    with pytest.raises(ArtifactError, match=r"stage\.overwrite=true"):
        stats_artifact.open(cfg, "t")
    atomic_torch_save(p, _stats("official", global_batch=256, world_size=8))
    assert stats_artifact.open(cfg, "t")["world_size"] == 8
