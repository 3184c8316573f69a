"""Student label schedules (issue 21, item 5): which epochs train on the soft labels and which on hard labels.

``student.label_schedule=<name>`` selects a function registered with ``@register_label_schedule(name)`` that maps
(epoch, epochs, params) to ``"soft"`` (the configured ``student.loss`` on the stored / online labels) or ``"hard"``
(cross-entropy on the images' own classes, CutMix-mixed by the stored box, label-smoothed; no label is read).

* ``none``: every epoch soft (lpld's behaviour before, and every official SRe2L-family student).
* ``hald``: HALD's soft -> hard -> soft schedule (Cui et al., "Hard Labels In! Rethinking the Role of Hard Labels in
  Mitigating Local Semantic Drift", github.com/Jiacheng8/HALD, ``validate/train_fkd.py``, ``--setting S6``, the
  default): with H hard epochs of E and S = E - H soft ones, the phases are S // 2 soft epochs, H hard epochs, then
  S - S // 2 soft epochs (``epochs_weight = [soft//2, hard, soft - soft//2]``). The official ImageNet-1K script
  (``validate/scripts/imagenet1k/train.sh``) runs ``soft_epochs=150``, ``hard_epochs=150`` of 300: H = E / 2, the
  default of ``student.hard_epochs=null``. Its hard phase (``hard_train``) is a soft cross-entropy against timm
  ``Mixup(cutmix_alpha=1, label_smoothing=0.8)`` targets: lam (1 - eps + eps/C on y, eps/C elsewhere) +
  (1 - lam) (the same for the CutMix partner), eps = 0.8 (``--label-smoothing`` default, ``student.hard_smoothing``),
  which equals ``kd_loss.hard_ce`` with ``label_smoothing=eps`` (cross-entropy is linear in its target).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lpld.core.registry import Registry

PHASES = ("soft", "hard")
HALD_SMOOTHING = 0.8  # HALD train_fkd.py: --label-smoothing default (timm Mixup label_smoothing in the hard phase)

# a label schedule: (0-based epoch, total epochs E, params) -> "soft" | "hard"
LabelSchedule = Callable[[int, int, dict[str, Any]], str]
_SCHEDULES: Registry[LabelSchedule] = Registry("student label schedule", "student.label_schedule")


def register_label_schedule(name: str) -> Callable[[LabelSchedule], LabelSchedule]:
    """Decorator: register an ``(epoch, epochs, params) -> "soft" | "hard"`` function as ``student.label_schedule``."""
    return _SCHEDULES.register(name)


def get_label_schedule(name: str) -> LabelSchedule:
    """The schedule called ``name`` (raises ConfigError naming the valid schedules)."""
    return _SCHEDULES.get(name)


def list_label_schedules() -> list[str]:
    return _SCHEDULES.names()


def label_phase(name: str, epoch: int, epochs: int, params: dict[str, Any] | None = None) -> str:
    """``"soft"`` or ``"hard"``: how 0-based ``epoch`` of ``epochs`` trains under schedule ``name``."""
    out = get_label_schedule(name)(int(epoch), int(epochs), dict(params or {}))
    if out not in PHASES:
        raise ValueError(f"label schedule {name!r} returned {out!r} for epoch {epoch}; expected one of {PHASES}")
    return out


def hald_phases(epochs: int, hard_epochs: int | None = None) -> list[tuple[str, int]]:
    """HALD's S6 phases [(soft, S // 2), (hard, H), (soft, S - S // 2)] of E epochs (H = E // 2 when None).

    Raises:
        ValueError: H outside [0, E].
    """
    e = int(epochs)
    h = e // 2 if hard_epochs is None else int(hard_epochs)
    if not 0 <= h <= e:
        raise ValueError(f"HALD needs 0 <= hard_epochs <= epochs, got hard_epochs={h} of {e}")
    s = e - h
    return [("soft", s // 2), ("hard", h), ("soft", s - s // 2)]


@register_label_schedule("none")
def _none(epoch: int, epochs: int, params: dict[str, Any]) -> str:
    return "soft"


@register_label_schedule("hald")
def _hald(epoch: int, epochs: int, params: dict[str, Any]) -> str:
    start = 0
    for kind, n in hald_phases(epochs, params.get("hard_epochs")):
        if start <= epoch < start + n:
            return kind
        start += n
    return "soft"  # past the schedule (never in a run of `epochs` epochs)
