"""The class-wise statistics do not depend on the world size (issue 20 item 1).

``stage.batch_size`` of stage=stats is the global batch: on W ranks each takes ``batch_size / W`` rows of every
batch and the EMA modes reduce each batch's class sums over the ranks before the running update, so every update
equals the one-process update on the same batch; the image counts are reduced in every mode. The reference is the
one-process pass in this process; the other run is ``torchrun --nproc_per_node=2`` (gloo on CPU) on a copy of the
same teacher, with a pass length (19 images, batch 6) whose last batch leaves rank 1 without a row.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF, REPO, compose_cfg, write_image_tree

MODES = ("exact", "official", "ema")
N_IMAGES, BATCH = 19, 6  # 4 batches: 6, 6, 6, 1 (rank 1's share of the last one is empty)

WORKER = """
import json, sys
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
import lpld.config
from lpld.config.experiment import freeze
from lpld.stages import run_stage

conf, ov = sys.argv[1], json.loads(sys.argv[2])
for mode in ("exact", "official", "ema"):
    over = [*ov, f"stage.mode={mode}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    over += ["trainer.precision=32-true"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="config", overrides=over)
    run_stage(freeze(cfg, over))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _overrides(root: Path, data: Path) -> list[str]:
    return [
        "dataset=imagefolder",
        f"dataset.root={data}",
        "dataset.num_classes=4",
        "dataset.image_size=8",
        "model=convnet",
        "model.width=8",
        "logger=none",
        f"paths.root={root}",
        "trainer.num_workers=0",
        "dataset.recipe.squeeze.epochs=1",
        "dataset.recipe.squeeze.batch_size=8",
        "seed=0",
    ]


def _stats_over(root: Path, data: Path) -> list[str]:
    return [*_overrides(root, data), "stage=stats", f"stage.batch_size={BATCH}", f"stage.max_images={N_IMAGES}"]


def _load(ov: list[str]) -> dict:
    from lpld.artifacts import stats as stats_artifact

    return torch.load(stats_artifact.path(compose_cfg(ov)), map_location="cpu", weights_only=True)


def _single(ov: list[str]) -> None:
    from lpld.stages import run_stage

    run_stage(compose_cfg(ov))


@pytest.fixture(scope="module")
def teacher_root(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp_stats")
    data = write_image_tree(base / "data", n_classes=4, per_class=5)
    root = base / "single"
    _single(["stage=squeeze", *_overrides(root, data)])
    return base, data, root


def _copy_teacher(src: Path, dst: Path, data: Path) -> None:
    from lpld.artifacts import teacher as teacher_artifact

    a, b = (teacher_artifact.dir(compose_cfg(_overrides(r, data))) for r in (src, dst))
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("*.ckpt", "*.lock"))


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a["layers"] == b["layers"] and a["mode"] == b["mode"]
    assert a["count"].tolist() == b["count"].tolist(), what
    assert a["missing"] == b["missing"]
    dm = max(float((x - y).abs().max()) for x, y in zip(a["mean"], b["mean"], strict=True))
    dv = max(float(((x - y).abs() / x.abs().clamp_min(1e-12)).max()) for x, y in zip(a["var"], b["var"], strict=True))
    print(f"{what}: max |d mean| {dm:.3g}, max relative d var {dv:.3g}")
    for x, y in zip([*a["mean"], *a["var"]], [*b["mean"], *b["var"]], strict=True):
        # float64 sums reduced in another order, conv outputs of 3-row vs 6-row batches: float32 output tolerance
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=what)


@pytest.fixture(scope="module")
def reference(teacher_root):
    """The 1-process statistics of every mode (and the check that the EMA depends on the batch)."""
    base, data, root = teacher_root
    ref = {}
    for mode in MODES:
        ov = [*_stats_over(root, data), f"stage.mode={mode}"]
        _single(ov)
        ref[mode] = _load(ov)
        assert int(ref[mode]["count"].sum()) == N_IMAGES
    assert ref["exact"]["count"].tolist() == [5, 5, 5, 4]  # the first 19 images in order (EMA modes: a permutation)
    # the property can fail: an EMA over per-rank batches (2 x 6 rows per update, the old behaviour) differs
    other = base / "batch12"
    _copy_teacher(root, other, data)
    ov = [*_stats_over(other, data), "stage.mode=official", f"stage.batch_size={2 * BATCH}"]
    _single(ov)
    d = max(float((x - y).abs().max()) for x, y in zip(ref["official"]["mean"], _load(ov)["mean"]))
    print(f"official mode, batch {BATCH} vs {2 * BATCH} (the old 2-rank behaviour): max |d mean| {d:.3g}")
    assert d > 1e-3, "the batch size must matter to the EMA, or this test proves nothing"
    return ref


def test_two_processes_give_the_one_process_statistics_in_every_mode(teacher_root, reference):
    base, data, root = teacher_root
    ref = reference
    two = base / "torchrun"
    _copy_teacher(root, two, data)
    worker = base / "stats_worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, WANDB_MODE="disabled", LPLD_NO_RICH="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout's lpld
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    cmd += [str(worker), str(CONF), json.dumps(_stats_over(two, data))]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    for mode in MODES:
        got = _load([*_stats_over(two, data), f"stage.mode={mode}"])
        _assert_same(ref[mode], got, f"stats {mode}: 1 vs 2 ranks")
        assert (ref[mode]["world_size"], got["world_size"], got["global_batch"]) == (1, 2, BATCH)


@pytest.mark.slow
def test_ddp_spawn_gives_the_one_process_statistics_in_every_mode(teacher_root, reference):
    """The same property under trainer=ddp_cpu (ddp_spawn: the stage body runs once, its 2 ranks are spawned)."""
    base, data, root = teacher_root
    spawn = base / "spawn"
    _copy_teacher(root, spawn, data)
    for mode in MODES:
        ov = [*_stats_over(spawn, data), f"stage.mode={mode}", "trainer=ddp_cpu", "trainer.precision=32-true"]
        _single(ov)
        _assert_same(reference[mode], _load(ov), f"stats {mode}: 1 process vs ddp_spawn")


def test_a_world_size_that_does_not_divide_the_stats_batch_is_refused(tmp_path):
    from lpld.errors import ConfigError
    from lpld.stages import run_stage

    ov = [*_overrides(tmp_path, tmp_path / "data"), "stage=stats", "stage.batch_size=7", "trainer=ddp_cpu"]
    with pytest.raises(ConfigError, match=r"stage.batch_size=7 is the global batch .*trainer.devices.*multiple of 2"):
        run_stage(compose_cfg(ov))
    assert not (tmp_path / "artifacts").exists()  # refused before anything (not even the missing teacher)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 5, 12, 13, 19])
@pytest.mark.parametrize("seed", [None, 3])
def test_global_batch_shards_split_the_one_process_batches(world, n, seed):
    """Every rank yields ceil(n / G) batches; batch j's real rows over the ranks are the one-process batch j."""
    from lpld.lit.stats_module import GlobalBatchShards

    G = 6 if world != 4 else 8
    one = list(GlobalBatchShards(n, G, 0, 1, seed))
    ranks = [list(GlobalBatchShards(n, G, r, world, seed)) for r in range(world)]
    assert all(len(b) == len(one) == len(GlobalBatchShards(n, G, r, world, seed)) for r, b in enumerate(ranks))
    for j, batch in enumerate(one):
        got = [i for r in range(world) for i in ranks[r][j] if i < n]
        assert sorted(got) == sorted(batch)
        for r in range(world):
            assert len(ranks[r][j]) <= G // world
            pads = [i for i in ranks[r][j] if i >= n]
            assert pads == [] or ranks[r][j] == pads and len(pads) == 1  # a padding row only for an empty share
    assert sorted(i for b in one for i in b) == list(range(n))


def test_padding_rows_count_nowhere():
    """A batch with padding rows (valid False) updates the statistics as the batch without them, in every mode."""
    from torch import nn

    from lpld.core.bnstats import ClasswiseBNStats

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    net[1].running_mean.normal_()
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 1, 2, 0])
    valid = torch.tensor([True, False, True, True, False])
    for mode in ("exact", "official", "ema"):
        a, b = ClasswiseBNStats(net, 3, mode=mode), ClasswiseBNStats(net, 3, mode=mode)
        a.update(x, y, valid)
        b.update(x[valid], y[valid])
        fa, fb = a.finalize(), b.finalize()
        assert fa["count"].tolist() == fb["count"].tolist() == [1, 1, 1]
        for u, v in zip([*fa["mean"], *fa["var"]], [*fb["mean"], *fb["var"]], strict=True):
            torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6, equal_nan=True)
        c = ClasswiseBNStats(net, 3, mode=mode)
        c.update(x[:1], y[:1], torch.tensor([False]))  # an empty share: nothing counts, no class moves
        assert c.finalize()["count"].tolist() == [0, 0, 0] and c.finalize()["missing"] == [0, 1, 2]
