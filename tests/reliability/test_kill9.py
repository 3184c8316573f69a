"""kill -9 mid-write, for every stage: the rerun resumes (or restarts) and ends with the same bytes.

Slow tier: each stage runs three times through ``run.py`` (reference, killed, resumed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO

from lpld.artifacts import images as images_artifact
from lpld.artifacts import results as results_artifact
from lpld.artifacts import stats as stats_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.artifacts.base import dataset_dir
from lpld.core.images import images_fingerprint
from lpld.core.io import lock_path

from .helpers import compose_cfg, save_random_teacher, stage_overrides

pytestmark = pytest.mark.slow


def run_cli(root: Path, args: list[str], kill_when: Callable[[], bool] | None = None, timeout: float = 400) -> int:
    """Run ``run.py`` with ``args``; with ``kill_when``, SIGKILL it as soon as that returns True (or it ends)."""
    env = {**os.environ, "LPLD_NO_RICH": "1", "WANDB_MODE": "disabled"}
    p = subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    t0 = time.monotonic()
    if kill_when is not None:
        while p.poll() is None and time.monotonic() - t0 < timeout:
            if kill_when():
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    if kill_when is None:
        assert p.returncode == 0, err.decode()[-3000:]
    return p.returncode


def tree_digest(d: Path, pattern: str = "*") -> dict[str, str]:
    return {
        str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(d.rglob(pattern))
        if f.is_file()
    }


def check(
    root: Path, args: list[str], out: Callable[[], Path], marker: Callable[[], bool], digest: Callable[[Path], object]
) -> None:
    run_cli(root, args)
    ref = digest(out())
    shutil.move(out(), str(out()) + ".ref")
    rc = run_cli(root, args, kill_when=marker)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    run_cli(root, args)  # resume (or restart) after kill -9
    assert digest(out()) == ref


@pytest.fixture
def root(tmp_path):
    return tmp_path


def test_kill9_squeeze(root):
    ov = ["stage=squeeze", *stage_overrides(root), "stage.epochs=6", "stage.batch_size=4"]
    cfg = compose_cfg(ov)
    d = teacher_artifact.dir(cfg)

    def weights(p: Path):
        sd = torch.load(p / "teacher.pt", weights_only=True)["state_dict"]
        return {k: v.numpy().tobytes() for k, v in sd.items()}

    check(root, ov, lambda: d, lambda: any(d.glob("epoch*.ckpt")) and (d / "last.ckpt").exists(), weights)


def test_kill9_stats(root):
    ov = ["stage=stats", *stage_overrides(root)]
    cfg = compose_cfg(ov)
    save_random_teacher(cfg)
    out = stats_artifact.path(cfg)

    def stats(p: Path):
        s = torch.load(p, weights_only=True)
        return [t.numpy().tobytes() for t in (*s["mean"], *s["var"], s["count"])]

    # the pass writes its file once, atomically at the end: kill it once it holds the stats lock (it is running)
    lock = lock_path(out)
    check(root, ov, lambda: out, lambda: lock.exists() and lock.stat().st_size > 0, stats)


def test_kill9_recover(root):
    ov = [
        "stage=recover",
        *stage_overrides(root),
        "recover=lpld_c",
        "recover.iterations=40",
        "recover.classes_per_batch=1",
    ]
    cfg = compose_cfg(ov)
    save_random_teacher(cfg)
    d = images_artifact.path(cfg)
    check(
        root,
        ov,
        lambda: d,
        lambda: any(d.rglob(".recover.json")),
        lambda p: (images_fingerprint(p), tree_digest(p, "*.jpg")),  # JPEG: the default storage (issue 20)
    )


def test_kill9_relabel(root):
    from lpld.stages import dispatch

    base = stage_overrides(root)
    rc = compose_cfg(["stage=recover", *base])
    save_random_teacher(rc)
    dispatch(rc)
    ov = ["stage=relabel", *base, "relabel.epochs=400", "stage.chunk=1"]
    from lpld.artifacts import labels as labels_artifact

    d = labels_artifact.path(compose_cfg(ov))
    check(root, ov, lambda: d, lambda: any(d.glob("progress.*.npy")), lambda p: tree_digest(p, "*.npy"))


def test_kill9_student(root):
    from lpld.stages import dispatch

    base = [*stage_overrides(root), "dataset.recipe.student.epochs=12"]
    rc = compose_cfg(["stage=recover", *base])
    save_random_teacher(rc)
    dispatch(rc)
    dispatch(compose_cfg(["stage=relabel", *base]))
    ov = ["stage=student", *base, "stage.val_every=0"]
    students = dataset_dir(rc)

    def run_dir() -> Path:
        return next(students.rglob("final.json")).parent

    def weights(p: Path):
        ck = torch.load(p / "last.ckpt", weights_only=False, map_location="cpu")
        import json

        final = json.loads((p / "final.json").read_text())
        return final["top1"], final["top5"], {k: v.numpy().tobytes() for k, v in ck["state_dict"].items()}

    run_cli(root, ov)
    d = run_dir()
    ref = weights(d)
    shutil.move(d, str(d) + ".ref")
    (results_artifact.dir(rc) / "results.jsonl").unlink()
    rc_kill = run_cli(root, ov, kill_when=lambda: (d / "last.ckpt").exists())
    assert rc_kill == -signal.SIGKILL
    run_cli(root, ov)
    assert weights(d) == ref
    from lpld.report.records import load_records

    assert len(load_records(results_artifact.dir(rc) / "results.jsonl")) == 1
