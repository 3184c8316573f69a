"""Per-dataset stage defaults: ``dataset.recipe.<section>`` with ``dataset.recipe.size_table`` (by image size) and
``dataset.recipe.ipc_table`` (by ipc) overrides, and the student batch capped at the distilled set's size.

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

    ``recipe.size_table`` maps an image-size threshold to overrides (``{1: {recover: {jitter: 4}}, 224: {}}``);
    the entry with the largest threshold <= ``dataset.image_size`` is merged over ``recipe.<section>``. An entry
    ``{refuse: "<reason and fix>"}`` refuses the size with a ConfigError. ``recipe.ipc_table`` maps an ipc
    threshold to overrides, e.g. ``{1: {student: {batch_size: 10}}}``; the entry with the largest threshold
    <= ``ipc`` is merged over both (nested dicts merged key by key). Stage configs that leave a knob null fall back
    to this. Last, the student batch is capped at the distilled set's size ``ipc * num_classes`` (RDED's
    ``argument.py``: "reset batch size below ipc * nclass"): a recipe batch never exceeds the images there are.

    Raises:
        ConfigError: the size table refuses ``dataset.image_size``.

    Args:
        ds_cfg: the dataset config (any mapping: the experiment's dataset section or a dict).
        section: one of "squeeze", "stats", "recover", "student".
        ipc: images per class of the run; None skips the ipc table.
    """
    if section not in SECTIONS:
        raise DatasetError(f"unknown recipe section {section!r}; valid: {SECTIONS}")
    base = to_plain(cfg_get(ds_cfg, f"recipe.{section}", {})) or {}
    base = _merge(base, size_entry(ds_cfg).get(section) or {})
    table = to_plain(cfg_get(ds_cfg, "recipe.ipc_table", {})) or {}
    if ipc is not None and table:
        keys = [int(k) for k in table if int(k) <= int(ipc)]
        if keys:
            entry = {int(k): v for k, v in table.items()}[max(keys)] or {}
            base = _merge(base, entry.get(section) or {})
    n = cfg_get(ds_cfg, "num_classes", None)
    if section == "student" and ipc is not None and n is not None and base.get("batch_size") is not None:
        base["batch_size"] = min(int(base["batch_size"]), int(ipc) * int(n))
    return base


def size_entry(ds_cfg: Any) -> dict[str, Any]:
    """The ``recipe.size_table`` entry for ``dataset.image_size`` (largest threshold <= the size), {} without one.

    Raises:
        ConfigError: the entry refuses this size (its ``refuse`` text says why and names the fix).
    """
    from lpld.core.errors import ConfigError

    table = to_plain(cfg_get(ds_cfg, "recipe.size_table", {})) or {}
    size = cfg_get(ds_cfg, "image_size", None)
    if not table or size is None:
        return {}
    keys = [int(k) for k in table if int(k) <= int(size)]
    if not keys:
        return {}
    entry = {int(k): v for k, v in table.items()}[max(keys)] or {}
    if entry.get("refuse"):
        raise ConfigError(f"dataset.image_size={int(size)}: {entry['refuse']}")
    return entry


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
