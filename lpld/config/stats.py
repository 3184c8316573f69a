"""Resolved knobs of stage=stats, also read by recover (the consumer opens the statistics stage=stats wrote)."""

from __future__ import annotations

from typing import Any

from lpld.config.frozen import memoized
from lpld.config.precedence import node_get, section_recipe
from lpld.config.schema import StatsStage, fallback
from lpld.errors import ConfigError


def _stats_node(cfg: Any) -> Any:
    """``cfg.stage`` under stage=stats; None otherwise (a consumer sees the default pass)."""
    st = cfg.get("stage")
    return st if str(node_get(st, "name")) == "stats" else None


def stats_mode(cfg: Any) -> str:
    """The class-wise statistics mode a run writes (stage=stats) or reads (recover): one resolver for both.

    ``stage.mode`` of stage=stats, else ``recover.stats_mode``, else the dataset's ``recipe.stats.mode``
    (in1k / tiny / in21k: ``official``, the ClassAwareBatchNorm2d EMA their published runs used; the
    small datasets, which have no official run: ``exact``), else ``exact``.
    """
    for v in (node_get(_stats_node(cfg), "mode"), node_get(cfg.get("recover"), "stats_mode")):
        if v is not None:
            return str(v)
    return str(section_recipe(cfg.dataset, cfg.get("ipc"), "stats").get("mode") or "exact")


@memoized("stats")
def stats_settings(cfg: Any) -> dict[str, Any]:
    """Resolved knobs of stage=stats: mode, momentum, batch_size, augment (and max_images, which limits the pass).

    ``stage.augment: null`` follows the mode: ``official`` sees RandomResizedCrop + flip images (as the
    official forward pass), ``exact`` / ``ema`` the eval transform.

    Raises:
        ConfigError: an unknown mode.
    """
    from lpld.core.bnstats import STATS_MODES

    mode = stats_mode(cfg)
    if mode not in STATS_MODES:
        raise ConfigError(
            f"unknown stats mode {mode!r}; set stage.mode (or dataset.recipe.stats.mode) to one of {STATS_MODES}"
        )
    node = _stats_node(cfg)

    recipe = section_recipe(cfg.dataset, cfg.get("ipc"), "stats")

    def get(key: str) -> Any:  # stage node > dataset recipe.stats (batch_size) > schema default
        v = node_get(node, key)
        if v is None and key == "batch_size":
            v = recipe.get("batch_size")
        return fallback(StatsStage, key) if v is None else v

    aug, limit = get("augment"), get("max_images")
    return {
        "mode": mode,
        "momentum": float(get("momentum")),
        "batch_size": int(get("batch_size")),
        "augment": (mode == "official") if aug is None else bool(aug),
        "max_images": int(limit) if limit else None,  # 0 or null: the whole train set
    }
