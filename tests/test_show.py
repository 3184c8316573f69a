"""``stage=show`` / ``show=true``: the resolved experiment and the artifacts a run reads and writes.

show == W&B config == results record config (one function, :func:`lpld.config.experiment.experiment_config`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, compose_cfg, make_tiny_chain
from wandb_files import run_view

from lpld.stages import STAGES, run_stage

IPC = 3


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_tiny_chain(tmp_path_factory.mktemp("show"))


def _show(overrides: list[str]) -> dict:
    return run_stage(compose_cfg(["stage=show", *overrides]))


def test_show_equals_wandb_config_equals_record_config(chain, monkeypatch, capsys):
    tmp, ov = chain
    wdir = tmp / "wandb_runs"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wdir))
    ov = [*ov, "logger=wandb", f"logger.dir={wdir}"]
    shown = run_stage(compose_cfg(["stage=student", *ov, "stage.results_name=show_eq", "show=true"]))["config"]
    # what the shown stage resolves (not the YAML's nulls): the store's schedule and the recipe's values
    assert shown["stage"]["name"] == "student" and shown["student"]["epochs"] == 2
    assert shown["relabel"]["batch_size"] == 4 and shown["prune"]["name"] == "1x"
    student = compose_cfg(["stage=student", *ov, "stage.results_name=show_eq"])
    run_stage(student)
    from lpld.artifacts import results
    from lpld.report.records import load_records

    rec = load_records(results.path(student, "show_eq"))[-1]
    assert rec["config"] == shown
    runs = sorted(wdir.rglob("offline-run-*"))
    assert runs, f"no offline W&B run under {wdir}"
    logged = run_view(runs[-1])["config"]
    # W&B also holds the LightningModule's hyperparameters (log_hyperparams); every experiment key is equal
    assert {k: logged.get(k) for k in shown} == json.loads(json.dumps(shown))
    capsys.readouterr()


def test_show_lists_artifacts_with_status_and_the_closest_existing_one(chain, capsys):
    tmp, ov = chain
    out = _show(["stage.of=relabel", *ov])
    kinds = {(role, kind): status for role, kind, _k, _p, status in out["artifacts"]}
    assert kinds == {("read", "teacher"): "complete", ("read", "images"): "complete", ("write", "labels"): "complete"}
    # another ipc: the images this run would read do not exist; show names the ones that do and what differs
    capsys.readouterr()
    out = _show(["stage.of=relabel", *ov, "ipc=2"])
    text = capsys.readouterr().out
    assert ("read", "images", "missing") in {(a[0], a[1], a[4]) for a in out["artifacts"]}
    assert "closest existing images" in text and "ipc: exists with 3, this run asks 2" in text
    yaml.safe_load(text)  # the experiment part is valid YAML (the artifacts are comments)


def test_finished_stages_index_the_values_behind_their_keys(chain):
    tmp, ov = chain
    from lpld.artifacts import catalog
    from lpld.artifacts.base import root

    cfg = compose_cfg(["stage=relabel", *ov])
    listed = {(r.kind, r.status) for r in catalog.listing(root(cfg), str(cfg.dataset.name))}
    assert {("images", "complete"), ("labels", "complete")} <= listed
    images = next(r for r in catalog.listing(root(cfg), str(cfg.dataset.name)) if r.kind == "images")
    assert images.values["ipc"] == IPC and images.values["method"] == "random_real"


@pytest.mark.parametrize("stage", sorted(s for s in STAGES if s not in ("show", "artifacts", "pipeline")))
def test_show_works_for_every_stage(stage, tmp_path, capsys):
    out = _show([f"stage.of={stage}", f"paths.root={tmp_path}", "logger=none"])
    assert out["config"]["stage"]["name"] == stage
    assert all(status == "missing" for *_, status in out["artifacts"])


@pytest.mark.parametrize(
    "dataset", ["demo", "fmnist", "cifar10", "cifar100", "cifar10_jpg", "imagefolder", "tiny", "in1k", "in21k"]
)
def test_show_works_for_every_dataset_preset(dataset, tmp_path, capsys):
    extra = ["dataset.num_classes=10"] if dataset == "imagefolder" else []  # the one preset without classes
    # the student reads images and labels, so its show resolves the recover, relabel and student sections
    out = _show(["stage.of=student", f"dataset={dataset}", *extra, f"paths.root={tmp_path}", "logger=none"])
    assert out["config"]["dataset"]["name"] == dataset
    assert out["config"]["recover"]["iterations"] is not None  # resolved, not the schema's null
    assert out["config"]["relabel"]["epochs"] is not None
    assert [a[1] for a in out["artifacts"]] == ["images", "labels", "results"]


def test_show_of_the_pipeline_lists_every_step(tmp_path, monkeypatch, capsys):

    base = [f"paths.root={tmp_path}", "logger=none"]
    out = _show(base)
    kinds = [(role, kind) for role, kind, *_ in out["artifacts"]]
    assert kinds.count(("write", "teacher")) == 1 and kinds.count(("write", "stats")) == 1
    assert kinds.count(("write", "images")) == 3  # lpld, sre2l, random_real
    assert kinds.count(("write", "labels")) == 5  # lpld 1x/10x/40x, sre2l 1x, random_real 1x (hard reuses lpld 1x)
    assert not [k for k in kinds if k[0] == "read"]  # every input is made by an earlier step


def test_stage_show_refuses_what_it_cannot_describe(tmp_path):
    from lpld.errors import ConfigError

    with pytest.raises(ConfigError, match="stage.of='bogus'"):
        _show(["stage.of=bogus", f"paths.root={tmp_path}"])


def test_stage_show_on_the_command_line(tmp_path):
    env = dict(os.environ, LPLD_ARTIFACTS=str(tmp_path / "art"), WANDB_MODE="offline")
    r = subprocess.run(
        [sys.executable, "run.py", "stage=squeeze", "stage.epochs=3", "show=true", f"paths.log_dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "write teacher  missing" in r.stdout
    doc = yaml.safe_load(r.stdout)
    assert doc["stage"]["epochs"] == 3 and doc["overrides"] == [
        "stage=squeeze",
        "stage.epochs=3",
        f"paths.log_dir={tmp_path}",
    ]
    assert not (tmp_path / "art").exists()  # nothing is written


def test_missing_artifact_errors_name_the_closest_existing_one(chain):
    """One override short of the existing images / label store: the error says which values differ."""
    from lpld.errors import ArtifactError

    tmp, ov = chain
    with pytest.raises(ArtifactError, match="closest existing images: .* ipc: exists with 3, this run asks 2"):
        run_stage(compose_cfg(["stage=relabel", *ov, "ipc=2"]))
    with pytest.raises(ArtifactError, match=r"no label store .* closest existing labels: .*relabel.epochs: exists"):
        run_stage(compose_cfg(["stage=student", *ov, "dataset.recipe.student.epochs=5"]))


def test_stage_artifacts_lists_what_exists_with_its_key_values(chain, capsys):
    tmp, ov = chain
    out = run_stage(compose_cfg(["stage=artifacts", *ov]))
    text = capsys.readouterr().out
    kinds = {(r["kind"], r["status"]) for r in out}
    assert {("teacher", "complete"), ("images", "complete"), ("labels", "complete")} <= kinds
    assert "ipc=3" in text and "recover=random_real" in text
    # the teacher was saved by hand (never through stage=squeeze): listed from the layout, values unknown
    assert "values unknown" in text
    only = run_stage(compose_cfg(["stage=artifacts", "stage.kind=images", *ov]))
    assert {r["kind"] for r in only} == {"images"}


def test_a_group_choice_on_the_command_line_drives_the_pipelines_grid():
    """Issue 19: `python run.py -m prune=1x,10x,40x` (stage=pipeline) ran the pipeline's own grid in every job."""
    from lpld.stages.pipeline import Pipeline

    def students(base: list[str]) -> list[list[str]]:
        return [
            c for name, c, _ in Pipeline(compose_cfg(["stage=pipeline", *base]), base=base).plan() if name == "student"
        ]

    default = students([])
    assert {c[1] for c in default} == {"prune=1x", "prune=10x", "prune=40x"}
    only = students(["prune=10x"])
    assert {c[1] for c in only} == {"prune=10x"} and {c[0] for c in only} == {
        "recover=lpld",
        "recover=sre2l",
        "recover=random_real",
    }
    sre2l = students(["recover=sre2l"])
    assert {c[0] for c in sre2l} == {"recover=sre2l"} and {c[1] for c in sre2l} == {
        "prune=1x",
        "prune=10x",
        "prune=40x",
    }
