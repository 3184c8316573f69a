"""Every sweep file composes with the main conf/ tree for every value it sweeps; a tiny sweep launches."""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
PAPER_SWEEPS = {
    "prune_grid",
    "ablation",
    "metrics",
    "metrics_calibration",
    "cross_arch",
    "rded",
    "gvbsm",
    "lpqld",
    "cifar10_cpu",
    "eq8",
    "diversity",
}


def _values(key: str, spec: str) -> list[str]:
    """Expand one sweeper param: "a,b,c" or glob(pattern) over the options of config group `key`."""
    spec = str(spec).strip()
    if spec.startswith("glob(") and spec.endswith(")"):
        pattern = spec[5:-1]
        opts = sorted(p.stem for p in (REPO / "conf" / key).glob("*.yaml"))
        hits = [o for o in opts if fnmatch.fnmatch(o, pattern)]
        assert hits, f"glob({pattern}) matches no conf/{key}/*.yaml"
        return hits
    return [v.strip() for v in spec.split(",")]


def test_all_paper_sweeps_exist():
    assert PAPER_SWEEPS <= {p.stem for p in SWEEPS}


def _check_job(cfg, chosen: dict[str, str], groups: set[str]) -> None:
    for key, v in chosen.items():
        if key in groups:
            assert cfg.hydra.runtime.choices[key] == v
        else:  # `+a.b` adds the key a.b
            assert OmegaConf.select(cfg, key.lstrip("+")) == yaml.safe_load(v)
    from lpld.config.schema import unknown_keys

    assert not unknown_keys(cfg), unknown_keys(cfg)  # every knob a sweep sets is one the typed schemas know
    job = OmegaConf.to_container(cfg, resolve=False)
    del job["hydra"]  # resolved per job at launch time (hydra.job.num ...)
    OmegaConf.to_container(OmegaConf.create(job), resolve=True)  # the job config's interpolations resolve


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_composes_for_every_swept_value(path, monkeypatch):
    """Compose the first and the last job of the grid, and one job per experiment file; every other swept
    group option must exist as a file (composing all 300+ jobs would take minutes)."""
    text = path.read_text()
    assert text.startswith("# "), f"{path.name}: start with a header comment naming the paper table"
    raw = yaml.safe_load(text)
    assert raw["defaults"][0] == "/config" and raw["defaults"][-1] == "_self_"
    monkeypatch.chdir(REPO)  # hydra.searchpath file://conf is relative to the working directory
    groups = {p.name for p in (REPO / "conf").iterdir() if p.is_dir()}
    with initialize_config_dir(config_dir=str(REPO / "sweeps"), version_base="1.3"):
        base = compose(path.stem, return_hydra_config=True)
        assert str(base.hydra.mode) == "RunMode.MULTIRUN"
        params = {k: _values(k, v) for k, v in OmegaConf.to_container(base.hydra.sweeper.params).items()}
        assert params, f"{path.name} sweeps nothing"
        assert len(list(itertools.product(*params.values()))) >= 2
        for key, vals in params.items():
            for v in vals:
                if key in groups:
                    assert (REPO / "conf" / key / f"{v}.yaml").exists(), f"{path.name}: no conf/{key}/{v}.yaml"
                if key == "student.arch":
                    assert (REPO / "conf" / "model" / f"{v}.yaml").exists(), f"{path.name}: no conf/model/{v}.yaml"
        for pick in (0, -1):
            chosen = {k: v[pick] for k, v in params.items()}
            _check_job(
                compose(path.stem, overrides=[f"{k}={v}" for k, v in chosen.items()], return_hydra_config=True),
                chosen,
                groups,
            )
        for v in params.get("experiment", [])[1:-1]:
            _check_job(
                compose(path.stem, overrides=[f"experiment={v}"], return_hydra_config=True), {"experiment": v}, groups
            )


def test_slurm_launcher_config():
    cfg = yaml.safe_load((REPO / "conf" / "hydra" / "launcher" / "slurm.yaml").read_text())
    assert cfg["defaults"][0] == "submitit_slurm"
    for k in ("partition", "timeout_min", "gpus_per_node", "tasks_per_node", "array_parallelism", "submitit_folder"):
        assert k in cfg


def test_tiny_sweep_launches_two_jobs(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", LPLD_NO_RICH="1")
    cmd = [
        sys.executable,
        "run.py",
        "-cd",
        "sweeps",
        "-cn",
        "eq8",
        "hydra/launcher=basic",
        "logger=none",
        "stage.eq8.batch_size=8,256",  # replaces the file's 64,256: with 10 classes q_c is ~1 from B ~ 64 on
        f"paths.artifacts={tmp_path / 'art'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = sorted((tmp_path / "art").rglob("eq8_B*.json"))
    assert [f.name for f in files] == ["eq8_B256.json", "eq8_B8.json"]
    b256, b8 = (json.loads(f.read_text()) for f in files)
    assert b8["num_images"] == b256["num_images"] == 8000  # demo train split, 800 per class
    assert b8["n"] > b256["n"]  # smaller batches: a class appears in fewer of them
    assert (tmp_path / "multirun" / "0").is_dir() and (tmp_path / "multirun" / "1").is_dir()
    assert "n >= " in out.stdout


def test_a_sweep_file_composes_from_any_working_directory(tmp_path):
    """Issue 19: the sweep files found conf/ relative to the working directory, so a sweep launched outside the
    repository root warned "path=conf is not available" for every job; run.py now gives Hydra the absolute path."""
    env = {k: v for k, v in os.environ.items() if k != "LPLD_CONF"}
    r = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "-cd", str(REPO / "sweeps"), "-cn", "prune_grid", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "is not available" not in r.stderr, r.stderr
    assert yaml.safe_load(r.stdout)["dataset"]["name"]


def test_the_slurm_launcher_without_its_plugin_is_one_line_naming_the_install(tmp_path):
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401

        pytest.skip("the SLURM launcher plugin is installed here")
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("LPLD_DEBUG", "HYDRA_FULL_ERROR")}
    r = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "-m", "stage=show", "hydra/launcher=slurm", "logger=none"]
        + [f"paths.root={tmp_path}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("lpld error: hydra/launcher=slurm needs") and 'pip install -e ".[slurm]"' in lines[0]
    assert "Traceback" not in r.stderr
