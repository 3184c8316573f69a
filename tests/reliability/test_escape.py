"""Nothing a crafted manifest, a config name or an environment variable says makes lpld read or write outside the
artifacts folder (issue 22, items 1-3).

Every case builds its artifacts under ``<tmp>/work`` and a sentinel file in ``<tmp>/outside``; afterwards the
sentinel keeps its sha256 and no file outside ``<tmp>/work`` has appeared or changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, compose_cfg

from lpld.artifacts import base, images, labels, results, stats, students, teacher
from lpld.core.io import ArtifactError, inside
from lpld.core.label_store import LabelStore, finalize, prepare
from lpld.core.label_store import writer as store_writer
from lpld.core.label_store.layout import ArraySpec
from lpld.core.relabel import generate
from lpld.errors import ConfigError

from .helpers import META, build_store, spec
from .helpers import images as store_images
from .helpers import teacher as store_teacher


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


class Guard:
    """A sentinel outside the work folder, and a snapshot of every file outside it."""

    def __init__(self, tmp: Path):
        self.tmp, self.work, self.outside = tmp, tmp / "work", tmp / "outside"
        self.work.mkdir(exist_ok=True)
        self.outside.mkdir(exist_ok=True)
        self.sentinel = self.outside / "sentinel.npy"
        np.save(self.sentinel, np.arange(64, dtype=np.float16).reshape(8, 8))
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, str]:
        out = {}
        for p in self.tmp.rglob("*"):
            if self.work in p.parents or p == self.work or p.is_dir():
                continue
            out[str(p.relative_to(self.tmp))] = "link" if p.is_symlink() else _digest(p)
        return out

    def check(self) -> None:
        assert self.snapshot() == self.before, "a file outside the artifacts folder appeared or changed"


@pytest.fixture
def guard(tmp_path) -> Guard:
    return Guard(tmp_path)


_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # records opens only inside watch_opens() (audit hooks cannot be removed)


@contextlib.contextmanager
def watch_opens() -> Iterator[list[str]]:
    """Every path the process opens inside the block (sys.audit's ``open`` events)."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def _edit_manifest(store: Path, **files: str) -> None:
    man = json.loads((store / "manifest.json").read_text())
    for name, value in files.items():
        man["arrays"][name]["file"] = value
    (store / "manifest.json").write_text(json.dumps(man))


def _partial_store(path: Path) -> Path:
    """A store whose relabel was interrupted after two committed batches (as after kill -9)."""

    class Killed(Exception):
        pass

    def stop(i: int) -> None:
        if i >= 1:
            raise Killed

    assert prepare(path, spec(), META) == "new"
    with pytest.raises(Killed):
        generate(path, store_teacher(), store_images(), chunk=1, on_batch=stop)
    assert list(path.glob("progress.*.npy"))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# 1. label-store manifests
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_resume_refuses_a_manifest_that_points_outside_the_store(guard, how):
    store = _partial_store(guard.work / "artifacts" / "store")
    # a valid .npy of the right shape: an unguarded writer would memory-map it read-write and fill it
    victim = guard.outside / "victim.npy"
    shutil.copy(store / "logits.npy", victim)
    guard.before = guard.snapshot()
    if how == "absolute":
        _edit_manifest(store, logits=str(victim))
    elif how == "dotdot":
        _edit_manifest(store, logits="../../../outside/victim.npy")
    else:
        (store / "logits.npy").unlink()
        (store / "logits.npy").symlink_to(victim)
    # rerunning relabel resumes the store: refused before any array is opened, naming the entry and the fix
    with watch_opens() as opened, pytest.raises(ArtifactError) as e:
        generate(store, store_teacher(), store_images(), chunk=1)
    assert not [p for p in opened if "victim" in p], f"opened {opened}"
    msg = str(e.value)
    assert "manifest.json arrays.logits.file" in msg and "delete the folder" in msg and "stage=relabel" in msg
    assert ("resolves to" in msg) if how == "symlink" else ("outside/victim.npy'" in msg and "a path" in msg)
    # finishing it or reading it (both refuse an unfinished store anyway) never touch the file either
    for call in (lambda: finalize(store), lambda: LabelStore.open(store)):
        with watch_opens() as opened, pytest.raises(ArtifactError):
            call()
        assert not [p for p in opened if "victim" in p], f"opened {opened}"
    guard.check()


@pytest.mark.parametrize("value", ["../../outside/sentinel.npy", "/etc/passwd", "sub/logits.npy", "..", "", 7])
def test_read_refuses_a_manifest_file_name_that_is_not_a_plain_name_before_opening_it(guard, value):
    store = build_store(guard.work / "artifacts" / "store")
    _edit_manifest(store, logits=value)
    for verify in ("fast", "none"):
        with watch_opens() as opened, pytest.raises(ArtifactError, match=r"arrays\.logits\.file.*delete the folder"):
            LabelStore.open(store, verify=verify).arrays  # noqa: B018 - verify=none opens the arrays here
        assert not [p for p in opened if "sentinel" in p or p == "/etc/passwd"], f"opened {opened}"
    guard.check()


def test_writer_checks_its_own_file_names(guard, monkeypatch):
    real = store_writer.array_layout

    def evil(*a, **k):
        lay = real(*a, **k)
        lay[0] = ArraySpec("../../../outside/evil", lay[0].shape, lay[0].dtype, lay[0].component, lay[0].per)
        return lay

    monkeypatch.setattr(store_writer, "array_layout", evil)
    with pytest.raises(ArtifactError, match=r"label codec layout arrays\.\.\./\.\./\.\./outside/evil\.file"):
        prepare(guard.work / "artifacts" / "store", spec(), META)
    assert not (guard.outside / "evil.npy").exists()
    guard.check()


def test_inside_accepts_plain_names_and_links_within_the_folder(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"x")
    (tmp_path / "b.npy").symlink_to(tmp_path / "a.npy")
    assert inside(tmp_path, "a.npy", "m", "fix") == tmp_path / "a.npy"
    assert inside(tmp_path, "b.npy", "m", "fix") == tmp_path / "b.npy"
    assert inside(tmp_path, "missing.npy", "m", "fix") == tmp_path / "missing.npy"  # the caller names it missing


# ----------------------------------------------------------------------------------------------------------------------
# 2. config names that become path components
# ----------------------------------------------------------------------------------------------------------------------

ESCAPES = ["../../../../outside/t", "/abs/x", "..", ".hidden", "a/b", "a\\b", ""]


def _cfg(guard: Guard, *extra: str):
    stage = [] if any(e.startswith("stage=") for e in extra) else ["stage=stats"]
    return compose_cfg([*stage, "logger=none", f"paths.root={guard.work}", *extra])


@pytest.mark.parametrize("value", ESCAPES)
@pytest.mark.parametrize(
    ("key", "paths"),
    [
        ("model.tag", (teacher.path, teacher.base_dir, stats.path, images.path)),
        ("dataset.name", (teacher.path, stats.path, results.path, base.dataset_dir)),
        ("model.name", (teacher.path,)),
        ("stage.results_name", (results.path,)),
        ("prune.name", (labels.path,)),
    ],
)
def test_config_names_are_refused_as_path_components(guard, monkeypatch, key, paths, value):
    if key == "model.tag" and value == "":
        pytest.skip("an empty tag means no tag")
    monkeypatch.chdir(guard.work)
    stage = "stage=student" if key == "stage.results_name" else "stage=stats"
    cfg = _cfg(guard, stage, f"{key}='{value}'")
    for fn in paths:
        with pytest.raises(ConfigError, match=rf"{key}=.*must be a plain name.*set {key}="):
            fn(cfg)
    guard.check()


def test_student_arch_and_explicit_store_name_are_refused(guard):
    cfg = _cfg(guard)
    kw = dict(settings={}, metric={}, images_fingerprint=None, world=1, precision="32-true")
    with pytest.raises(ConfigError, match=r"student\.arch='\.\./x'.*plain name"):
        students.spec(cfg, guard.work / "store", model={"name": "../x"}, **kw)
    with pytest.raises(ConfigError, match=r"stage\.store=''.*plain name"):
        students.spec(cfg, Path("/"), model={"name": "convnet"}, **kw)
    guard.check()


def test_under_is_a_second_line_of_defence(tmp_path):
    assert base.under(tmp_path, "a", "b.pt") == tmp_path / "a" / "b.pt"
    for bad in ("..", "../x", "/etc", ".x", "a/b"):
        with pytest.raises(ConfigError, match="plain name"):
            base.under(tmp_path, "ok", bad)


def test_default_names_still_resolve_under_the_artifacts_root(guard):
    cfg = _cfg(guard, "model.tag=w64+v1.2", "dataset.name=my-data_1")
    root = base.root(cfg)
    for p in (teacher.path(cfg), stats.path(cfg), images.path(cfg), results.path(cfg)):
        assert root in p.parents
    assert "convnet-w64+v1.2-" in str(teacher.path(cfg))


# ----------------------------------------------------------------------------------------------------------------------
# 3. empty root variables
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("var", ["LPLD_ARTIFACTS", "LPLD_ROOT", "LPLD_DATA"])
def test_an_empty_root_variable_is_refused(guard, monkeypatch, var):
    monkeypatch.chdir(guard.work)
    monkeypatch.setenv(var, " " if var == "LPLD_DATA" else "")
    cfg = compose_cfg(["stage=squeeze", "logger=none"])
    for fn in (teacher.path, stats.path, base.dataset_dir):
        with pytest.raises(ConfigError, match=rf"^{var} is set but empty; unset it .* or set it to a folder$"):
            fn(cfg)
    assert not list(guard.work.iterdir())
    guard.check()


def test_an_empty_paths_artifacts_is_refused(guard, monkeypatch):
    monkeypatch.chdir(guard.work)
    with pytest.raises(ConfigError, match=r"paths\.artifacts is empty"):
        teacher.path(compose_cfg(["stage=squeeze", "logger=none", "paths.artifacts=''"]))


# ----------------------------------------------------------------------------------------------------------------------
# the command line: one line, exit 1, nothing written outside
# ----------------------------------------------------------------------------------------------------------------------


def _cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("LPLD_DEBUG", "HYDRA_FULL_ERROR")}
    e.update(LPLD_NO_RICH="1", WANDB_MODE="disabled", **env)
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), "logger=none", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=e,
    )


def _one_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "Error executing job" not in r.stderr
    first = r.stderr.strip().splitlines()[0]
    assert first.startswith("lpld error: "), r.stderr
    for n in needles:
        assert n in first, first


def test_cli_model_tag_traversal_is_one_line_and_writes_nothing_outside(guard):
    r = _cli(guard.work, "stage=squeeze", f"paths.root={guard.work}", "model.tag=../../../../outside/t")
    _one_line(r, "model.tag='../../../../outside/t'", "set model.tag=")
    assert not (guard.work / "artifacts").exists()
    guard.check()


def test_cli_empty_lpld_artifacts_is_one_line_and_writes_nothing_in_the_cwd(guard):
    r = _cli(guard.work, "stage=squeeze", f"paths.root={guard.work}", LPLD_ARTIFACTS="")
    _one_line(r, "LPLD_ARTIFACTS is set but empty")
    # refused before Hydra makes its run folder (with LPLD_ROOT= that folder would be /logs)
    assert not list(guard.work.iterdir())
    guard.check()
