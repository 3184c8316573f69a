"""Results records: one JSON object per finished student run, in JSON-lines files.

Layout: ``<paths.results_dir>/<name>.jsonl`` (``student.results_name``, default ``results``).
Appending is atomic and safe between concurrent sweep jobs on one file system: the writer
takes an exclusive ``fcntl`` lock on ``<file>.lock``, reads the current file, adds its line and
renames a temporary copy into place, so a reader never sees a half-written line and two
writers never lose each other's record.

Required fields of a record (``REQUIRED_FIELDS``): config (the full resolved config), method,
dataset, ipc, seed, prune, quant, metric, student_model, image_bytes, label_bytes,
compression_vs_1x, top1, top5, epochs, wall_time_s, run_key.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lpld.core.io import ArtifactError, _json_default, atomic_write_bytes

REQUIRED_FIELDS = (
    "config",
    "method",
    "dataset",
    "ipc",
    "seed",
    "prune",
    "quant",
    "metric",
    "student_model",
    "image_bytes",
    "label_bytes",
    "compression_vs_1x",
    "top1",
    "top5",
    "epochs",
    "wall_time_s",
    "run_key",
)


class NoResultsError(ArtifactError, FileNotFoundError):
    """No results file or folder at the path: a user error (``run.py`` prints one line), and still a
    FileNotFoundError for callers that test for one."""


def results_file(results_dir: str | os.PathLike, name: str = "results") -> Path:
    """Deterministic path of a results file: ``<results_dir>/<name>.jsonl``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"results name must be a plain file stem, got {name!r}")
    return Path(results_dir) / f"{name}.jsonl"


def append_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Append one record (one JSON line) to the results file at ``path``.

    Args:
        path: a ``.jsonl`` file, or a directory (then ``<dir>/results.jsonl``).
        record: the run's record; must hold every key of REQUIRED_FIELDS.

    Returns:
        The file written.
    """
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"results record lacks fields {missing}")
    path = Path(path)
    if path.suffix != ".jsonl":
        path = results_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(dict(record), sort_keys=True, default=_json_default)
    if "\n" in line:
        raise ValueError("a results record must serialise to one line")
    with open(path.with_name(path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            old = path.read_bytes() if path.exists() else b""
            if old and not old.endswith(b"\n"):
                old += b"\n"
            atomic_write_bytes(path, old + line.encode() + b"\n")
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return path


def load_records(path_or_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a results file, or of every ``*.jsonl`` in a directory (sorted by name).

    Raises:
        NoResultsError: the path does not exist (names it and the fix).
        ArtifactError: a line is not a JSON object (names the file and line).
    """
    p = Path(path_or_dir)
    if not p.exists():
        raise NoResultsError(
            f"no results at {p}; run stage=student first (it writes the records), or set stage.results to an "
            "existing results .jsonl file or folder"
        )
    files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p]
    out: list[dict[str, Any]] = []
    for f in files:
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ArtifactError(f"results file {f} cannot be read ({e}); point stage.results at a results file") from e
        for i, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ArtifactError(f"{f}:{i} is not a JSON record ({e}); remove that line") from e
            if not isinstance(rec, dict):
                raise ArtifactError(
                    f"{f}:{i} is not a results record (a JSON object; got a JSON {type(rec).__name__}); remove that "
                    "line, or point stage.results at a file stage=student wrote"
                )
            out.append(rec)
    return out


def replace_record(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Add ``record`` to a results file, replacing any record of the same ``run_key`` (under the file's lock).

    A retrained run (``stage.overwrite=true``) thus never leaves two records; other lines are kept byte for byte.

    Args:
        path: the ``.jsonl`` results file.
        record: the run's record (``run_key`` and every key of REQUIRED_FIELDS).

    Returns:
        The file written.
    """
    path = Path(path)
    if not path.exists():
        return append_record(path, record)
    with open(path.with_name(path.name + ".lock"), "a+") as lock:  # the lock append_record takes
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            kept = []
            for raw in path.read_bytes().splitlines():
                try:
                    same = json.loads(raw).get("run_key") == record["run_key"]
                except (json.JSONDecodeError, AttributeError):
                    same = False
                if not same and raw.strip():
                    kept.append(raw + b"\n")
            atomic_write_bytes(path, b"".join(kept))
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return append_record(path, record)
