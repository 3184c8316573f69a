"""Optimizers and per-step learning-rate schedules shared by the teacher (squeeze) and the student.

Both trainings use "linear warm-up, then cosine to 0" stepped once per optimizer step, but their
warm-ups differ, and each keeps its own so results do not move:

* ``from_fraction`` (student; LPLD Table 15 "warm-up from 0.01 x lr"): step s < W runs at
  ``lr * (a + (1 - a) * s / W)`` with a = ``warmup_start``, so step 0 trains at a x lr.
* ``counted`` (teacher): step s < W runs at ``lr * (s + 1) / W`` (step 0 already at lr / W).

After the warm-up, ``decay`` gives the factor at t = (s - W) / (T - W) in [0, 1]:
``cosine`` 0.5 (1 + cos(pi t)); ``smooth_cosine`` (RDED's / LPLD's ``--smoothing_lr``, strength 2)
0.5 (1 + cos(pi t / 2)), the first half-period only, ending at lr / 2; ``constant`` 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

OPTIMIZERS = ("sgd", "adamw", "adam")
WARMUPS = ("from_fraction", "counted")
DECAYS = ("cosine", "smooth_cosine", "constant")


def build_optimizer(
    name: str,
    params: Iterable[Any],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    fused: bool = False,
    key: str = "optimizer",
) -> torch.optim.Optimizer:
    """``sgd`` (with ``momentum``, ``nesterov``), ``adamw`` or ``adam`` over ``params``.

    Args:
        fused: use the fused kernels (one pass per step instead of a Python loop over tensors; CPU and CUDA).
        key: the config key naming the optimizer, for the error message.

    Raises:
        ValueError: unknown ``name``.
    """
    name = str(name).lower()
    kw = {"fused": True} if fused else {}
    if name == "sgd":
        nest = {"nesterov": True} if nesterov else {}
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **nest, **kw)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kw)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **kw)
    raise ValueError(f"unknown optimizer '{name}'; choose {key}=adamw | sgd | adam")


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate factor per optimizer step: warm-up over ``warmup_steps``, then ``decay`` to ``total_steps``.

    Attributes:
        total_steps: T, optimizer steps of the whole run.
        warmup_steps: W (0: no warm-up).
        warmup: ``from_fraction`` or ``counted`` (module docstring).
        warmup_start: a of ``from_fraction``.
        decay: ``cosine``, ``smooth_cosine`` or ``constant``.
    """

    total_steps: int
    warmup_steps: int
    warmup: str = "from_fraction"
    warmup_start: float = 0.01
    decay: str = "cosine"

    def __post_init__(self) -> None:
        if self.warmup not in WARMUPS:
            raise ValueError(f"unknown warm-up '{self.warmup}'; choose one of {WARMUPS}")
        if self.decay not in DECAYS:
            raise ValueError(f"unknown lr scheduler '{self.decay}'; choose one of {DECAYS}")

    def factor(self, step: int) -> float:
        """lr(step) / lr."""
        warm, total = self.warmup_steps, self.total_steps
        if step < warm:
            if self.warmup == "counted":
                return (step + 1) / warm
            start = self.warmup_start
            return start + (1.0 - start) * step / warm
        if self.decay == "constant":
            return 1.0
        period = 2.0 if self.decay == "smooth_cosine" else 1.0
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t) / period))


def step_scheduler(opt: torch.optim.Optimizer, schedule: LRSchedule) -> dict[str, Any]:
    """Lightning's ``lr_scheduler`` entry stepping ``schedule`` once per optimizer step."""
    # a plain function (not the dataclass) as the lambda: LambdaLR then stores nothing of it in checkpoints
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: schedule.factor(step))
    return {"scheduler": sched, "interval": "step"}
