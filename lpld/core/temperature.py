"""LPQLD temperatures: Dynamic Knowledge Reuse (DKR) schedules and Calibrated Alignment (CA).

DKR (LPQLD Sec. III-D) re-decodes the *stored* logits at a temperature that changes over
the student's epochs, so one stored label yields different targets over time. Epochs are
0-based here (epoch 0 is the first training epoch); with E total epochs, T0 the base
temperature:

* ``none``:           T(e) = T0
* ``step``:           T(e) = max(T0 * gamma ** floor(e / s), floor)       (ImageNet-1K: T0=20, s=30, gamma=0.7, floor=2)
* ``step_reverse``:   T(e) = T0 * gamma ** floor((E - 1 - e) / s)             (the step sequence played backwards)
* ``cosine``:         T(e) = T_min + (T0 - T_min) * (1 + cos(pi * e / E)) / 2
* ``cosine_reverse``: T(e) = T_min + (T0 - T_min) * (1 - cos(pi * e / E)) / 2

The public LPQLD code (``train_FKD_LPQLD.py``) passes 1-based epochs to these formulas
(``current_epoch = step // batches_per_epoch + 1``), clamps ``step_reverse``'s epoch at E - 1 and
applies the floor only to ``step``. ``epoch_base=1`` (the config default, ``student.temp_epoch_base``)
reproduces that: e' = e + 1 replaces e in every formula, and e' is clamped at E - 1 in
``step_reverse``. ``epoch_base=0`` gives the 0-based formulas above. The floor applies to ``step``
only, as in the public code; ``floor=0`` disables it.

CA (LPQLD Sec. III-E) gives the student its own softmax temperature T_s: ``none`` (T_s = T),
``fixed`` (a constant), or ``search`` (after each epoch, grid-search T_s in (0.01, 1] for the
value minimising KL(p || softmax(z / T_s)) on the last training batch, as the public code does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCHEDULES = ("none", "step", "step_reverse", "cosine", "cosine_reverse")
CA_MODES = ("none", "fixed", "search")


def dkr_temperature(
    schedule: str,
    epoch: int,
    total_epochs: int,
    t0: float,
    step_size: int = 30,
    gamma: float = 0.7,
    floor: float = 2.0,
    t_min: float = 1.0,
    epoch_base: int = 0,
) -> float:
    """Teacher temperature T(e) of a DKR schedule (see the module docstring for the formulas).

    Args:
        schedule: one of SCHEDULES.
        epoch: 0-based student epoch e.
        total_epochs: E (> 0).
        t0: base temperature T0.
        step_size: s, epochs per step (step schedules).
        gamma: multiplicative decay per step (step schedules).
        floor: lower bound of the step schedules (0 = none).
        t_min: end temperature of the cosine schedules.
        epoch_base: 1 = the public code's 1-based epochs (e + 1 in the formulas), 0 = 0-based.

    Returns:
        T(e) as a float.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown temperature schedule '{schedule}'; valid: {', '.join(SCHEDULES)}")
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be > 0, got {total_epochs}")
    if schedule == "none":
        return float(t0)
    if epoch_base not in (0, 1):
        raise ValueError(f"temperature epoch_base must be 0 or 1, got {epoch_base}")
    ep = epoch + epoch_base
    if schedule == "step":
        if step_size <= 0:
            raise ValueError(f"temperature step_size must be > 0, got {step_size}")
        return float(max(t0 * gamma ** (max(ep, 0) // step_size), floor))
    if schedule == "step_reverse":
        if step_size <= 0:
            raise ValueError(f"temperature step_size must be > 0, got {step_size}")
        e = total_epochs - 1 - min(ep, total_epochs - 1)  # the public code clamps the (1-based) last epoch
        return float(t0 * gamma ** (max(e, 0) // step_size))
    c = math.cos(math.pi * ep / total_epochs)
    if schedule == "cosine":
        return float(t_min + (t0 - t_min) * (1.0 + c) / 2.0)
    return float(t_min + (t0 - t_min) * (1.0 - c) / 2.0)


def ca_grid(lo: float = 0.01, hi: float = 1.0, n: int = 100) -> torch.Tensor:
    """The student-temperature grid: n evenly spaced values in [lo, hi] (public code: 0.01..1, 100)."""
    if not (0 < lo <= hi) or n < 1:
        raise ValueError(f"CA grid needs 0 < lo <= hi and n >= 1, got lo={lo} hi={hi} n={n}")
    return torch.linspace(lo, hi, n, dtype=torch.float64)


def ca_losses(student_logits: torch.Tensor, target_probs: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(z / t)) (batchmean) for every t of the grid, in one batched evaluation.

    Args:
        student_logits: (B, C) student logits z (detached).
        target_probs: (B, C) teacher distribution p.
        grid: (G,) candidate student temperatures.

    Returns:
        (G,) float64 losses.
    """
    z = student_logits.detach().double()
    p = target_probs.detach().double()
    g = grid.to(z.device, torch.float64)
    log_q = F.log_softmax(z.unsqueeze(0) / g.view(-1, 1, 1), dim=2)  # (G, B, C)
    ent = torch.xlogy(p, p).sum(dim=1).mean()
    return ent - (p.unsqueeze(0) * log_q).sum(dim=2).mean(dim=1)


def search_student_temperature(
    student_logits: torch.Tensor, target_probs: torch.Tensor, grid: torch.Tensor | None = None
) -> float:
    """Calibrated Alignment search: argmin over the grid of KL(p || softmax(z / t)).

    Ties go to the smallest t (first minimum), as numpy's argmin in the public code.

    Args:
        student_logits: (B, C) student logits on the last training batch.
        target_probs: (B, C) the teacher targets that batch was trained against.
        grid: (G,) candidates; default ``ca_grid()``.

    Returns:
        The minimising temperature.
    """
    grid = ca_grid() if grid is None else grid
    losses = ca_losses(student_logits, target_probs, grid)
    return float(grid[int(torch.argmin(losses))])
