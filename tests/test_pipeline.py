"""`python run.py` pipeline: a reduced demo in the fast tier, the full default job in the slow tier."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

REDUCED = [
    "model.width=16",
    "ipc=2",
    "dataset.recipe.squeeze.epochs=1",
    "dataset.recipe.recover.iterations=4",
    "dataset.recipe.student.epochs=2",
    "dataset.recipe.student.batch_size=8",
    "stage.prunes=[1x,10x]",
    "logger=none",
    "trainer.num_workers=0",
]


def run_pipeline(tmp_path, extra: list[str], timeout: int):
    cmd = [sys.executable, str(REPO / "run.py"), f"paths.root={tmp_path}", *extra]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def loss_of(rec) -> str:
    return rec.get("loss") or rec["config"]["student"]["loss"]


def read_records(tmp_path):
    files = list((tmp_path / "artifacts" / "demo" / "results").glob("pipeline_*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def test_reduced_demo_pipeline(tmp_path):
    r = run_pipeline(tmp_path, REDUCED, timeout=900)
    out = r.stdout
    assert "| method | ipc | prune |" in out
    recs = read_records(tmp_path)
    # lpld x {1x, 10x} + sre2l 1x + random_real 1x + lpld hard labels
    cells = sorted((x["method"], x["prune"]["name"], loss_of(x)) for x in recs)
    assert cells == sorted(
        [
            ("lpld", "1x", "kl"),
            ("lpld", "10x", "kl"),
            ("sre2l", "1x", "kl"),
            ("random_real", "1x", "kl"),
            ("lpld", "1x", "ce"),
        ]
    )
    by = {(x["method"], x["prune"]["name"]): x for x in recs if loss_of(x) != "ce"}
    assert by[("lpld", "10x")]["label_bytes"] < by[("lpld", "1x")]["label_bytes"]
    reports = list((tmp_path / "artifacts" / "demo" / "results" / "reports").glob("*/pareto.png"))
    assert reports, "no Pareto plot written"
    # a second run reuses every artifact: no new records, same table
    r2 = run_pipeline(tmp_path, REDUCED, timeout=600)
    assert len(read_records(tmp_path)) == len(recs)
    log = r2.stdout + r2.stderr
    assert "reusing" in log and "already finished" in log


@pytest.mark.slow
def test_full_default_job(tmp_path):
    """`python run.py` with no arguments: teacher >= 85%, soft labels beat hard labels."""
    run_pipeline(tmp_path, ["logger=none"], timeout=3600)
    import torch

    teacher = torch.load(tmp_path / "artifacts/demo/convnet/teacher/teacher.pt", weights_only=True)
    assert teacher["val"]["val/acc1"] >= 0.85
    recs = read_records(tmp_path)
    soft = [x for x in recs if x["method"] == "lpld" and x["prune"]["name"] == "1x" and loss_of(x) != "ce"]
    hard = [x for x in recs if x["method"] == "lpld" and loss_of(x) == "ce"]
    assert soft and hard and soft[-1]["top1"] > hard[-1]["top1"]


def test_the_pipelines_results_file_is_keyed_by_its_config(tmp_path):
    """Issue 19: a smoke run with other epochs and the real run appended to one results file and the report then
    refused the mix; now each config has its own file, while seeds and a multirun's grid axes (prune, recover) share
    one (so its report aggregates seeds and tabulates the grid)."""
    from conftest import compose_cfg

    from lpld.artifacts.results import pipeline_name

    def name(*ov):
        return pipeline_name(compose_cfg(["stage=pipeline", f"paths.root={tmp_path}", *ov]))

    base = name()
    assert base.startswith("pipeline_convnet_ipc10_") and base == name()
    assert name("relabel.epochs=2") != base and name("recover.iterations=5") != base and name("ipc=3") != base
    assert name("seed=1") == base and name("prune=10x") == base and name("recover=sre2l") == base
    assert name("logger=none") == base and name("trainer.num_workers=3") == base  # where / how it logs: not results
    assert name("stage.results_name=mine") == "mine"
