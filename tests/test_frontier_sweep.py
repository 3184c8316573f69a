"""Issue 21 item 7, CI's slow tier: the demo-sized frontier sweep runs every family end to end, and the report's
frontier.md holds each family's bytes as the accounting defines them and the goal section."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _families() -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / "experiment").glob("frontier_*.yaml"))


def test_the_two_frontier_sweeps_run_the_same_families():
    """The demo sweep is the CIFAR-10 one on other data: the same experiment files, one grid cell per job."""
    big = yaml.safe_load((REPO / "sweeps" / "frontier_cifar10.yaml").read_text())
    demo = yaml.safe_load((REPO / "sweeps" / "frontier_demo.yaml").read_text())
    for s in (big, demo):
        assert s["hydra"]["sweeper"]["params"]["experiment"] == "glob(frontier_*)"
        assert s["stage"]["methods"] == ["${recover.name}"] and s["stage"]["prunes"] == ["${prune.name}"]
    p = big["hydra"]["sweeper"]["params"]
    assert str(p["ipc"]) == "10,50" and str(p["seed"]) == "0,1,2" and p["dataset"] == "cifar10_jpg"
    assert len(_families()) == 15


@pytest.mark.slow
def test_frontier_demo_sweep_end_to_end(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", LPLD_NO_RICH="1", LPLD_ARTIFACTS=str(tmp_path / "art"))
    base = [f"paths.log_dir={tmp_path / 'logs'}", "logger=none", "trainer.num_workers=0"]
    cmd = [sys.executable, "run.py", "-cd", "sweeps", "-cn", "frontier_demo", "hydra/launcher=basic", *base]
    cmd.append(f"hydra.sweep.dir={tmp_path / 'multirun'}")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    fields = "ipc,method,quant,student.labels,student.loss,student.label_schedule,relabel.record_mode,prune.granularity"
    rows = f"stage.rows=[{fields}]"  # one row per family (the pivot refuses a cell mixing configurations)
    rep = [
        sys.executable,
        "run.py",
        "stage=report",
        "stage.results_name=frontier_demo",
        rows,
        "stage.cols=[prune]",
        *base,
    ]
    out = subprocess.run(rep, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    md = next((tmp_path / "art").rglob("frontier.md")).read_text()
    rows = [line.split("|")[1:-1] for line in md.splitlines() if line.startswith("| ") and "kB" not in line]
    rows = [[c.strip() for c in r] for r in rows if len(r) == 15]
    assert len(rows) == 15, md  # one row per family
    by = {(r[0], r[2], r[3], r[4]): r for r in rows}  # (method, prune, quant, labels)
    kb = {name: i for i, name in enumerate(["m", "ipc", "p", "q", "l", "img", "lab", "rec", "model", "total"])}
    hard = next(r for k, r in by.items() if k[3] == "hard")
    assert float(hard[kb["lab"]]) == 0.0 and float(hard[kb["model"]]) == 0.0
    online = next(r for k, r in by.items() if k[3] == "online")
    assert float(online[kb["lab"]]) == float(online[kb["rec"]]) == 0.0 and float(online[kb["model"]]) > 0
    gen = next(r for k, r in by.items() if k[3] == "generator")
    assert float(gen[kb["model"]]) > 0 and float(gen[kb["lab"]]) == 0.0
    seed20 = by[("lpld", "20x", "ms9q4r", "soft")]
    fp16 = by[("lpld", "1x", "none", "soft")]
    assert float(seed20[kb["rec"]]) < float(fp16[kb["rec"]]) / 20  # seed records: one uint64 per batch
    for r in rows:  # the total is the sum of the parts (kB, one decimal each)
        parts = sum(float(r[kb[p]]) for p in ("img", "lab", "rec", "model"))
        assert abs(parts - float(r[kb["total"]])) <= 0.25
    assert "### Goal: lpld vs LPQLD" in md and "beats LPQLD by >= 1 point at every budget" in md
