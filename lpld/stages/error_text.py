"""Errors raised below lpld (torch, Lightning, the DataLoader, the OS) that are the user's to fix, as user errors.

``lpld.stages.translate_error`` calls :func:`translate` for what its own rules leave alone. Each rule returns a
:class:`~lpld.errors.ConfigError`, :class:`~lpld.errors.ArtifactError` or :class:`~lpld.errors.DatasetError`
whose message names the key or file and the fix, or None (the error keeps its traceback):

* a user error re-raised by a DataLoader worker: the worker wraps the message in its whole traceback ("Caught
  DatasetError in DataLoader worker process 0. Original Traceback ..."); the original message is recovered;
* ``ReportError`` (a results file that cannot make the requested table): the message names the fix;
* ``FileNotFoundError`` of a *user* path only: a file under the configured artifacts folder (a label store whose
  manifest names a missing file is reported as that store's corruption), under ``dataset.root``, or a path the
  config names. A file missing anywhere else (the installed package, a temporary file) is a bug in lpld: its
  traceback is what a bug report needs, so it is left alone;
* torch's refusal of a checkpoint that is not weights-only (a pickle of Python objects): torch's hint to retry
  with ``weights_only=False`` is never shown, since that would run code hidden in the file;
* an allocation failure (host or GPU out of memory): the fix is a smaller ipc / batch;
* Lightning's "no GPU backend" (``trainer=gpu`` where no CUDA GPU is visible).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

from lpld.errors import ArtifactError, ConfigError, DatasetError, user_error_types

WORKER_MARK = "Original Traceback (most recent call last):"
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): ?(.*)$")
_OOM = ("can't allocate memory", "out of memory", "DefaultCPUAllocator", "Cannot allocate memory")
_NO_GPU = ("No supported gpu backend found", "GPUAccelerator can not run", "CUDAAccelerator can not run")
WEIGHTS_ONLY_MARK = "Weights only load failed"


def unwrap_worker_message(msg: str) -> str | None:
    """The original message of an exception re-raised by a DataLoader worker (None if ``msg`` is not one).

    The worker's text ends with the original traceback; its last unindented ``Name: message`` line starts the
    original message (which may go on over more lines).
    """
    if WORKER_MARK not in msg:
        return None
    lines = msg.split(WORKER_MARK, 1)[1].splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if line and not line[0].isspace():
            m = _EXC_LINE.match(line)
            if m:
                return "\n".join([m.group(2), *lines[i + 1 :]]).strip()
    return None


def _resolved(p: Any) -> Path | None:
    try:
        return Path(str(p)).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return None


def _under(path: Path, root: Path | None) -> bool:
    return root is not None and (path == root or root in path.parents)


def _select(exp: Any, key: str) -> Any:
    from lpld.config.frozen import select

    return select(exp, key)


def _label_store_of(path: Path, root: Path) -> Path | None:
    """The label store folder holding ``path`` (a folder below ``root`` whose manifest says it is one)."""
    for d in path.parents:
        if not _under(d, root):
            return None
        man = d / "manifest.json"
        if man.is_file():
            try:
                fmt = str(json.loads(man.read_text()).get("format", ""))
            except (OSError, ValueError, AttributeError):
                return None
            return d if fmt.startswith("lpld-label-store/") else None
    return None


def _config_paths(exp: Any) -> list[tuple[str, Path]]:
    """(dotted key, resolved path) of every string value of the config that looks like a path."""
    from lpld.stages import config_strings  # the package imports this module: import at call time

    out = []
    for key, value in config_strings(exp):
        if "/" in value or value.startswith("~"):
            p = _resolved(value)
            if p is not None:
                out.append((key, p))
    return out


def missing_user_file(e: FileNotFoundError, exp: Any) -> BaseException | None:
    """A user error for a file missing below a user root (see the module doc), else None."""
    name = e.filename if e.filename is not None else None
    if name is None or exp is None:
        return None
    path = _resolved(name)
    if path is None:
        return None
    art = _resolved(_select(exp, "paths.artifacts")) if _select(exp, "paths.artifacts") else None
    if _under(path, art):
        store = _label_store_of(path, art)
        if store is not None:
            from lpld.core.label_store.integrity import corrupt_store_error

            return corrupt_store_error(store, f"{path.name}, named by its manifest, is missing")
        return ArtifactError(
            f"{path} is missing from the artifacts folder (deleted or moved while lpld used it); rerun the stage "
            "that writes it with stage.overwrite=true (or restore the file)"
        )
    data = _select(exp, "dataset.root")
    root = _resolved(data) if data else None
    if _under(path, root):
        return DatasetError(
            f"{path} is missing from dataset.root={data} (deleted or moved since the dataset was listed); restore "
            "it, or point dataset.root at a complete copy of the dataset"
        )
    for key, p in _config_paths(exp):
        if _under(path, p):
            return ConfigError(f"{key}={p} names a missing file or folder ({path}); set {key} to an existing path")
    return None


def translate(e: BaseException, exp: Any = None) -> BaseException | None:
    """The user error standing for ``e`` (see the module doc), or None to keep ``e`` and its traceback."""
    if isinstance(e, user_error_types()):
        inner = unwrap_worker_message(str(e))
        if inner is None:
            return None
        try:
            return type(e)(inner)
        except TypeError:  # a subclass with another constructor: its family's base class carries the text
            return next(t for t in user_error_types() if isinstance(e, t))(inner)
    if type(e).__name__ == "ReportError":
        return ConfigError(str(e))
    if isinstance(e, FileNotFoundError):
        return missing_user_file(e, exp)
    if isinstance(e, pickle.UnpicklingError) and WEIGHTS_ONLY_MARK in str(e):
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it pickles {found.group(1)})" if found else ""
        return ArtifactError(
            f"a checkpoint this stage reads is not a plain-tensor file{what}, so it cannot be trusted: lpld never "
            "unpickles Python objects (that can run code hidden in the file). Delete the run's last.ckpt, or rerun "
            "with stage.overwrite=true to train from scratch"
        )
    text = str(e)
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(s in text for s in _OOM)):
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        return ConfigError(
            f"out of memory ({first[:200]}); lower ipc or the batch sizes (stage=plan predicts the memory of a "
            "config), or run on a machine with more memory"
        )
    if type(e).__name__ == "MisconfigurationException" and any(s in text for s in _NO_GPU):
        return ConfigError(
            "trainer=gpu needs a CUDA GPU; none is visible on this machine (check CUDA_VISIBLE_DEVICES and the "
            "driver); use trainer=cpu"
        )
    return None
