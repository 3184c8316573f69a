"""The recover objective (LPLD Eq. 6; SRe2L Eq. 2-3), computed per *segment* in one pass.

A segment is the set of images whose BatchNorm statistics are matched together:

* LPLD / ``lpld_c``: the IPC images of one class (class-wise batching);
* SRe2L / CDA: image j of each class of a group of classes (one SRe2L batch).

Several segments share one device batch. The teacher runs in eval mode, so each image's
forward pass is independent of the others, and every loss term below is computed per
segment; the optimised scalar is the SUM over segments, so every image receives exactly the
gradient it would receive if its segment were optimised alone (a mean over segments would
rescale the gradients by the number of segments in the batch).

Per segment s (with images x_s, target class per image y):

    L_s = CE_s + alpha * sum_l w_l (||mu_l(x_s) - m_{l,s}||_2 + ||var_l(x_s) - v_{l,s}||_2)
          + tv_l2 * TV(x_s) + l2 * mean_i ||x_i||_2

where ``mu_l(x_s), var_l(x_s)`` are the mean and biased variance per channel of BN layer l's
input over the segment's images and pixels, ``m, v`` the targets (class-wise statistics for
LPLD, the global running statistics for SRe2L), ``w_0 = first_bn_multiplier`` and ``w_l = 1``
otherwise, CE_s the mean cross-entropy over the segment's images, TV the L2 total variation
(the norms of the four neighbour differences over the whole segment, as in DeepInversion).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    """Coefficients of Eq. 6 and the image priors."""

    alpha: float
    first_bn_multiplier: float = 10.0
    tv_l2: float = 0.0
    l2: float = 0.0


@dataclass
class SegmentLosses:
    """Per-segment terms, each (S,); ``total`` is the weighted sum per segment."""

    total: torch.Tensor
    ce: torch.Tensor
    bn: torch.Tensor
    tv: torch.Tensor
    l2: torch.Tensor

    def objective(self) -> torch.Tensor:
        """The scalar that is differentiated: the sum of the per-segment objectives."""
        return self.total.sum()


def segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum rows of ``values`` (B, ...) into (S, ...) by segment id ``seg`` (B,)."""
    out = values.new_zeros((num_segments, *values.shape[1:]))
    return out.index_add(0, seg, values)


def segment_counts(seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Number of images per segment: (S,) float32, on ``seg``'s device.

    ``bincount`` has a data-dependent output size, so on a GPU it waits for the device: the
    recover loop computes the counts once per device batch (they never change) and passes them
    to the loss functions below instead of letting each step recount.
    """
    return torch.bincount(seg, minlength=num_segments).to(torch.float32)


def segment_moments(
    x: torch.Tensor, seg: torch.Tensor, num_segments: int, counts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment channel mean and biased variance of a BN input (the statistics BN would use).

    Uses per-image moments and the law of total variance, so the activations are read once
    (one fused ``var_mean``) and the result equals the two-pass statistics of the segment's
    images concatenated:

        var_s = mean_i(var_i) + mean_i((mu_i - mu_s)^2)   (all images have the same pixel count)

    Args:
        x: (B, C, H, W) or (B, C) input of a BN layer (half precision is upcast: the moments and the
            targets they are matched to are fp32).
        seg: (B,) int64 segment id per image.
        num_segments: S.
        counts: optional (S,) images per segment (pass it in loops: see ``segment_counts``).

    Returns:
        mean (S, C), var (S, C).
    """
    if counts is None:
        counts = segment_counts(seg, num_segments)
    if x.is_floating_point() and x.element_size() < 4:
        x = x.float()
    counts = counts.to(x.dtype)[:, None]
    if x.dim() > 2:
        dims = tuple(range(2, x.dim()))
        var_i, mu_i = torch.var_mean(x, dim=dims, correction=0)  # (B, C)
    else:
        mu_i, var_i = x, torch.zeros_like(x)
    mu = segment_sum(mu_i, seg, num_segments) / counts
    dev = (mu_i - mu[seg]).square()
    var = segment_sum(var_i + dev, seg, num_segments) / counts
    return mu, var


def bn_matching_loss(
    bn_inputs: Sequence[torch.Tensor],
    seg: torch.Tensor,
    num_segments: int,
    target_mean: Sequence[torch.Tensor],
    target_var: Sequence[torch.Tensor],
    layer_weights: Sequence[float],
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """BN statistics matching term per segment (Eq. 2 with global targets, Eq. 6 with class-wise ones).

    Args:
        bn_inputs: per BN layer l, its input (B, C_l, ...).
        seg: (B,) segment id per image.
        num_segments: S.
        target_mean, target_var: per layer, (S, C_l) target statistics of each segment.
        layer_weights: per layer multiplier (first BN layer x ``first_bn_multiplier``).
        counts: optional (S,) images per segment (computed here when omitted).

    Returns:
        (S,) sum over layers of w_l (||mu - m||_2 + ||var - v||_2).
    """
    if counts is None:
        counts = segment_counts(seg, num_segments)
    total = None
    for x, m, v, w in zip(bn_inputs, target_mean, target_var, layer_weights, strict=True):
        mu, var = segment_moments(x, seg, num_segments, counts)
        term = torch.linalg.vector_norm(mu - m.to(mu.dtype), dim=1) + torch.linalg.vector_norm(
            var - v.to(var.dtype), dim=1
        )
        term = term * float(w)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no BatchNorm inputs were captured; the teacher needs BatchNorm layers")
    return total


def tv_l2_loss(x: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """L2 total variation per segment: sum of the L2 norms of the 4 neighbour differences.

    Args:
        x: (B, C, H, W) augmented images.

    Returns:
        (S,) TV of each segment's images taken together.
    """
    diffs = (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )
    out = None
    for d in diffs:
        sq = segment_sum(d.square().flatten(1).sum(1), seg, num_segments)
        n = torch.sqrt(sq)
        out = n if out is None else out + n
    return out


def image_l2_loss(
    x: torch.Tensor, seg: torch.Tensor, num_segments: int, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over each segment's images of the per-image L2 norm: (S,)."""
    if counts is None:
        counts = segment_counts(seg, num_segments)
    norms = torch.linalg.vector_norm(x.flatten(1), dim=1)
    return segment_sum(norms, seg, num_segments) / counts.to(x.dtype)


def recover_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    x_aug: torch.Tensor,
    bn_inputs: Sequence[torch.Tensor],
    seg: torch.Tensor,
    num_segments: int,
    target_mean: Sequence[torch.Tensor],
    target_var: Sequence[torch.Tensor],
    weights: LossWeights,
    counts: torch.Tensor | None = None,
) -> SegmentLosses:
    """All terms of the recover objective, per segment (Eq. 6; Eq. 3 with global targets).

    Args:
        logits: (B, K) teacher outputs (eval mode: global running statistics).
        targets: (B,) class of each image.
        x_aug: (B, C, H, W) the augmented images the teacher saw (priors act on them).
        bn_inputs: per BN layer, its input (B, C_l, ...).
        seg: (B,) segment id per image.
        num_segments: S.
        target_mean, target_var: per BN layer, (S, C_l).
        weights: coefficients.
        counts: (S,) images per segment, ``segment_counts(seg, S)``; pass it from a loop (computing it
            here costs a device sync per call on a GPU).

    Returns:
        SegmentLosses with (S,) tensors.
    """
    if counts is None:
        counts = segment_counts(seg, num_segments)
    ce_i = F.cross_entropy(logits, targets, reduction="none")
    ce = segment_sum(ce_i, seg, num_segments) / counts.to(ce_i.dtype)
    lw = [float(weights.first_bn_multiplier)] + [1.0] * (len(bn_inputs) - 1)
    bn = bn_matching_loss(bn_inputs, seg, num_segments, target_mean, target_var, lw, counts)
    zero = torch.zeros_like(ce)
    tv = tv_l2_loss(x_aug, seg, num_segments) if weights.tv_l2 else zero
    l2 = image_l2_loss(x_aug, seg, num_segments, counts) if weights.l2 else zero
    total = ce + weights.alpha * bn + weights.tv_l2 * tv + weights.l2 * l2
    return SegmentLosses(total=total, ce=ce, bn=bn, tv=tv, l2=l2)
