"""What every artifact spec shares: the artifacts root, the signature hash and the exclusion list.

An artifact's identity is signed the way dora signs experiments: ``key() = <readable prefix>_<8 hex>``,
the hex being a sha256 of every resolved config value that can change the artifact's bytes. Values that
cannot (where it runs, how the work is split, what is printed) are left out by name (:data:`EXCLUDED`),
so two commands that differ only in them share the artifact.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lpld.config.frozen import Experiment, once, to_plain
from lpld.core.io import fingerprint_obj
from lpld.errors import ConfigError

# Config keys that never reach an artifact's bytes, dropped (at any depth) from the hashed values:
# devices / nodes / strategy (execution placement), workers (data loading), progress and logging, the
# chunking of work (commit chunks, forwards per batch, classes per device batch, class ranges of a split
# run), and the flags that only decide what to do with an existing artifact.
EXCLUDED: frozenset[str] = frozenset(
    {
        "devices",
        "num_nodes",
        "strategy",
        "num_workers",
        "progress_every",
        "log_images",
        "chunk",
        "batches_per_forward",
        "classes_per_batch",
        "max_batch_images",
        "class_start",
        "class_end",
        "overwrite",
        "allow_other_teacher",
        "verify",
    }
)
HEX = 8  # hex digits of the signature in a key


def plain(node: Any) -> Any:
    """A resolved plain-python copy of a config node (dicts, lists, scalars)."""
    return to_plain(node)


def strip(obj: Any, drop: frozenset[str] = EXCLUDED) -> Any:
    """``obj`` without the keys in ``drop``, at any depth (lists and dicts are copied)."""
    if isinstance(obj, dict):
        return {k: strip(v, drop) for k, v in obj.items() if k not in drop}
    if isinstance(obj, (list, tuple)):
        return [strip(v, drop) for v in obj]
    return obj


def sign(obj: Any) -> str:
    """The 8-hex signature of a plain object (sha256 of its canonical JSON, excluded keys dropped)."""
    return fingerprint_obj(strip(plain(obj)), n_hex=HEX)


# The environment variables conf/paths/default.yaml reads. Set but empty, OmegaConf's oc.env takes the empty value
# instead of the default: LPLD_ARTIFACTS= would put every artifact in the current directory, LPLD_ROOT= under
# /artifacts. Such a run is refused rather than quietly falling back to ./artifacts: an empty variable is almost
# always a script whose own variable was unset (LPLD_ARTIFACTS=$SCRATCH_DIR), and silently writing to another disk
# than the one the user named is the worse surprise.
ROOT_ENV = ("LPLD_ROOT", "LPLD_ARTIFACTS", "LPLD_DATA")

# A config value that becomes one path component under the artifacts root: a plain name, never a path.
_PLAIN = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")


def plain_name(value: Any, key: str, example: str = "mytag") -> str:
    """``value`` as a string, refused unless it is one plain name (letters, digits, ``. _ - +``, not starting with
    ``.``): config values that name an artifact folder must never lead out of the artifacts root.

    Raises:
        ConfigError: naming the key, the value and the fix.
    """
    s = str(value)
    if not _PLAIN.fullmatch(s):
        raise ConfigError(
            f"{key}={s!r} must be a plain name (letters, digits, . _ - +; no path separators, not starting with .), "
            f"because it names a folder under the artifacts root; set {key}={example}"
        )
    return s


def under(artifacts: Path, *parts: str) -> Path:
    """``artifacts / part / ...``: the second line of defence behind :func:`plain_name` on each config value.

    Every part must be a plain name and the result must stay below ``artifacts``. The check is lexical on purpose:
    a folder the user linked inside the artifacts tree (``artifacts/in1k -> /scratch/in1k``) keeps working.

    Raises:
        ConfigError: a part that is not a plain name (a config value that escaped its own check).
    """
    for part in parts:
        if not _PLAIN.fullmatch(str(part)):
            raise ConfigError(
                f"artifact path component {str(part)!r} (under {artifacts}) is not a plain name; check dataset.name, "
                "model.name, model.tag and the other names of this run: each must be letters, digits, . _ - +"
            )
    out = Path(artifacts).joinpath(*(str(p) for p in parts))
    base = os.path.normpath(artifacts)
    if os.path.commonpath([base, os.path.normpath(out)]) != base:
        raise ConfigError(f"artifact path {out} is outside the artifacts root {artifacts}; check the run's names")
    return out


def check_env_roots() -> None:
    """Refuse a root variable of conf/paths/default.yaml that is set but empty (see :data:`ROOT_ENV`).

    Raises:
        ConfigError: one line naming the variable and the fix.
    """
    for var in ROOT_ENV:
        if var in os.environ and not os.environ[var].strip():
            raise ConfigError(f"{var} is set but empty; unset it (`unset {var}`) or set it to a folder")


@once
def root(exp: Experiment) -> Path:
    """Absolute artifacts root (``paths.artifacts``; a relative path is resolved against the cwd).

    Raises:
        ConfigError: ``paths.artifacts`` is empty, or an LPLD_* root variable is set but empty.
    """
    check_env_roots()
    value = str(exp.paths.artifacts)
    if not value.strip():
        raise ConfigError("paths.artifacts is empty; set paths.artifacts=/a/folder (or $LPLD_ARTIFACTS)")
    return Path(value).expanduser().resolve()


@once
def dataset_name(exp: Any) -> str:
    """``dataset.name``, checked to be a plain name (it is the first folder under the artifacts root)."""
    return plain_name(exp.dataset.name, "dataset.name", "mydata")


@once
def dataset_dir(exp: Experiment) -> Path:
    """``<artifacts>/<dataset>``: every artifact of one dataset lives below it."""
    return under(root(exp), dataset_name(exp))


def get(exp: Any, key: str, default: Any = None) -> Any:
    """``exp.a.b.c`` by dotted key, ``default`` when any part is missing or null."""
    node = exp
    for part in key.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(part)
    return default if node is None else node
