"""Slower student tiers: the CLI chain recover -> relabel -> student, and DDP with 2 CPU processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, compose_cfg
from test_student import base_overrides, prepare_store, save_random_teacher

from lpld.artifacts import results as results_artifact
from lpld.report.records import load_records

pytestmark = pytest.mark.slow


def test_cli_recover_relabel_student(tmp_path):
    ov = base_overrides(tmp_path)
    save_random_teacher(compose_cfg(["stage=recover", *ov]))
    cmd = [sys.executable, str(REPO / "run.py")]
    for stage in ("recover", "relabel", "student"):
        r = subprocess.run([*cmd, f"stage={stage}", *ov], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"stage={stage}: {r.stderr[-3000:]}"
    recs = load_records(results_artifact.dir(compose_cfg(["stage=student", *ov])))
    assert len(recs) == 1 and recs[0]["config"]["stage"]["name"] == "student"


def test_student_ddp_two_cpu_processes(tmp_path):
    """ddp_spawn with 2 CPU ranks trains the same recipe as 1 process: the same optimizer steps, each on one
    whole stored batch (rows summed over ranks), and a last-epoch train loss close to it."""
    from lpld.stages import student

    cfg = prepare_store(tmp_path)
    student.run(cfg)
    ddp = compose_cfg(["stage=student", *base_overrides(tmp_path), "trainer=ddp_cpu", "stage.results_name=ddp"])
    student.run(ddp)
    one = load_records(results_artifact.dir(cfg) / "results.jsonl")[0]
    two = load_records(results_artifact.dir(ddp) / "ddp.jsonl")[0]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["config"]["trainer"]["devices"] == 2
    batch = int(one["global_batch"])
    assert two["global_batch"] == batch == 4
    # 3 epochs x ceil(N / 4) stored batches: one optimizer step per stored batch on both
    assert one["last_epoch_steps"] == two["last_epoch_steps"] > 1
    assert one["last_epoch_rows"] == two["last_epoch_rows"] == one["last_epoch_steps"] * batch
    assert one["rows_per_step"] == two["rows_per_step"] == batch
    assert one["run_key"] != two["run_key"]  # world size is part of the run identity (BN over half batches)
    # same data, same steps, same lr: the loss differs only by BatchNorm over each rank's half batch
    la, lb = one["last_epoch_train_loss"], two["last_epoch_train_loss"]
    assert abs(la - lb) <= 0.1 * abs(la), (la, lb)
