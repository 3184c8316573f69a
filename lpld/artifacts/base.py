"""What every artifact spec shares: the artifacts root, the signature hash and the exclusion list.

An artifact's identity is signed the way dora signs experiments: ``key() = <readable prefix>_<8 hex>``,
the hex being a sha256 of every resolved config value that can change the artifact's bytes. Values that
cannot (where it runs, how the work is split, what is printed) are left out by name (:data:`EXCLUDED`),
so two commands that differ only in them share the artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lpld.core.io import fingerprint_obj

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
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


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


def root(cfg: DictConfig) -> Path:
    """Absolute artifacts root (``paths.artifacts``; a relative path is resolved against the cwd)."""
    return Path(str(cfg.paths.artifacts)).expanduser().resolve()


def dataset_dir(cfg: DictConfig) -> Path:
    """``<artifacts>/<dataset>``: every artifact of one dataset lives below it."""
    return root(cfg) / str(cfg.dataset.name)


def get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.a.b.c`` by dotted key, ``default`` when any part is missing or null."""
    node = cfg
    for part in key.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(part)
    return default if node is None else node
