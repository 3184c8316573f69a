"""Per-dataset stage defaults: ``dataset.recipe.<section>`` with ``dataset.recipe.ipc_table`` overrides."""

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
        ds_cfg: the dataset config (DictConfig or dict).
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


def stats_mode(cfg: Any) -> str:
    """The class-wise statistics mode a run writes (stage=stats) or reads (recover): one resolver for both.

    ``stage.mode`` of stage=stats, else ``recover.stats_mode``, else the dataset's ``recipe.stats.mode``
    (in1k / tiny / in21k: ``official``, the ClassAwareBatchNorm2d EMA their published runs used; the
    small datasets, which have no official run: ``exact``), else ``exact``.
    """
    if str(cfg_get(cfg, "stage.name", "")) == "stats" and cfg_get(cfg, "stage.mode") is not None:
        return str(cfg_get(cfg, "stage.mode"))
    if cfg_get(cfg, "recover.stats_mode") is not None:
        return str(cfg_get(cfg, "recover.stats_mode"))
    return str(recipe(cfg_get(cfg, "dataset", {}) or {}, "stats").get("mode") or "exact")


def stats_settings(cfg: Any) -> dict[str, Any]:
    """Resolved knobs of stage=stats: mode, momentum, batch_size and whether images are augmented.

    ``stage.augment: null`` follows the mode: ``official`` sees RandomResizedCrop + flip images (as the
    official forward pass), ``exact`` / ``ema`` the eval transform.
    """
    from lpld.core.bnstats import STATS_MODES

    mode = stats_mode(cfg)
    if mode not in STATS_MODES:
        raise DatasetError(
            f"unknown stats mode {mode!r}; set stage.mode (or dataset.recipe.stats.mode) to one of {STATS_MODES}"
        )
    aug = cfg_get(cfg, "stage.augment")
    return {
        "mode": mode,
        "momentum": float(cfg_get(cfg, "stage.momentum", 0.1)),
        "batch_size": int(cfg_get(cfg, "stage.batch_size", 256)),
        "augment": (mode == "official") if aug is None else bool(aug),
    }
