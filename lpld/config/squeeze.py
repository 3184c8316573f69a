"""Resolved knobs of stage=squeeze (the teacher's training recipe)."""

from __future__ import annotations

from typing import Any

from lpld.config.frozen import memoized
from lpld.config.precedence import Knobs, node_get, section_recipe
from lpld.config.schema import SqueezeStage
from lpld.errors import ConfigError


@memoized("squeeze")
def squeeze_settings(cfg: Any) -> dict[str, Any]:
    """The teacher's training recipe: ``stage.<key>`` (under stage=squeeze) > dataset ``recipe.squeeze`` >
    schema default. Other stages (which check a teacher) see the recipe: their stage node is not squeeze's."""
    node = cfg.stage if str(node_get(cfg.get("stage"), "name")) == "squeeze" else None
    k = Knobs(node, section_recipe(cfg.dataset, cfg.get("ipc"), "squeeze"), SqueezeStage)
    return {
        "name": str(k.get("optimizer")),
        "epochs": int(k.get("epochs")),
        "batch_size": int(k.get("batch_size")),
        "lr": float(k.get("lr")),
        "weight_decay": float(k.get("weight_decay")),
        "momentum": float(k.get("momentum")),
        "warmup_epochs": float(k.get("warmup_epochs")),
        "label_smoothing": float(k.get("label_smoothing")),
        # only when set: teachers trained without ghost BN keep their fingerprints
        **({"bn_rows": _bn_rows(k.get("bn_rows"))} if k.get("bn_rows") else {}),
    }


def _bn_rows(value: Any) -> int:
    rows = int(value)
    if rows < 0:
        raise ConfigError(f"stage.bn_rows={rows} must be >= 1 (BatchNorm rows per group) or 0 (each rank's forward)")
    return rows
