"""Ghost BatchNorm on one process = plain BatchNorm on two real DDP processes (issue 20 item 2; slow tier).

1. Core: ``torchrun --nproc_per_node=2`` (gloo, CPU, float64) trains a small BN network under DDP for a few SGD steps,
   each rank on its R rows of every batch with plain BatchNorm; this process trains the same network with
   ``convert_ghost_bn(groups=2)`` on the 2R rows. Weights and running statistics must agree: DDP averages the ranks'
   gradients and broadcasts rank 0's buffers before every forward, which is ghost BN's ``running="first"`` rule.
   With 4 ranks of 2 rows and groups of 4 rows, each group spans 2 ranks (``convert_cross_rank_bn``): the same
   steps as one ghost-BN process with 2 groups of 4.
2. Stage: ``stage=student`` with ``student.bn_rows=2`` on one process and under ``trainer=ddp_cpu`` (2 ranks of 2
   rows) gives the same training loss and accuracy, and so does ``student.bn_rows=4`` (one group over both ranks);
   with ``student.bn_rows=0`` one process differs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, compose_cfg

pytestmark = pytest.mark.slow

ROWS, STEPS = 4, 4

NET = """
import torch
from torch import nn


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
    ).double()


def batch(step, n):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64) * 2 + 1
    return x, torch.randint(0, 5, (n,), generator=g)
"""

WORKER = (
    NET
    + """
import sys
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

rows, steps, out, span, running = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = net().train()
if span > 1:  # BatchNorm groups over `span` consecutive ranks (lpld's cross-rank groups)
    from lpld.core.ghost_bn import convert_cross_rank_bn

    model = convert_cross_rank_bn(model, span, running)
model = DDP(model)  # broadcast_buffers=True: rank 0's BN buffers before every forward
opt = torch.optim.SGD(model.parameters(), lr=0.5)
for step in range(steps):
    x, y = batch(step, rows * world)
    sl = slice(rank * rows, (rank + 1) * rows)
    opt.zero_grad()
    F.cross_entropy(model(x[sl]), y[sl]).backward()
    opt.step()
if rank == 0:
    torch.save(model.module.state_dict(), out)
dist.destroy_process_group()
"""
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_one_process(groups: int, n: int, running: str = "first") -> dict:
    from lpld.core.ghost_bn import convert_ghost_bn

    ns: dict = {}
    exec(NET, ns)  # the same network and batches as the workers
    model = convert_ghost_bn(ns["net"]().train(), groups, running)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(STEPS):
        x, y = ns["batch"](step, n)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.state_dict()


def _torchrun(tmp_path, nproc: int, rows: int, span: int, running: str = "first") -> dict:
    """rank 0's state_dict after STEPS DDP steps of ``nproc`` gloo ranks holding ``rows`` rows each."""
    worker, out = tmp_path / "worker.py", tmp_path / f"rank0_{nproc}_{span}.pt"
    worker.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout's lpld
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
    cmd += [str(worker), str(rows), str(STEPS), str(out), str(span), running]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("running", ["first", "mean"])
def test_torchrun_four_ranks_with_two_rank_groups_equal_one_ghost_bn_process(tmp_path, running):
    """bn_rows = 4 on 4 ranks of 2 rows (in1k's 32 rows on 8 devices, scaled down): each BatchNorm group spans 2
    consecutive ranks; one process with groups of 4 of its 8 rows computes the same steps and running statistics
    (either running rule)."""
    ddp = _torchrun(tmp_path, nproc=4, rows=2, span=2, running=running)
    ghost = _train_one_process(groups=2, n=8, running=running)
    for k in ddp:
        torch.testing.assert_close(ghost[k], ddp[k], rtol=1e-9, atol=1e-10, msg=k)
    per_rank = _train_one_process(groups=4, n=8)  # BatchNorm over each rank's 2 rows: another experiment
    assert max(float((per_rank[k].double() - ddp[k].double()).abs().max()) for k in ddp) > 1e-4


def test_torchrun_two_plain_bn_ranks_equal_one_ghost_bn_process(tmp_path):
    ddp = _torchrun(tmp_path, nproc=2, rows=ROWS, span=1)
    ghost = _train_one_process(groups=2, n=2 * ROWS)
    plain = _train_one_process(groups=1, n=2 * ROWS)
    assert list(ddp) == list(ghost)
    for k in ddp:  # weights after 4 steps and the running statistics (rank 0's = the first group's)
        torch.testing.assert_close(ghost[k], ddp[k], rtol=1e-9, atol=1e-10, msg=k)
    assert int(ghost["1.num_batches_tracked"]) == STEPS
    # not vacuous: plain BatchNorm over the 2R rows of one process is another experiment
    assert max(float((plain[k].double() - ddp[k].double()).abs().max()) for k in ddp) > 1e-4


def test_student_stage_bn_rows_gives_one_process_the_two_rank_run(tmp_path):
    """stage=student, batch 4: ``student.bn_rows=2`` on one process (2 ghost groups) and under ddp_spawn with 2 CPU
    ranks (2 rows each, one group) trains the same student; ``bn_rows=0`` (each rank's rows) does not."""
    from test_student import base_overrides, prepare_store

    from lpld.artifacts import results as results_artifact
    from lpld.report.records import load_records
    from lpld.stages import student

    cfg = prepare_store(tmp_path)
    ov = base_overrides(tmp_path)
    runs = {
        "one": ["student.bn_rows=2"],
        "two": ["student.bn_rows=2", "trainer=ddp_cpu"],
        "one_plain": ["student.bn_rows=0"],
        "one_4": ["student.bn_rows=4"],  # the whole batch of 4 ...
        "two_4": ["student.bn_rows=4", "trainer=ddp_cpu"],  # ... as one group over the 2 ranks of 2 rows
    }
    recs = {}
    for name, extra in runs.items():
        c = compose_cfg(["stage=student", *ov, *extra, f"stage.results_name={name}"])
        student.run(c)
        recs[name] = load_records(results_artifact.dir(cfg) / f"{name}.jsonl")[0]
    one, two, plain = recs["one"], recs["two"], recs["one_plain"]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["config"]["student"]["bn_rows"] == two["config"]["student"]["bn_rows"] == 2
    assert one["last_epoch_steps"] == two["last_epoch_steps"] > 1
    la, lb, lp = one["last_epoch_train_loss"], two["last_epoch_train_loss"], plain["last_epoch_train_loss"]
    print(f"last-epoch train loss: bn_rows=2 1 process {la:.7f}, 2 ranks {lb:.7f}; bn_rows=0 1 process {lp:.7f}")
    assert lb == pytest.approx(la, rel=1e-4, abs=1e-6)
    assert one["top1"] == pytest.approx(two["top1"], abs=1e-9)
    assert abs(lp - la) > 1e-3 * abs(la), "bn_rows must change the one-process run, or this test proves nothing"
    l4, l4x2 = recs["one_4"]["last_epoch_train_loss"], recs["two_4"]["last_epoch_train_loss"]
    print(f"bn_rows=4: 1 process {l4:.7f}, 2 ranks (one group over both) {l4x2:.7f}")
    assert l4x2 == pytest.approx(l4, rel=1e-4, abs=1e-6) and recs["one_4"]["top1"] == pytest.approx(
        recs["two_4"]["top1"]
    )
    assert abs(l4 - la) > 1e-3 * abs(la)
