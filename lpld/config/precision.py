"""The precision a stage runs in, from the trainer preset (no Lightning needed to decide it)."""

from __future__ import annotations

from typing import Any


def resolve_precision(trainer_cfg: Any, stage: str | None, explicit: str | None = None) -> str:
    """The Lightning precision of a stage: ``explicit`` > ``trainer.stage_precision[stage]`` > ``trainer.precision``."""
    if explicit is not None:
        return str(explicit)
    table = trainer_cfg.get("stage_precision") or {}
    if stage is not None and table.get(stage) is not None:
        return str(table[stage])
    return str(trainer_cfg.get("precision", "32-true"))
