"""Stage dispatch: ``stage=<name>`` runs ``lpld.stages.<name>.run(cfg)``.

Each stage module is imported lazily, so `python run.py stage=stats` does not pay for the
imports of the student stage, and a stage added later needs only its module and its
``conf/stage/<name>.yaml`` plus an entry in STAGES.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

log = logging.getLogger("lpld")

# name -> one-line description (shown when an unknown stage is requested)
STAGES: dict[str, str] = {
    "squeeze": "train the teacher on the full real train set",
    "stats": "record class-wise BatchNorm statistics of the teacher",
    "recover": "synthesize the distilled images (lpld, sre2l, lpld_c, cda, rded, random_real)",
    "relabel": "generate the (pruned, quantized) soft-label store",
    "student": "train/evaluate a student on distilled images + stored labels",
    "storage": "print the storage accounting of a label store, or predict it for a config",
    "report": "turn results records into paper-shaped tables and a Pareto plot",
    "analyze": "diversity metrics (cosine similarity, MMD), Eq. 8, image grids",
    "pipeline": "squeeze -> stats -> recover -> relabel -> student over a small grid, then report",
}


class ConfigError(ValueError):
    """Invalid configuration value; the message names the valid choices."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from the config's top-level ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def run_stage(cfg: DictConfig) -> Any:
    """Import and run the stage named by ``cfg.stage.name``; return what the stage returns
    (e.g. relabel's ``{"path": ...}``, which the pipeline hands to the student)."""
    name = str(cfg.stage.name)
    if name not in STAGES:
        valid = "\n".join(f"  {k:9s} {v}" for k, v in STAGES.items())
        raise ConfigError(f"unknown stage '{name}'. Valid stages (stage=<name>):\n{valid}")
    seed_everything(int(cfg.seed))
    module = importlib.import_module(f"lpld.stages.{name}")
    return module.run(cfg)


def dispatch(cfg: DictConfig) -> float | None:
    """``run_stage`` for ``@hydra.main``: only a float result is returned (what Hydra sweepers optimise)."""
    out = run_stage(cfg)
    return out if isinstance(out, float) else None
