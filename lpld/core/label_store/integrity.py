"""File hashes of a label store (full and sampled sha256) and the errors that name the fix for a corrupt or
old-format store."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lpld.core.io import ArtifactError, aside_path, inside
from lpld.core.label_store.spec import FORMAT, MANIFEST

_SAMPLE_BLOCK = 4096


_SAMPLE_COUNT = 16


def sampled_sha256(path: Path, size: int) -> str:
    """sha256 over ``_SAMPLE_COUNT`` 4 KiB blocks spread evenly over the file (incl. first and last)."""
    h = hashlib.sha256()
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _SAMPLE_BLOCK * _SAMPLE_COUNT:
            h.update(f.read())
        else:
            span = size - _SAMPLE_BLOCK
            for i in range(_SAMPLE_COUNT):
                f.seek(span * i // (_SAMPLE_COUNT - 1))
                h.update(f.read(_SAMPLE_BLOCK))
    return h.hexdigest()


def full_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def array_files(path: Path, arrays: Any, what: str = MANIFEST) -> dict[str, Path]:
    """``{array: file}`` of a manifest's ``arrays`` table, every name checked before any file is opened: one plain
    file name inside the store (no absolute path, no ``..``, no link out of the folder; :func:`lpld.core.io.inside`).

    Raises:
        ArtifactError: naming the store, the entry, the bad value and the fix.
    """
    fix = (
        f"The store was edited or not written by lpld: delete the folder {path} and rerun `python run.py "
        "stage=relabel` (or rerun it with stage.overwrite=true, which sets the folder aside)"
    )
    if not isinstance(arrays, dict) or not arrays:
        raise ArtifactError(f"label store {path}: {what} has no arrays table. {fix}")
    return {
        str(name): inside(
            path,
            entry.get("file") if isinstance(entry, dict) else None,
            f"label store {path}: {what} arrays.{name}.file",
            fix,
        )
        for name, entry in arrays.items()
    }


def corrupt_store_error(path: Path, what: str) -> ArtifactError:
    return ArtifactError(
        f"label store {path} is corrupt or truncated ({what}); regenerate it: rerun `python run.py stage=relabel` "
        "with the same overrides plus stage.overwrite=true (the damaged store is kept at "
        f"{aside_path(path).name} until the new one is complete)"
    )


def old_format_error(path: Path, fmt: Any) -> ArtifactError:
    return ArtifactError(
        f"label store {path} has format {fmt!r}, this lpld reads {FORMAT!r} (per-batch checksums); regenerate it: "
        "rerun `python run.py stage=relabel` with the same overrides plus stage.overwrite=true"
    )
