"""Student losses against stored labels: KL at temperature T, MSE + gamma x CE, plain CE.

All three take the student's raw logits and return a scalar averaged over the batch, so a
gradient-accumulation caller can divide by the number of micro-batches without caring
which loss is active.

* ``kd_kl`` (SRe2L / LPLD / LPQLD validation, REFERENCE "student"): the teacher target p is
  the stored label decoded at the (possibly DKR-scheduled) teacher temperature T, the
  student distribution is q = softmax(z / T_s) with T_s = T unless Calibrated Alignment
  chooses a separate student temperature. Loss = KL(p || q) summed over classes and
  averaged over the batch ("batchmean"), optionally times T^2 (Hinton's gradient-scale
  correction; the public LPQLD code does this on Tiny-ImageNet only).
* ``mse_logits_gt`` (G-VBSM's "MSE + 0.1 x GT", LPLD Table 9 / Appendix C.4, the default of
  ``student.loss=mse_gt``): ``F.mse_loss(z, t)`` between the student's and the stored teacher's
  raw logits (mean over batch *and* classes), plus gamma x cross-entropy of the raw logits on
  each image's own class (G-VBSM ``train_FKD_parallel.py``: ``--loss-type mse_gt --ce-weight 0.1``;
  its CE ignores CutMix). It needs full stored logits (``quant=none``).
* ``mse_gt`` (lpld's earlier variant, ``student.mse_target=probs``): squared L2 distance between
  q = softmax(z / T_s) and p, summed over classes and averaged over the batch, plus gamma x the
  CutMix-mixed cross-entropy; defined for every stored label format (MR-k stores included).
  At T = 20 its gradient is ~1e-7 against ~1e-2 for the CE term, so it trains on hard labels.
* ``ce``: cross-entropy of the raw logits on hard labels, the no-soft-label baseline. With
  CutMix the loss mixes the two images' labels with the stored area share lambda.
* ``gift`` (GIFT, LINs-lab/GIFT ``validate/losses_benchmark.py``, criterion ``gift``): 1 - mean cosine between the
  student's raw logits and t / |t| + w s / |s|, t the teacher's logits, s the image's label smoothed with
  alpha = 0.1 (true class 1 - alpha, the others alpha / (C - 1)), w = ``student.gamma`` (0.1 as the official code).

``student.loss=<name>`` selects a function registered with ``@register_student_loss(name)`` that maps
:class:`LossInputs` (one slice of a stored batch) to (loss, soft target or None); ``get_student_loss`` /
``list_student_losses`` look them up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lpld.core.registry import Registry

MSE_TARGETS = ("logits", "probs")  # student.mse_target of loss=mse_gt: G-VBSM's raw logits | lpld's softmax
SMOOTHING_SPACES = ("probs", "logits")  # student.smoothing_space: where label smoothing acts on the soft target


def smooth_targets(probs: torch.Tensor, eps: float) -> torch.Tensor:
    """Label smoothing of a soft target: (1 - eps) * p + eps / C.

    Args:
        probs: (B, C) target distribution (rows sum to 1).
        eps: smoothing share in [0, 1).

    Returns:
        (B, C) smoothed distribution (rows still sum to 1).
    """
    if eps <= 0:
        return probs
    return probs * (1.0 - eps) + eps / probs.shape[1]


def smoothing_temperature(temperature: float, eps: float) -> float:
    """The temperature at which logit-space smoothing equals a plain softmax.

    The official ImageNet-21K student smooths the stored logits, z' = (1 - eps) z + eps / C, before
    softmax(z' / T) (``train_FKD_label_pruning_batch.py``). The constant eps / C cancels in the softmax,
    so softmax(z' / T) = softmax(z / (T / (1 - eps))): decoding at T / (1 - eps) reproduces it for
    every format that keeps logits (full or top-k).

    Args:
        temperature: T of the target.
        eps: smoothing share in [0, 1).

    Returns:
        T / (1 - eps).
    """
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label smoothing must lie in [0, 1), got {eps}")
    return float(temperature) / (1.0 - float(eps))


def mse_logits_gt(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, gamma: float = 0.1
) -> torch.Tensor:
    """G-VBSM's MSE + gamma x GT loss on raw logits (LPLD Table 9 "Ours+").

    loss = mean_{b,c} (z_bc - t_bc)^2 + gamma * CE(z, y)

    Args:
        student_logits: (B, C) raw student outputs z.
        teacher_logits: (B, C) stored teacher (ensemble) logits t.
        labels: (B,) int64 class of each image (its own class, not CutMix-mixed, as G-VBSM).
        gamma: weight of the cross-entropy term (0.1).

    Returns:
        () scalar loss.
    """
    z = student_logits.float()
    return F.mse_loss(z, teacher_logits.float()) + gamma * F.cross_entropy(z, labels)


def kd_kl(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    student_temperature: float,
    t2_scale: float | None = None,
) -> torch.Tensor:
    """KL(p || softmax(z / T_s)), batchmean, optionally times ``t2_scale ** 2``.

    Zero-probability target entries (MR-k quantization puts 0 outside the top-k) contribute
    0 (the 0 log 0 = 0 convention), so no epsilon is needed.

    Args:
        student_logits: (B, C) raw student outputs z.
        target_probs: (B, C) teacher distribution p at the teacher temperature.
        student_temperature: T_s > 0 dividing the student logits.
        t2_scale: if given, multiply the loss by t2_scale^2 (pass the teacher temperature T).

    Returns:
        () scalar loss.
    """
    if student_temperature <= 0:
        raise ValueError(f"student temperature must be > 0, got {student_temperature}")
    log_q = F.log_softmax(student_logits.float() / student_temperature, dim=1)
    p = target_probs.float()
    # xlogy gives 0 where p == 0 (MR-k zeros), matching KL's definition.
    kl = (torch.xlogy(p, p) - p * log_q).sum(dim=1).mean()
    if t2_scale is not None:
        kl = kl * float(t2_scale) ** 2
    return kl


def mse_gt(
    student_logits: torch.Tensor,
    target_probs: torch.Tensor,
    labels: torch.Tensor,
    student_temperature: float,
    gamma: float = 0.1,
    label_smoothing: float = 0.0,
    partner_labels: torch.Tensor | None = None,
    lam: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """G-VBSM's MSE + gamma x GT loss (LPLD Table 9, "Ours+").

    loss = mean_b sum_c (softmax(z_b / T_s)_c - p_bc)^2 + gamma * CE(z, y), where the CE term is
    ``hard_ce`` (CutMix-mixed when ``partner_labels`` is given).

    Args:
        student_logits: (B, C) raw student outputs z.
        target_probs: (B, C) teacher distribution p.
        labels: (B,) int64 class of each image (the ground truth "GT").
        student_temperature: T_s > 0.
        gamma: weight of the cross-entropy term.
        label_smoothing: label smoothing of the CE term.
        partner_labels: (B,) classes of the CutMix partners, or None.
        lam: CutMix area share of the base image, with ``partner_labels``.

    Returns:
        () scalar loss.
    """
    q = F.softmax(student_logits.float() / student_temperature, dim=1)
    mse = (q - target_probs.float()).pow(2).sum(dim=1).mean()
    ce = hard_ce(student_logits, labels, partner_labels, lam, label_smoothing)
    return mse + gamma * ce


def hard_ce(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    partner_labels: torch.Tensor | None = None,
    lam: float | torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy on hard labels; with CutMix, lam * CE(y) + (1 - lam) * CE(y_partner).

    Args:
        student_logits: (B, C) raw student outputs.
        labels: (B,) class of each (base) image.
        partner_labels: (B,) class of the image pasted in by CutMix, or None (no mixing).
        lam: area share of the base image (scalar or (B,)), required with ``partner_labels``.
        label_smoothing: label smoothing share.

    Returns:
        () scalar loss.
    """
    z = student_logits.float()
    if partner_labels is None:
        return F.cross_entropy(z, labels, label_smoothing=label_smoothing)
    if lam is None:
        raise ValueError("hard_ce with partner_labels needs lam (the CutMix area share)")
    lam_t = torch.as_tensor(lam, dtype=z.dtype, device=z.device)
    a = F.cross_entropy(z, labels, label_smoothing=label_smoothing, reduction="none")
    b = F.cross_entropy(z, partner_labels, label_smoothing=label_smoothing, reduction="none")
    return (lam_t * a + (1.0 - lam_t) * b).mean()


GIFT_ALPHA = 0.1  # label smoothing of GIFT's hard label (official batch_label_smoothing(alpha=0.1))


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, alpha: float = GIFT_ALPHA) -> torch.Tensor:
    """(B,) classes -> (B, C) labels with 1 - alpha on the class and alpha / (C - 1) on each other class."""
    out = torch.full((labels.shape[0], num_classes), alpha / (num_classes - 1), device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - alpha)


def gift_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    labels: torch.Tensor,
    weight: float = 0.1,
    alpha: float = GIFT_ALPHA,
    partner_labels: torch.Tensor | None = None,
    lam: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """GIFT: 1 - mean_b cos(z_b, t_b / |t_b| + w * s_b / |s_b|).

    Args:
        student_logits: (B, C) raw student outputs z.
        teacher_values: (B, C) the teacher's logits t (GIFT), or a stored target standing in for them.
        labels: (B,) class of each (base) image.
        weight: w, the weight of the smoothed hard label (official 0.1).
        alpha: label smoothing of the hard label (official 0.1).
        partner_labels: (B,) CutMix partners' classes, or None; then s = lam s(y) + (1 - lam) s(y_partner)
            (the official evaluation does not mix; this follows ``hard_ce``'s convention).
        lam: CutMix area share of the base image, with ``partner_labels``.

    Returns:
        () scalar loss in [0, 2].
    """
    z = student_logits.float()
    s = smoothed_one_hot(labels, z.shape[1], alpha).to(z.device)
    if partner_labels is not None:
        if lam is None:
            raise ValueError("gift_loss with partner_labels needs lam (the CutMix area share)")
        lam_t = torch.as_tensor(lam, dtype=z.dtype, device=z.device).reshape(-1, 1)
        s = lam_t * s + (1.0 - lam_t) * smoothed_one_hot(partner_labels, z.shape[1], alpha).to(z.device)
    target = F.normalize(teacher_values.float(), dim=1) + weight * F.normalize(s, dim=1)
    return 1.0 - F.cosine_similarity(z, target, dim=1).mean()


# ------------------------------------------------------------------------------------------ registry
@dataclass
class LossInputs:
    """What a student loss sees for one slice of a stored batch.

    Attributes:
        logits: (n, C) raw student outputs of the slice.
        labels: (n,) class of each (base) image.
        partner: (n,) classes of the CutMix partners, or None without CutMix.
        lam: CutMix area share of the base image, or None.
        stored: the StoredBatch (``logits`` / ``hard`` fields per the store's quant mode).
        rows: the slice's rows of ``stored``.
        quant_mode: the store's label format (none | mr | ms | hard).
        target: () -> (n, C) teacher distribution at ``teacher_t`` (decoded on demand: ``ce`` never needs it).
        teacher_t: teacher temperature T this epoch; ``student_t`` the student's T_s.
        label_smoothing: smoothing of the hard labels (ce, GT term); the soft target is already smoothed.
        options: the ``student.loss`` options (gamma, t2, mse_target).
    """

    logits: torch.Tensor
    labels: torch.Tensor
    partner: torch.Tensor | None
    lam: float | None
    stored: Any
    rows: slice
    quant_mode: str
    target: Callable[[], torch.Tensor]
    teacher_t: float
    student_t: float
    label_smoothing: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


# a student loss: inputs -> (scalar loss, the soft target it used or None); the target feeds Calibrated Alignment
StudentLoss = Callable[[LossInputs], tuple[torch.Tensor, torch.Tensor | None]]
_LOSSES: Registry[StudentLoss] = Registry("student loss", "student.loss")


def register_student_loss(name: str) -> Callable[[StudentLoss], StudentLoss]:
    """Decorator: register a ``LossInputs -> (loss, target | None)`` function as ``student.loss=<name>``."""
    return _LOSSES.register(name)


def get_student_loss(name: str) -> StudentLoss:
    """The loss called ``name`` (raises ConfigError naming the valid losses)."""
    return _LOSSES.get(name)


def list_student_losses() -> list[str]:
    """Registered student losses, in registration order."""
    return _LOSSES.names()


@register_student_loss("kl")
def _kl(b: LossInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    target = b.target()
    t2 = b.teacher_t if b.options.get("t2") else None
    return kd_kl(b.logits, target, b.student_t, t2_scale=t2), target


@register_student_loss("mse_gt")
def _mse_gt(b: LossInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    gamma = float(b.options.get("gamma", 0.1))
    if b.options.get("mse_target", "probs") == "logits":
        # G-VBSM: MSE on the raw stored logits + gamma x CE on each image's own class
        return mse_logits_gt(b.logits, b.stored.logits[b.rows], b.labels, gamma), None
    target = b.target()
    return mse_gt(b.logits, target, b.labels, b.student_t, gamma, b.label_smoothing, b.partner, b.lam), target


@register_student_loss("ce")
def _ce(b: LossInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    if b.quant_mode == "hard":  # the teacher's label of the augmented (mixed) image
        return hard_ce(b.logits, b.stored.hard[b.rows].long(), label_smoothing=b.label_smoothing), None
    return hard_ce(b.logits, b.labels, b.partner, b.lam, b.label_smoothing), None


@register_student_loss("gift")
def _gift(b: LossInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    # the teacher's logits where the store keeps them (quant=none, as GIFT); otherwise the decoded target at T
    logits = getattr(b.stored, "logits", None) if b.quant_mode == "none" else None
    teacher = logits[b.rows] if logits is not None else b.target()
    weight = float(b.options.get("gamma", 0.1))
    return gift_loss(b.logits, teacher, b.labels, weight, GIFT_ALPHA, b.partner, b.lam), None


LOSSES = tuple(list_student_losses())  # the built-in losses (kept for older imports; the registry is the truth)
