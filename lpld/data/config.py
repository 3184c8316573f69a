"""Read dataset config values from any mapping: a section of the frozen experiment or a plain dict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lpld.data.errors import DatasetError, dataset_error


def cfg_get(ds_cfg: Any, key: str, default: Any = None) -> Any:
    """Value of ``key`` (dotted for nested keys) in ``ds_cfg``, or ``default`` when absent or null."""
    node = ds_cfg
    for part in key.split("."):
        if node is None:
            return default
        try:
            node = node.get(part) if hasattr(node, "get") else node[part]
        except (KeyError, AttributeError):
            return default
    return default if node is None else node


def cfg_require(ds_cfg: Any, key: str) -> Any:
    """Value of ``key``; a missing or null value raises a DatasetError naming ``dataset.<key>``."""
    value = cfg_get(ds_cfg, key)
    if value is None:
        name = cfg_get(ds_cfg, "name", "?")
        raise DatasetError(f"dataset config '{name}' has no value for '{key}'; set dataset.{key}=...")
    return value


def to_plain(value: Any) -> Any:
    """Nested mappings / sequences (a section of the frozen experiment) as plain python containers."""
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def dataset_type(ds_cfg: Any) -> str:
    """The loader type (``type`` key; defaults to ``name`` so a minimal dict config works)."""
    return str(cfg_get(ds_cfg, "type") or cfg_require(ds_cfg, "name"))


def data_root(ds_cfg: Any) -> Path:
    """The dataset's root directory (``root``), resolved against the cwd; it must exist."""
    kind = dataset_type(ds_cfg)
    root = cfg_get(ds_cfg, "root")
    if root is None or str(root).strip() == "":
        raise dataset_error(kind, "dataset.root is not set", "set dataset.root=/path/to/data")
    path = Path(str(root)).expanduser().resolve()
    if not path.is_dir():
        raise dataset_error(
            kind, f"dataset root not found: {path}", "set dataset.root=/path/to/data (or the env var in its yaml)"
        )
    return path
