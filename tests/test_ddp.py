"""Multi-process semantics without processes: rank resolution, rank-0 decisions, global batches, row split."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compose_cfg, tiny_overrides, write_image_tree

from lpld import dist


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "NODE_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_env_rank_reads_torchrun_slurm_and_lightning(clean_env):
    assert dist.env_rank() == 0 and dist.env_world() == 1 and dist.launch_mode() == "single"
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "4")
    assert dist.env_rank() == 3 and dist.env_world() == 4
    clean_env.setenv("RANK", "5")  # torchrun's RANK wins
    clean_env.setenv("WORLD_SIZE", "8")
    assert dist.env_rank() == 5 and dist.env_world() == 8
    clean_env.delenv("RANK")
    clean_env.delenv("SLURM_PROCID")
    clean_env.delenv("SLURM_NTASKS")
    clean_env.setenv("LOCAL_RANK", "1")  # Lightning's re-launched child, before its Trainer
    assert dist.env_rank() == 1 and dist.launch_mode() == "child"


def test_decide_single_process_runs_once_and_child_follows(clean_env):
    calls = []
    assert dist.decide(lambda: calls.append(1) or "fresh", follow="resume") == "fresh" and calls == [1]
    with pytest.raises(KeyError, match="boom"):
        dist.decide(lambda: (_ for _ in ()).throw(KeyError("boom")))
    clean_env.setenv("LOCAL_RANK", "1")
    # a child never runs the decision (rank 0 made it and wrote before launching the child)
    assert dist.decide(lambda: calls.append(2) or "fresh", follow="resume") == "resume" and calls == [1]


def test_per_rank_batch_refuses_a_world_that_does_not_divide():
    assert dist.per_rank_batch(128, 8, "stage.batch_size") == 16
    with pytest.raises(ValueError, match=r"trainer.devices.*\[1, 2, 4, 8, 16, 32, 64\]"):
        dist.per_rank_batch(128, 3, "stage.batch_size")


def test_planned_world_size_from_presets():
    assert dist.planned_world_size(compose_cfg(["trainer=ddp_cpu"])) == 2
    assert dist.planned_world_size(compose_cfg(["trainer=cpu"])) == 1
    cfg = compose_cfg(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    assert dist.planned_world_size(cfg) == 8


def test_squeeze_refuses_world_size_that_does_not_divide_the_batch(tmp_path):
    from lpld.stages import ConfigError, squeeze

    cfg = compose_cfg(
        [f"paths.root={tmp_path}", "logger=none", "stage=squeeze", "trainer=ddp_cpu", "stage.batch_size=7"]
    )
    with pytest.raises(ConfigError, match="global batch.*trainer.devices"):
        squeeze.run(cfg)
    assert not (tmp_path / "artifacts").exists()  # refused before anything was written


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("b", [1, 5, 8, 13])
def test_rank_rows_partition_every_stored_batch(world, k, b):
    """Over ranks x accumulation slices the pieces tile the batch exactly once, and the loss weights
    n k W / b of StudentModule.training_step (then / k by Lightning, / W by DDP's average) sum to 1: the
    applied gradient is the whole stored batch's mean, as on one process."""
    from lpld.lit.student_module import rank_rows

    rows, weight = [], 0.0
    for r in range(world):
        for c in range(k):
            sl = rank_rows(b, c, k, r, world)
            n = sl.stop - sl.start
            rows += list(range(sl.start, sl.stop))
            weight += (n * k * world / b) / (k * world)
    assert sorted(rows) == list(range(b))
    assert weight == pytest.approx(1.0)


def test_student_plan_is_the_same_on_every_rank():
    from lpld.lit.student_module import StudentData

    class _Store:
        batch_ids = np.array([[e, b] for e in range(3) for b in range(4)])

    d = StudentData(_Store(), np.arange(12), 4, "batch", seed=3, accumulate=2)
    one, r0, r1 = d.plan(1), d.plan(1, 0, 2), d.plan(1, 1, 2)
    # every rank serves the whole epoch plan (4 stored batches, each twice for accumulate=2): ranks split rows
    assert len(one) == 8 and one.tolist() == r0.tolist() == r1.tolist()
    assert (one[::2] == one[1::2]).all()


def test_plan_stage_in1k_ipc200_and_in21k_ipc20_offline(tmp_path, capsys):
    """stage=plan computes ImageNet-scale figures from the config alone (meta device, no data, no download)."""
    from lpld.artifacts import labels as labels_artifact
    from lpld.core.storage_accounting import predict_store
    from lpld.stages import plan

    cfg = compose_cfg(
        [f"paths.root={tmp_path}", "logger=none", "stage=plan", "dataset=in1k", "ipc=200", "model=resnet18"]
        + ["trainer=ddp", "trainer.devices=8"]
    )
    p = plan.run(cfg)
    assert p["world_size"] == 8
    n = 200 * 1000
    assert p["image_uint8_bytes"] == n * 3 * 224 * 224
    assert p["label_store"]["bytes"] == predict_store(labels_artifact.store_spec(cfg))["on_disk_arrays"]
    # explicit records + fp16 logits: batch_ids, row_offsets, sample_index, crops, flips, mix_index, lam, box,
    # logits (+ checksums in format 2) and the manifest
    assert 10 <= p["label_store"]["files"] <= 12
    sd = p["student"]
    assert sd["global_batch"] == 128 and sd["rows_per_rank"] == 16
    # ResNet-18: 11.7M parameters
    assert 11_000_000 < sd["student_params"] < 12_500_000
    # the GPU estimate holds at least the uint8 images + weights/grads/AdamW state
    assert sd["gpu_bytes_per_rank"] > p["image_uint8_bytes"] + 16 * sd["student_params"]
    assert p["relabel"]["host_bytes_per_rank"] >= p["image_uint8_bytes"]
    assert "mem_gb=" in capsys.readouterr().out
    cfg21 = compose_cfg(
        [f"paths.root={tmp_path}", "logger=none", "stage=plan", "dataset=in21k", "ipc=20", "model=resnet18"]
        + ["prune=40x", "quant=mr", "quant.k=100", "stage.world_size=4"]
    )
    p21 = plan.plan(cfg21)
    assert p21["world_size"] == 4 and p21["num_images"] == 20 * 10450
    assert p21["relabel"]["batches_per_forward"] == 8  # in21k's batch 32 -> 256 rows per teacher forward
    assert p21["student"]["rows_per_rank"] == 8


def test_activation_count_matches_a_hand_count():
    from torch import nn

    from lpld.stages.plan import activation_bytes_per_sample

    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    train, infer = activation_bytes_per_sample(m, 3, 8)
    # outputs: conv 256, relu 256, flatten 256, linear 10
    assert train == 256 * 3 + 10
    assert infer == 512


def _decide_worker(rank: int, init: str, out: str) -> None:
    import json
    import os

    import torch.distributed as tdist

    from lpld import dist as ldist
    from lpld.core.io import ArtifactError

    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    calls = []

    def fn():
        calls.append(rank)
        os.makedirs(os.path.join(out, "made_by_rank0"), exist_ok=False)  # a write only rank 0 may do
        return {"state": "fresh", "rank": rank}

    res = ldist.decide(fn)
    try:
        ldist.decide(lambda: (_ for _ in ()).throw(ArtifactError("rank 0 refused: set stage.overwrite=true")))
        err = None
    except ArtifactError as e:
        err = str(e)
    ldist.barrier()
    with open(os.path.join(out, f"r{rank}.json"), "w") as f:
        json.dump({"res": res, "calls": calls, "err": err, "rank": ldist.rank(), "world": ldist.world_size()}, f)
    tdist.destroy_process_group()


def test_decide_over_two_gloo_processes(tmp_path):
    """rank 0 alone runs the decision (and its write); both ranks get its result, and its error on both ranks."""
    import json

    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_decide_worker, args=(init, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert r0["res"] == r1["res"] == {"state": "fresh", "rank": 0}
    assert r0["calls"] == [0] and r1["calls"] == []
    assert r0["err"] == r1["err"] == "rank 0 refused: set stage.overwrite=true"
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)


def test_plan_covers_squeeze_stats_and_recover(tmp_path):
    """Issue 19: stage=plan covers every stage. The teacher stages' rows per rank are the recipe's global batch
    split over the ranks; the statistics file size is what stage=stats really writes; recover's device batches are
    the ones the recover stage plans."""
    import torch

    from lpld.artifacts import stats as stats_artifact
    from lpld.stages import plan, run_stage

    p = plan.plan(compose_cfg([f"paths.root={tmp_path}", "dataset=in1k", "ipc=50", "stage=plan"]), world=8)
    assert p["squeeze"]["global_batch"] == 256 and p["squeeze"]["rows_per_rank"] == 32
    assert p["stats"]["rows_per_rank"] == 32
    # ResNet-18: 4800 BatchNorm channels; mean + variance (stored float32) for each of 1000 classes
    assert p["stats"]["file_bytes"] == 1000 * 4800 * 2 * 4
    # recover=lpld at ipc 50: auto classes_per_batch = 256 // 50 = 5 -> 200 device batches of 250 images
    assert (p["recover"]["device_batches"], p["recover"]["largest_device_batch_images"]) == (200, 250)
    assert (
        plan.plan(compose_cfg([f"paths.root={tmp_path}", "dataset=in1k", "stage=plan", "student.bn_rows=0"]), world=3)[
            "squeeze"
        ]["rows_per_rank"]
        == 86
    )  # ceil(256 / 3)
    # the statistics file of a real (tiny) stats run holds exactly the planned bytes of tensors
    root = write_image_tree(tmp_path / "data", n_classes=4, per_class=3)
    ov = tiny_overrides(tmp_path, root)
    torch.manual_seed(0)
    run_stage(compose_cfg(["stage=squeeze", *ov, "stage.epochs=1"]))
    run_stage(compose_cfg(["stage=stats", *ov]))
    exp = compose_cfg(["stage=plan", *ov])
    saved = torch.load(stats_artifact.path(exp), weights_only=True)
    tensor_bytes = sum(t.numel() * t.element_size() for t in [*saved["mean"], *saved["var"]])
    assert plan.plan(exp)["stats"]["file_bytes"] == tensor_bytes


def test_pipeline_needs_a_launcher_under_lightnings_relaunch(clean_env):
    """trainer=ddp on several processes without torchrun/srun: Lightning would re-run the pipeline per rank (issue
    20 item 3); refused with the torchrun command. Launched ranks, spawn and one device run."""
    from lpld.errors import ConfigError

    ddp = ["stage=pipeline", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    with pytest.raises(ConfigError, match=r"`torchrun --nproc_per_node=2 \S*run.py stage=pipeline trainer=ddp "):
        dist.require_launcher(compose_cfg(ddp), "stage=pipeline")
    auto = ["stage=pipeline", "trainer=cpu", "trainer.devices=4", "trainer.num_nodes=2", "trainer.strategy=auto"]
    with pytest.raises(ConfigError, match=r"on 8 processes.*`torchrun --nproc_per_node=4 --nnodes=2 "):
        dist.require_launcher(compose_cfg(auto), "stage=pipeline")
    for fine in (["stage=pipeline", "trainer=ddp_cpu"], [*ddp, "trainer.devices=1"]):
        dist.require_launcher(compose_cfg(fine), "stage=pipeline")
    clean_env.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun
    clean_env.setenv("WORLD_SIZE", "2")
    dist.require_launcher(compose_cfg(ddp), "stage=pipeline")
    clean_env.delenv("TORCHELASTIC_RUN_ID")
    clean_env.delenv("WORLD_SIZE")
    for k, v in (("SLURM_NTASKS", "2"), ("SLURM_PROCID", "1"), ("SLURM_JOB_NAME", "lpld")):  # srun
        clean_env.setenv(k, v)
    dist.require_launcher(compose_cfg(ddp), "stage=pipeline")


def test_pipeline_with_ddp_without_torchrun_refuses_before_any_work(tmp_path):
    """`python run.py stage=pipeline trainer=ddp` (2 CPU processes, no launcher) exits at once with one line naming
    the torchrun command, and writes no artifact (it used to hang until the collective timeout)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(LPLD_NO_RICH="1", WANDB_MODE="disabled")
    cmd = [sys.executable, str(REPO / "run.py"), "stage=pipeline", "trainer=ddp", "trainer.accelerator=cpu"]
    cmd += ["trainer.devices=2", f"paths.root={tmp_path}", "logger=none"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    line = [ln for ln in out.splitlines() if ln.startswith("lpld error:")]
    assert len(line) == 1 and "`torchrun --nproc_per_node=2 " in line[0], out[-3000:]
    assert "run.py stage=pipeline trainer=ddp trainer.accelerator=cpu trainer.devices=2" in line[0]
    assert "Traceback" not in out and not (tmp_path / "artifacts").exists()


def _spawned_rank_flags(rank: int, cb, out: str) -> None:
    """A ddp_spawn rank: a fresh process that receives the pickled callbacks; Lightning calls their ``setup`` there."""
    import json
    import types

    import torch

    before = [torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
    torch.cuda.is_available = lambda: True  # stands in for the rank's GPU: only the flags are exercised
    trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cuda", rank)))
    cb.setup(trainer, torch.nn.Module(), "fit")
    after = [torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]
    with open(f"{out}/r{rank}.json", "w") as f:
        json.dump({"before": before, "after": after}, f)


@pytest.mark.slow
def test_spawned_ranks_get_the_backend_flags(tmp_path):
    """Issue 20 item 4: build_trainer sets cuDNN benchmark / TF32 in the launching process only; a ddp_spawn rank
    starts with torch's defaults, so the GpuPerf callback (run in every rank) sets them there."""
    import json

    import torch
    import torch.multiprocessing as mp

    from lpld.lit.perf import GpuPerf, PerfOptions

    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # the parent's flag, as build_trainer would set it on a GPU run
    try:
        mp.spawn(_spawned_rank_flags, args=(GpuPerf(PerfOptions(cudnn_benchmark=True, tf32=True)), str(tmp_path)))
    finally:
        torch.backends.cudnn.benchmark = saved
    got = json.loads((tmp_path / "r0.json").read_text())
    assert got["before"] == [False, False, got["before"][2]]  # not inherited by the spawned process
    assert got["after"] == [True, True, True]


@pytest.mark.slow
def test_the_named_torchrun_command_runs_the_pipeline(tmp_path):
    """What the refusal above names: `torchrun --nproc_per_node=2 run.py stage=pipeline trainer=ddp ...` runs every
    step on both ranks (2 gloo processes, a one-cell grid) and writes the student's result once."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from conftest import REPO, write_image_tree

    data = write_image_tree(tmp_path / "data", n_classes=4, per_class=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ov = [f"dataset.root={data}", "dataset=imagefolder", "dataset.num_classes=4", "dataset.image_size=8"]
    ov += ["model=convnet", "model.width=8", "logger=none", f"paths.root={tmp_path / 'out'}", "ipc=2", "seed=0"]
    ov += ["trainer.num_workers=0", "recover.iterations=3", "dataset.recipe.squeeze.epochs=1"]
    ov += ["dataset.recipe.squeeze.batch_size=8", "dataset.recipe.student.epochs=1"]
    ov += ["dataset.recipe.student.batch_size=4"]
    ov += ["stage.methods=[lpld]", "stage.prunes=[1x]", "stage.baselines=[]", "stage.hard_labels=false"]
    ov += ["stage.report=false", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    ov += ["trainer.precision=32-true"]
    env = dict(os.environ, LPLD_NO_RICH="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    cmd += [str(REPO / "run.py"), "stage=pipeline", *ov]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    res = list((tmp_path / "out" / "artifacts" / "imagefolder" / "results").glob("*.jsonl"))
    recs = [json.loads(line) for f in res for line in f.read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["world_size"] == 2 and recs[0]["method"] == "lpld"


def test_ddp_trainers_get_the_lpld_group_timeout(monkeypatch):
    """Issue 20 item 4: under ddp_spawn and Lightning's own re-launch Lightning creates the process group, with its
    30-minute default; the trainers lpld builds carry LPLD_DIST_TIMEOUT_MIN (default 120) instead, and keep the
    preset's start method and options."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from lpld.stages.common import build_trainer

    monkeypatch.delenv("LPLD_DIST_TIMEOUT_MIN", raising=False)
    tr = build_trainer(compose_cfg(["stage=stats", "trainer=ddp_cpu", "logger=none"]))
    assert isinstance(tr.strategy, DDPStrategy) and tr.strategy._start_method == "spawn"
    assert tr.strategy._timeout == timedelta(minutes=120)
    monkeypatch.setenv("LPLD_DIST_TIMEOUT_MIN", "7")
    s = dist.trainer_strategy("ddp_find_unused_parameters_true")
    assert (s._timeout, s._start_method) == (timedelta(minutes=7), "popen")
    assert s._ddp_kwargs == {"find_unused_parameters": True}
    assert dist.trainer_strategy("auto") == "auto" and dist.trainer_strategy("fsdp") == "fsdp"
    one = build_trainer(compose_cfg(["stage=stats", "trainer=cpu", "logger=none"]))
    assert not isinstance(one.strategy, DDPStrategy)
