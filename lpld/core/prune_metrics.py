"""Label-pruning metrics of LPLD Table 5a / Appendix E.1, computed from stored labels only.

Per-sample scores (higher = easier, for every metric):

* ``correct``:     1 if the teacher's top-1 class equals the image's class, else 0.
* ``diff``:        top-1 minus top-2 probability of the teacher's softmax (at T = 1).
* ``diff_signed``: logit of the image's class minus the largest other logit (needs full logits).
* ``cut_ratio``:   max(lambda, 1 - lambda) of the batch's CutMix (how close the mixed image is to
                   a single unmixed image; lambda = area share of the base image).
* ``confidence``:  the largest softmax probability (at T = 1).

The score of a stored batch is the mean of its per-sample scores (``batch_score``); the pool
selection in ``lpld.core.label_pool.select_pool`` ranks batches by it. For CutMix batches the
"image's class" is the class of the base image (the one whose crop fills 1 - box).

``metric=<name>`` selects a scorer registered with ``@register_prune_metric(name)`` (``get_prune_metric``,
``list_prune_metrics``); ``random`` is registered without one (the pool is drawn without scores).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lpld.core.registry import Registry


class MetricInputError(ValueError):
    """The label store lacks a field the requested pruning metric needs."""


@dataclass(frozen=True)
class ScoreInputs:
    """One stored batch as a metric sees it (see ``per_sample_scores`` for the fields)."""

    labels: torch.Tensor
    probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hard: torch.Tensor | None = None
    cut_lambda: float | None = None


# a metric: inputs -> (B,) float64 per-sample scores, higher = easier; None for ``random`` (no scores)
Scorer = Callable[[ScoreInputs], torch.Tensor]
_METRICS: Registry[Scorer | None] = Registry("pruning metric", "metric")


def register_prune_metric(name: str) -> Callable[[Scorer | None], Scorer | None]:
    """Decorator: register a ``ScoreInputs -> (B,) scores`` function as ``metric=<name>``."""
    return _METRICS.register(name)


def get_prune_metric(name: str) -> Scorer | None:
    """The scorer of ``metric=<name>`` (None for ``random``); raises ConfigError naming the valid metrics."""
    return _METRICS.get(name)


def list_prune_metrics() -> list[str]:
    """Registered pruning metrics, in registration order."""
    return _METRICS.names()


register_prune_metric("random")(None)  # random pruning draws the pool without scoring batches


@register_prune_metric("correct")
def _correct(b: ScoreInputs) -> torch.Tensor:
    if b.probs is not None:
        pred = b.probs.argmax(dim=1)
    elif b.logits is not None:
        pred = b.logits.argmax(dim=1)
    elif b.hard is not None:
        pred = b.hard
    else:
        raise MetricInputError("metric 'correct' needs stored soft or hard labels; the batch has none")
    return (pred.long() == b.labels.long()).double()


def _need_probs(metric: str, b: ScoreInputs) -> torch.Tensor:
    if b.probs is None:
        raise MetricInputError(
            f"metric '{metric}' needs teacher probabilities; a quant=hard store has none. "
            "Relabel with quant=none (or mr) for this metric"
        )
    return b.probs


@register_prune_metric("diff")
def _diff(b: ScoreInputs) -> torch.Tensor:
    top2 = _need_probs("diff", b).double().topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


@register_prune_metric("diff_signed")
def _diff_signed(b: ScoreInputs) -> torch.Tensor:
    if b.logits is None:
        raise MetricInputError(
            "metric 'diff_signed' needs the full stored logits (the true-class logit); "
            "relabel the source store with quant=none"
        )
    z = b.logits.double()
    true = z.gather(1, b.labels.long().view(-1, 1)).squeeze(1)
    other = z.scatter(1, b.labels.long().view(-1, 1), float("-inf")).max(dim=1).values
    return true - other


@register_prune_metric("cut_ratio")
def _cut_ratio(b: ScoreInputs) -> torch.Tensor:
    if b.cut_lambda is None:
        raise MetricInputError(
            "metric 'cut_ratio' needs CutMix; the label store was generated without it "
            "(relabel with an augmentation that uses CutMix)"
        )
    lam = float(b.cut_lambda)
    return torch.full((b.labels.shape[0],), max(lam, 1.0 - lam), dtype=torch.float64)


@register_prune_metric("confidence")
def _confidence(b: ScoreInputs) -> torch.Tensor:
    return _need_probs("confidence", b).double().max(dim=1).values


METRICS = tuple(list_prune_metrics())  # the built-in metrics (kept for older imports; the registry is the truth)


def per_sample_scores(
    metric: str,
    labels: torch.Tensor,
    probs: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    hard: torch.Tensor | None = None,
    cut_lambda: float | None = None,
) -> torch.Tensor:
    """Per-sample easiness of one stored batch.

    Args:
        metric: a registered metric except ``random``.
        labels: (B,) int64 class of each (base) image.
        probs: (B, C) teacher distribution at T = 1 (decoded from the store), if available.
        logits: (B, C) full stored teacher logits, if the store kept them (quant none).
        hard: (B,) stored hard labels (quant hard), if any.
        cut_lambda: CutMix area share of the base image for this batch, or None without CutMix.

    Returns:
        (B,) float64 scores, higher = easier.

    Raises:
        MetricInputError: the inputs this metric needs are missing (names the store setting to use).
        ConfigError: unknown metric (a ValueError naming the valid ones).
    """
    scorer = get_prune_metric(metric)
    if scorer is None:
        raise ValueError(f"metric '{metric}' has no scores; the store itself is the pool")
    return scorer(ScoreInputs(labels, probs, logits, hard, cut_lambda))


def batch_score(scores: torch.Tensor) -> float:
    """Score of a stored batch: the mean of its per-sample scores.

    Args:
        scores: (B,) per-sample scores.
    """
    return float(scores.double().mean())
