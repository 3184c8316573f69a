"""What a W&B user sees, read back from the offline run files (``tests/wandb_files.run_view``): one group per
pipeline / sweep invocation, job_type = stage (relabel included), names with method / ipc / prune / quant /
seed, the resolved config (prune and quant inside), summary top-1 = the results record's, a numeric report table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import compose_cfg, tiny_overrides, write_image_tree
from wandb_files import run_view

from lpld.stages import run_stage

N_CLASSES, IPC, SIZE = 4, 3, 8
GROUP = "wandbview-20261206-000000"


def _save_random_teacher(cfg) -> None:
    import torch

    from lpld.artifacts import teacher
    from lpld.core.io import atomic_torch_save, fingerprint_state_dict
    from lpld.stages.common import build_teacher_model

    torch.manual_seed(0)
    state = build_teacher_model(cfg).state_dict()
    atomic_torch_save(teacher.path(cfg), {"state_dict": state, "fingerprint": fingerprint_state_dict(state), "val": {}})


def _view(run_dir: Path, timeout: float = 20.0) -> dict:
    """run_view once wandb's service has flushed the run's records (on a loaded machine it lags wandb.finish)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        v = run_view(run_dir)
        if "job_type" in v and v["summary"] or time.monotonic() > deadline:
            return v
        time.sleep(0.2)


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """A tiny chain logged to W&B offline (teacher saved, recover=random_real, relabel, student with epochs=2 <
    stage.val_every, report), as one pipeline would run it (the same logger.group); the runs' views by stage."""
    tmp = tmp_path_factory.mktemp("wandbview")
    root, wdir = tmp / "data", tmp / "wandb_runs"
    write_image_tree(root, n_classes=N_CLASSES, per_class=6, size=SIZE)
    ov = [
        *tiny_overrides(tmp, root, n_classes=N_CLASSES, size=SIZE),
        f"ipc={IPC}",
        "recover=random_real",
        "dataset.recipe.student.epochs=2",
        "dataset.recipe.student.batch_size=4",
        "dataset.recipe.student.rrc_scale=[0.5,1.0]",
        "logger=wandb",
        f"logger.dir={wdir}",
        f"logger.group={GROUP}",
        "prune=1x",
        "quant=none",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp / "elsewhere"))  # an explicit logger.dir wins over WANDB_DIR
        _save_random_teacher(compose_cfg(["stage=squeeze", *ov]))
        run_stage(compose_cfg(["stage=recover", *ov]))
        run_stage(compose_cfg(["stage=relabel", *ov]))
        student = compose_cfg(["stage=student", *ov, "stage.results_name=wv"])
        assert int(student.stage.val_every) > 2  # the fit itself logs no validation
        run_stage(student)
        run_stage(compose_cfg(["stage=report", *ov, "stage.results_name=wv", "stage.pareto=false"]))
    from lpld.artifacts import results
    from lpld.report.records import load_records

    record = load_records(results.path(student, "wv"))[-1]
    runs = sorted(wdir.rglob("offline-run-*"))
    assert not (tmp / "elsewhere").exists()
    by_stage: dict[str, dict] = {}
    for r in runs:
        v = _view(r)
        v["dir"] = r
        by_stage.setdefault(v["job_type"], v)
    return by_stage, record, {"ov": ov, "results": results.path(student, "wv"), "wdir": wdir}


def test_every_stage_has_a_run_in_the_pipelines_group_with_its_job_type_and_name(views):
    by_stage, _, _ = views
    assert {"recover", "relabel", "student", "report"} <= set(by_stage)
    assert {v["group"] for v in by_stage.values()} == {GROUP}
    assert by_stage["recover"]["name"] == f"recover-random_real-ipc{IPC}-s0"
    assert by_stage["relabel"]["name"] == f"relabel-random_real-ipc{IPC}-1x-none-s0"
    assert by_stage["student"]["name"] == f"student-random_real-ipc{IPC}-1x-none-s0"


def test_config_holds_prune_and_quant_and_the_summary_holds_the_records_accuracy(views):
    by_stage, record, _ = views
    st = by_stage["student"]
    assert st["config"]["prune"]["name"] == "1x" and "quant" in st["config"]
    assert st["config"]["stage"]["name"] == "student"
    # epochs (2) < val_every: only the final evaluation gives top-1, and it is the record's float exactly
    assert st["summary"]["top1"] == record["top1"] and st["summary"]["val/top1"] == record["top1"]
    assert st["summary"]["top5"] == record["top5"]
    rl = by_stage["relabel"]
    assert rl["summary"]["relabel/batches"] > 0 and rl["summary"]["relabel/label_bytes"] > 0
    assert "relabel/record_bytes" in rl["summary"] and rl["config"]["prune"]["name"] == "1x"


def test_report_logs_a_numeric_table_and_a_native_chart(views):
    by_stage, record, _ = views
    rep = by_stage["report"]
    keys = {k.split(".")[0] for k in rep["summary"]}  # a logged table is a summary entry with nested fields
    # wandb.plot.line_series / scatter: the chart's data table is logged beside the chart spec
    assert {"report/table", "report/points", "report/top1_vs_label_bytes_table"} <= keys
    files = list(Path(rep["dir"]).rglob("report/table_*.table.json"))
    assert files, "the table's data file"
    import json

    tbl = json.loads(files[0].read_text())
    cols = tbl["columns"]
    assert cols[-3:] == ["top1_mean", "top1_std", "n"]
    (row,) = tbl["data"]
    assert isinstance(row[-3], float) and row[-3] == pytest.approx(100 * record["top1"])
    assert isinstance(row[-1], int)


def test_pipeline_group_is_one_per_invocation(tmp_path):
    from lpld.stages.pipeline import Pipeline

    cfg = compose_cfg(["stage=pipeline", f"paths.root={tmp_path}", "logger=wandb"])
    base = Pipeline(cfg, base=[]).base
    (group,) = [o.split("=", 1)[1] for o in base if o.startswith("logger.group=")]
    assert re.fullmatch(r"pipeline_convnet_ipc10_[0-9a-f]{8}-\d{8}-\d{6}", group)


def test_names_are_unique_across_a_pipelines_plan(tmp_path, monkeypatch):
    from lpld.stages.common import run_name
    from lpld.stages.pipeline import Pipeline, compose_step

    base = [f"paths.root={tmp_path}", "logger=none"]
    pipe = Pipeline(compose_cfg(["stage=pipeline", *base]), base=base)
    # distinct steps (the hard-label cell's relabel step reuses the 1x store: it finds it complete, logs no run)
    steps = dict.fromkeys((n, tuple(ch)) for n, ch, _ in pipe.plan())
    names = [run_name(compose_step(base, [f"stage={n}", *ch]), n) for n, ch in steps]
    assert len(names) == len(set(names)), names


def test_wandb_dir_is_honoured_unless_logger_dir_is_given(monkeypatch):
    monkeypatch.setenv("WANDB_DIR", "/tmp/lpld-wandb-dir")
    assert compose_cfg(["logger=wandb"]).logger.dir == "/tmp/lpld-wandb-dir"
    assert compose_cfg(["logger=wandb", "logger.dir=/tmp/x"]).logger.dir == "/tmp/x"


def test_a_sweeps_report_runs_over_the_results_its_jobs_wrote_in_the_sweeps_group(views, monkeypatch, capsys):
    from lpld.stages.callbacks import report_results

    ctx = views[2]
    monkeypatch.setenv("WANDB_MODE", "offline")
    over = [o for o in ctx["ov"] if not o.startswith("logger.group=")]
    before = set(ctx["wdir"].rglob("offline-run-*"))
    out = report_results({"results": str(ctx["results"]), "group": "config-sweep1", "overrides": over})
    assert (Path(out["out_dir"]) / "report.md").exists()
    (new,) = set(ctx["wdir"].rglob("offline-run-*")) - before
    v = _view(new)
    assert v["job_type"] == "report" and v["group"] == "config-sweep1"
    assert "report/table.nrows" in v["summary"]
    capsys.readouterr()


@pytest.mark.slow
def test_a_multirun_ends_with_its_table_logged_in_the_sweeps_group(views, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    ctx = views[2]
    over = [o for o in ctx["ov"] if not o.startswith("logger.group=")]
    wdir, sweep = tmp_path / "wb", tmp_path / "sweep"
    over = [o if not o.startswith("logger.dir=") else f"logger.dir={wdir}" for o in over]
    env = dict(os.environ, WANDB_MODE="offline", LPLD_NO_RICH="1")
    cmd = [sys.executable, str(REPO / "run.py"), "-m", "stage=student", *over, "stage.results_name=sweep_wv"]
    cmd += ["student.lr=0.003,0.004", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    views_ = [_view(d) for d in sorted(wdir.rglob("offline-run-*"))]
    group = f"config-{sweep.name}"
    assert sorted(v["job_type"] for v in views_) == ["report", "student", "student"]
    assert {v["group"] for v in views_} == {group}
    assert "report-sweep_wv" in {v["name"] for v in views_}
    # the two jobs differ in student.lr: the sweep's table splits its rows by it
    md = next((ctx["results"].parent / "reports" / "sweep_wv").glob("report.md")).read_text()
    assert "student.lr" in md
