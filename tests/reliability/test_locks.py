"""One writer per artifact: an OS file lock with the holder's pid/host; overwrite moves aside, never deletes."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lpld.core.io import (
    LOCK_WAIT_ENV,
    ArtifactError,
    acquire_lock,
    artifact_lock,
    aside_path,
    drop_aside,
    lock_path,
    move_aside,
    release_lock,
)
from lpld.core.label_store import LabelStore, prepare

from .helpers import META, build_store, spec

# Another writer, as acquire_lock leaves it: flock on the lock file, holder line inside (plain python: starts fast)
HOLD = """
import fcntl, os, socket, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f.fileno(), fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since now"); f.flush()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(target: Path, seconds: float = 60.0) -> subprocess.Popen:
    """Another process holding ``target``'s lock (returns once it holds it)."""
    lock_path(target).parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_path(target)), str(seconds)], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"locked"
    return p


def test_second_writer_is_refused_with_the_holders_pid_and_host(tmp_path):
    target = tmp_path / "art"
    p = _holder(target)
    try:
        with pytest.raises(ArtifactError) as ei:
            acquire_lock(target, "label store", wait_s=0)
        msg = str(ei.value)
        assert f"pid {p.pid}" in msg and socket.gethostname() in msg
        assert "nothing was changed" in msg and LOCK_WAIT_ENV in msg
    finally:
        p.kill()
        p.wait()
    # kill -9 of the holder: the OS released the lock, nobody has to clean up a stale lock file
    assert acquire_lock(target, "label store", wait_s=0) is True
    release_lock(target)


def test_a_waiting_writer_gets_the_lock_when_the_holder_ends(tmp_path, monkeypatch):
    target = tmp_path / "art"
    p = _holder(target, seconds=1.0)
    monkeypatch.setenv(LOCK_WAIT_ENV, "30")
    t0 = time.monotonic()
    try:
        assert acquire_lock(target, "teacher") is True
    finally:
        p.wait()
        release_lock(target)
    assert time.monotonic() - t0 < 25


def test_lock_is_reentrant_in_process_and_skipped_on_other_ranks(tmp_path, monkeypatch):
    target = tmp_path / "art"
    with artifact_lock(target, "x"):
        assert acquire_lock(target) is False  # already ours
    monkeypatch.setenv("RANK", "1")
    assert acquire_lock(tmp_path / "other") is False  # ranks of one DDP run share rank 0's lock
    assert not lock_path(tmp_path / "other").exists()


def test_concurrent_relabel_is_refused_and_never_deletes_the_other_store(tmp_path):
    """The issue's race: a second prepare() on a store being written must refuse, not suggest overwrite."""
    path = tmp_path / "store"
    build_store(path)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    p = _holder(path)
    try:
        for overwrite in (False, True):
            with pytest.raises(ArtifactError, match=f"being written by another lpld run \\(pid {p.pid}"):
                prepare(path, spec(), META, overwrite=overwrite)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    LabelStore.open(path, verify="full")


def test_move_aside_keeps_the_old_artifact_until_drop(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / "x").write_text("old")
    assert move_aside(d) == aside_path(d)
    assert not d.exists() and (aside_path(d) / "x").read_text() == "old"
    # an interrupted overwrite: the partial replacement is discarded, the last complete artifact stays aside
    d.mkdir()
    (d / "x").write_text("partial")
    move_aside(d)
    assert not d.exists() and (aside_path(d) / "x").read_text() == "old"
    d.mkdir()
    (d / "x").write_text("new")
    drop_aside(d)
    assert not aside_path(d).exists() and (d / "x").read_text() == "new"
    f = tmp_path / "exact.pt"
    f.write_bytes(b"1")
    move_aside(f)
    assert aside_path(f).read_bytes() == b"1" and not f.exists()


def test_under_slurm_a_second_writer_waits_for_the_first_by_default(tmp_path, monkeypatch, caplog):
    """Issue 19: array jobs sharing an upstream artifact failed at once unless LPLD_LOCK_WAIT was set."""
    from lpld.core.io import LOCK_PROGRESS_ENV, SLURM_LOCK_WAIT_S, default_lock_wait

    monkeypatch.delenv(LOCK_WAIT_ENV, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert default_lock_wait() == 0.0  # on a workstation: refuse at once, naming the holder
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert default_lock_wait() == SLURM_LOCK_WAIT_S
    monkeypatch.setenv(LOCK_WAIT_ENV, "5")
    assert default_lock_wait() == 5.0  # an explicit value wins
    monkeypatch.delenv(LOCK_WAIT_ENV)
    monkeypatch.setenv(LOCK_PROGRESS_ENV, "0.3")
    target = tmp_path / "art"
    p = _holder(target, seconds=1.5)
    try:
        with caplog.at_level("INFO", logger="lpld"):
            assert acquire_lock(target, "distilled images") is True
    finally:
        p.wait()
        release_lock(target)
    waits = [r.getMessage() for r in caplog.records if "waiting for distilled images" in r.getMessage()]
    assert waits and f"pid {p.pid}" in waits[0] and "s so far" in waits[0]


def test_finished_images_release_their_lock_at_once(tmp_path):
    """Issue 19: a multirun process that reuses finished images must not hold their lock for the rest of the sweep
    (a second process of the same sweep waited on it for its whole lifetime)."""
    import fcntl
    import json
    from types import SimpleNamespace

    from lpld.artifacts import images as images_artifact

    out = tmp_path / "images" / "lpld_ipc10_seed0_abc"
    out.mkdir(parents=True)
    (out / images_artifact.MANIFEST).write_text(json.dumps({"config_fingerprint": "abc", "complete": True}))
    assert images_artifact.prepare(SimpleNamespace(out_dir=str(out), config_fingerprint="abc"), False) == "done"
    with open(lock_path(out), "a+") as f:  # another open file: flock conflicts with a lock this process still holds
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    (out / images_artifact.MANIFEST).write_text(json.dumps({"config_fingerprint": "abc", "complete": False}))
    assert images_artifact.prepare(SimpleNamespace(out_dir=str(out), config_fingerprint="abc"), False) == "resume"
    with open(lock_path(out), "a+") as f, pytest.raises(BlockingIOError):  # a writer keeps it
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    release_lock(out)
