"""Per-dataset stage defaults: ``dataset.recipe.<section>`` with ``dataset.recipe.ipc_table`` overrides.

This is the table lookup only; the precedence (command line > ipc_table > recipe > schema default) and every
resolved stage setting live in :mod:`lpld.config`.
"""

from __future__ import annotations

from typing import Any

from lpld.data.config import cfg_get, to_plain
from lpld.data.errors import DatasetError

SECTIONS = ("squeeze", "stats", "recover", "student")


def recipe(ds_cfg: Any, section: str, ipc: int | None = None) -> dict[str, Any]:
    """The dataset's defaults for one stage, as a plain dict.

    ``recipe.ipc_table`` maps an ipc threshold to overrides, e.g. ``{1: {student: {batch_size: 10}}}``;
    the entry with the largest threshold <= ``ipc`` is merged over ``recipe.<section>``
    (nested dicts merged key by key). Stage configs that leave a knob null fall back to this.

    Args:
        ds_cfg: the dataset config (any mapping: the experiment's dataset section or a dict).
        section: one of "squeeze", "stats", "recover", "student".
        ipc: images per class of the run; None skips the ipc table.
    """
    if section not in SECTIONS:
        raise DatasetError(f"unknown recipe section {section!r}; valid: {SECTIONS}")
    base = to_plain(cfg_get(ds_cfg, f"recipe.{section}", {})) or {}
    table = to_plain(cfg_get(ds_cfg, "recipe.ipc_table", {})) or {}
    if ipc is not None and table:
        keys = [int(k) for k in table if int(k) <= int(ipc)]
        if keys:
            entry = {int(k): v for k, v in table.items()}[max(keys)] or {}
            base = _merge(base, entry.get(section) or {})
    return base


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
