"""``stage.overwrite=true`` in three steps, so a run that fails to start never loses the finished artifact.

1. :func:`defer` (the artifact's ``prepare``, rank 0): the finished artifact will be replaced; nothing moves yet.
2. :func:`begin` (the stage, once its Trainer is built and the first step is about to run): the old artifact is
   moved to ``<target>.replaced`` (``lpld.core.io.move_aside``).
3. Success: the stage deletes ``<target>.replaced`` (``drop_aside``) once the new artifact is complete. Failure
   (any exception, SIGTERM included): :func:`restore` removes the partial new artifact and puts the old one back,
   bytes unchanged. A kill -9 between 2 and 3 leaves ``<target>.replaced``, which the next run handles as before
   (``move_aside``: an overwrite keeps it, a plain rerun resumes the new run).
"""

from __future__ import annotations

import os
from pathlib import Path

from lpld.core.io import aside_path, move_aside, remove_path

_PENDING: set[str] = set()  # deferred overwrites of this process (rank 0)
_BEGUN: set[str] = set()  # moved aside by this process, not yet finished or restored


def _key(target: str | os.PathLike) -> str:
    return str(Path(target).absolute())


def defer(target: str | os.PathLike) -> None:
    """Mark ``target`` to be moved aside by :func:`begin` (call where the old code called ``move_aside``)."""
    _PENDING.add(_key(target))


def pending(target: str | os.PathLike) -> bool:
    """``target`` is to be replaced by this run (deferred, or already moved aside by it)."""
    k = _key(target)
    return k in _PENDING or k in _BEGUN


def begin(target: str | os.PathLike) -> bool:
    """Move a deferred ``target`` aside now (no-op unless :func:`defer` was called); True if it was deferred."""
    k = _key(target)
    if k not in _PENDING:
        return False
    _PENDING.discard(k)
    move_aside(target)
    _BEGUN.add(k)
    return True


def restore(target: str | os.PathLike) -> None:
    """After a failed run: drop the partial new ``target`` and put the replaced artifact back (if this process
    moved it aside); forget a deferred overwrite that never began."""
    k = _key(target)
    _PENDING.discard(k)
    if k not in _BEGUN:
        return
    _BEGUN.discard(k)
    aside = aside_path(target)
    if not (aside.exists() or aside.is_symlink()):
        return
    target = Path(target)
    if target.exists() or target.is_symlink():
        remove_path(target)
    os.replace(aside, target)


def finished(target: str | os.PathLike) -> None:
    """The new artifact is complete: forget the overwrite (the caller drops ``<target>.replaced``)."""
    k = _key(target)
    _PENDING.discard(k)
    _BEGUN.discard(k)
