"""Atomic writes, fingerprints and disk-space checks shared by every stage.

Every artifact is written to a temporary file in the destination directory and renamed into
place, so an interrupted stage never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


class ArtifactError(RuntimeError):
    """A missing, corrupt or mismatched artifact. The message always names the fix."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename (never a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (sorted keys, indented) atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` to memory, then write atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON artifact; a corrupt file raises ArtifactError naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is corrupt ({e}); delete it and rerun the stage that writes it") from e


def unsafe_name(name: Any) -> str | None:
    """Why ``name`` is not one plain file or folder name (absolute, ``..``, a separator...), or None if it is."""
    if not isinstance(name, str):
        return f"not a string but {type(name).__name__}"
    if not name:
        return "empty"
    if "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        return "a path, not a bare name"
    if name in (".", ".."):
        return "a parent or current folder"
    return None


def inside(root: str | os.PathLike, name: Any, what: str, fix: str) -> Path:
    """``root / name`` for a file name read from a manifest, after checking it cannot point elsewhere.

    Called before anything is opened: a crafted manifest (an absolute path, ``../..``) or a link in the folder
    that resolves outside it must never make lpld read or write another file.

    Args:
        root: the folder the file must be in (a label store, an image folder).
        name: the value the manifest holds (must be one plain file name, no separators).
        what: where the name was read, for the message ("label store X's manifest.json, arrays.logits.file").
        fix: what the user does about it.

    Raises:
        ArtifactError: naming ``what``, the bad value and ``fix``.
    """
    root = Path(root)
    reason = unsafe_name(name)
    if reason is None:
        real_root, real = root.resolve(), (root / name).resolve()
        if real == real_root or real_root not in real.parents:
            reason = f"it is a link that resolves to {real}, outside the folder"
    if reason is not None:
        raise ArtifactError(
            f"{what} names the file {name!r}, which is not a plain file name inside {root} ({reason}); "
            f"nothing was opened. {fix}"
        )
    return root / name


def _update_with_tensor(h: Any, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    # view as bytes: works for every dtype incl. bf16 which numpy lacks
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint_state_dict(state: Mapping[str, torch.Tensor], n_hex: int = 16) -> str:
    """sha256 over the (sorted) names, dtypes, shapes and bytes of a state dict.

    Identifies a teacher independent of where it was saved: two checkpoints with equal weights
    give the same fingerprint, and any changed weight changes it.
    """
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            _update_with_tensor(h, v)
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:n_hex]


def fingerprint_tensors(tensors: Iterable[torch.Tensor], n_hex: int = 16) -> str:
    """sha256 over a sequence of tensors (order matters)."""
    h = hashlib.sha256()
    for t in tensors:
        _update_with_tensor(h, t)
    return h.hexdigest()[:n_hex]


def fingerprint_obj(obj: Any, n_hex: int = 16) -> str:
    """sha256 of the canonical JSON of a plain object (a config subtree, a manifest)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:n_hex]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Full sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def ensure_free_space(directory: str | os.PathLike, needed_bytes: int, what: str = "this stage") -> None:
    """Refuse to start when the volume holding ``directory`` has less free space than needed.

    Raises:
        ArtifactError: naming how much is needed and where, before anything is written.
    """
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise ArtifactError(
            f"{what} needs {needed_bytes / 1e6:.1f} MB at {directory} but only {free / 1e6:.1f} MB is free; "
            "free some space or point paths.artifacts at a larger volume"
        )


# ----------------------------------------------------------------------------------------------------------------------
# artifact locks, move-aside on overwrite, write errors
# ----------------------------------------------------------------------------------------------------------------------

LOCK_WAIT_ENV = "LPLD_LOCK_WAIT"  # seconds a second writer waits for the lock before refusing (default below)
# Under SLURM (array jobs of one sweep share upstream artifacts: the images of a method/ipc/seed, a 1x store) a
# second writer waits for the first by default instead of failing at once; a dead holder never blocks it (the OS
# drops its lock). 12 h: longer than any single lpld stage, shorter than a forgotten job's time limit.
SLURM_LOCK_WAIT_S = 12 * 3600.0
LOCK_PROGRESS_ENV = "LPLD_LOCK_PROGRESS_EVERY"  # seconds between "waiting for ..." lines (default 60)


def default_lock_wait() -> float:
    """Seconds a writer waits for another holder: ``$LPLD_LOCK_WAIT`` if set, else 12 h under SLURM
    (``SLURM_JOB_ID``: array jobs sharing an upstream artifact wait for it), else 0 (refuse at once)."""
    v = os.environ.get(LOCK_WAIT_ENV)
    if v not in (None, ""):
        return float(v)
    return SLURM_LOCK_WAIT_S if os.environ.get("SLURM_JOB_ID") else 0.0


_HELD: dict[str, Any] = {}  # lock file -> open file object holding the flock (re-entrant within a process)


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of an artifact: ``<parent>/.<name>.lock`` (beside it, so moving it aside keeps the lock)."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def _launched_rank() -> int:
    # Ranks of one DDP run share their artifact: only the launching rank 0 locks (per-rank launchers set RANK).
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def acquire_lock(target: str | os.PathLike, what: str = "this artifact", wait_s: float | None = None) -> bool:
    """Take the OS file lock (``fcntl.flock``) of an artifact for this process, or refuse.

    Held until :func:`release_lock` or the end of the process (the OS drops it when a writer dies, even by
    kill -9, so a lock is never stale). Re-entrant within a process; a no-op on DDP ranks other than 0.

    Args:
        target: the artifact (file or directory) about to be written.
        what: a short name for the message ("label store", "teacher"...).
        wait_s: seconds to wait for another holder (default :func:`default_lock_wait`: ``$LPLD_LOCK_WAIT``, else
            12 h under SLURM, else 0: refuse at once). While waiting, one line every ``$LPLD_LOCK_PROGRESS_EVERY``
            seconds (default 60) names the artifact, its holder and the time waited.

    Returns:
        True if this call took the lock (False if it was already held by this process or rank > 0).

    Raises:
        ArtifactError: another process holds it; names its pid, host and start time and what to do.
    """
    import fcntl
    import socket
    import time

    if _launched_rank() != 0:
        return False
    import errno

    lp = lock_path(target)
    try:
        lp.parent.mkdir(parents=True, exist_ok=True)
        key = str(lp.resolve())
        if key in _HELD:
            return False
        f = open(lp, "a+")  # noqa: SIM115 - kept open while the lock is held
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            # a read-only artifacts folder: finished artifacts are still readable there; a write, if one is
            # needed, fails on its own with write_error's message
            return False
        raise
    wait = default_lock_wait() if wait_s is None else float(wait_s)
    t0 = time.monotonic()
    deadline, every = t0 + wait, float(os.environ.get(LOCK_PROGRESS_ENV, "60") or 60)
    next_note = t0 + every
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.seek(0)
                holder = f.read().strip() or "unknown process"
                f.close()
                raise ArtifactError(
                    f"{what} {target} is being written by another lpld run ({holder}); nothing was changed. "
                    "Wait for that run to finish (or stop it) and rerun this command, or set "
                    f"{LOCK_WAIT_ENV}=<seconds> to wait for it. The OS releases the lock when that process ends."
                ) from None
            if time.monotonic() >= next_note:
                f.seek(0)
                holder = f.read().strip() or "another lpld run"
                logging.getLogger("lpld").info(
                    "waiting for %s %s (being written by %s): %.0f s so far, up to %.0f s (%s)",
                    what,
                    target,
                    holder,
                    time.monotonic() - t0,
                    wait,
                    LOCK_WAIT_ENV,
                )
                next_note = time.monotonic() + every
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _HELD[key] = f
    return True


def release_lock(target: str | os.PathLike) -> None:
    """Release a lock taken by :func:`acquire_lock` in this process (no-op if not held)."""
    import fcntl

    lp = lock_path(target)
    if not lp.parent.exists():
        return
    f = _HELD.pop(str(lp.resolve()), None)
    if f is not None:
        f.seek(0)
        f.truncate()
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


class artifact_lock:  # noqa: N801 - used as a context manager: ``with artifact_lock(path, "teacher"):``
    """Context manager: hold an artifact's lock while writing it (see :func:`acquire_lock`)."""

    def __init__(self, target: str | os.PathLike, what: str = "this artifact", wait_s: float | None = None):
        self.target, self.what, self.wait_s = Path(target), what, wait_s
        self._took = False

    def __enter__(self) -> artifact_lock:
        self._took = acquire_lock(self.target, self.what, self.wait_s)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._took:
            release_lock(self.target)


def aside_path(target: str | os.PathLike) -> Path:
    """Where ``overwrite=true`` keeps the previous artifact until the new one is complete."""
    target = Path(target)
    return target.parent / f"{target.name}.replaced"


def move_aside(target: str | os.PathLike) -> Path | None:
    """Start an overwrite: rename ``target`` to ``<target>.replaced`` instead of deleting it.

    If ``<target>.replaced`` already exists, an earlier overwrite was interrupted: it holds the last
    artifact that was replaced, and ``target`` is that run's unfinished replacement, which is removed.
    The old artifact is deleted only by :func:`drop_aside`, once the new one is complete.

    Returns:
        the aside path, or None when there was nothing to move.
    """
    target = Path(target)
    aside = aside_path(target)
    if not target.exists() and not target.is_symlink():
        return aside if aside.exists() else None
    if aside.exists():
        remove_path(target)
    else:
        os.replace(target, aside)
    return aside


def drop_aside(target: str | os.PathLike) -> None:
    """Finish an overwrite: delete ``<target>.replaced`` (call only once the new artifact is complete)."""
    aside = aside_path(target)
    if aside.exists() or aside.is_symlink():
        remove_path(aside)


def remove_path(p: str | os.PathLike) -> None:
    """Delete a file, link or directory tree."""
    p = Path(p)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def write_error(e: OSError, where: str | os.PathLike, what: str = "this stage") -> ArtifactError | None:
    """The user-facing ArtifactError for an OS write failure (disk full, read-only or forbidden folder), else None."""
    import errno

    if e.errno == errno.ENOSPC or e.errno == getattr(errno, "EDQUOT", -1):
        fix = "free some space or point paths.artifacts at a larger volume"
        return ArtifactError(
            f"{what}: the disk holding {where} is full ({e.strerror}); {fix}, then rerun the same command"
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ArtifactError(
            f"{what} cannot write to {where} ({e.strerror}: {e.filename or where}); make the folder writable or set "
            "paths.artifacts=/a/writable/folder (or $LPLD_ARTIFACTS), then rerun"
        )
    return None
