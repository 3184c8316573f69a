"""FKD-style soft-label generation into a label store (SRe2L "relabel", LPLD label pruning at generation).

For every kept batch (``lpld.core.pruning``) of the student schedule: take the batch's images
in the epoch's seeded order, draw the augmentation from the batch seed, apply it, run the
teacher (eval mode) on the augmented batch, quantize (``lpld.core.quant``) and write the rows
into the preallocated store (``lpld.core.label_store``).

Exactness across ranks and resumes: everything about batch i is a pure function of
(store seed, epoch, batch) and the teacher, so rank r of W computes positions r, r + W, ...
into disjoint rows, and a resumed run recomputes only uncommitted batches; both give the
single-process bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from lpld.core import augment, quant
from lpld.core.label_store import StoreWriter

ENSEMBLE_MODES = ("mean_logits", "mean_probs")


class EnsembleTeacher(nn.Module):
    """Several teachers combined into one logit vector (G-VBSM-style multi-teacher labels).

    ``mean_logits``: the mean of the teachers' logits. ``mean_probs``: the log of the mean of their
    softmax probabilities (a valid logit vector whose softmax at T=1 is the mean distribution).

    ``rescale`` (G-VBSM ``generate_soft_label_with_db.py``, the default of ``relabel.ensemble_rescale``):
    before combining, each teacher's logit matrix of a stored batch, z_t (B, C), is scaled to the mean
    Frobenius norm of all teachers on that batch, z_t * mean_s ||z_s||_F / ||z_t||_F, so that no teacher
    dominates the average by the scale of its logits.
    """

    def __init__(self, models: Sequence[nn.Module], combine: str = "mean_logits", rescale: bool = False):
        super().__init__()
        if combine not in ENSEMBLE_MODES:
            raise ValueError(f"ensemble combine must be one of {ENSEMBLE_MODES}, got {combine!r}")
        if not models:
            raise ValueError("EnsembleTeacher needs at least one model")
        self.models = nn.ModuleList(models)
        self.combine = combine
        self.rescale = bool(rescale)

    def forward(self, x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, num_classes) float32.

        Args:
            x: one stored batch, or several concatenated.
            sizes: rows of each concatenated stored batch (the rescaling is per stored batch); None = one batch.
        """
        outs = torch.stack([m(x).float() for m in self.models])  # (T, B, C)
        if self.rescale:
            parts = []
            for o in outs.split(list(sizes) if sizes is not None else [outs.shape[1]], dim=1):
                norm = torch.linalg.vector_norm(o, dim=(1, 2), keepdim=True)  # (T, 1, 1) Frobenius norms
                parts.append(o / norm * norm.mean(0, keepdim=True))
            outs = torch.cat(parts, dim=1)
        if self.combine == "mean_logits":
            return outs.mean(0)
        return torch.logsumexp(torch.log_softmax(outs, dim=-1), dim=0) - float(np.log(len(self.models)))


@torch.no_grad()
def generate(
    path: str | os.PathLike,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    images_float: torch.Tensor,
    rank: int = 0,
    world: int = 1,
    chunk: int = 32,
    device: str | torch.device = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Compute this rank's uncommitted kept batches of a prepared store.

    Args:
        path: store directory made by ``label_store.prepare``.
        teacher: callable (B, C_in, S, S) -> (B, C) logits, in eval mode.
        images_float: (N, C_in, H, W) ``augment.to_model_input`` of the distilled images.
        rank, world: this process computes positions ``rank, rank + world, ...``.
        chunk: batches between commits (flush + progress file); an interruption loses at most this many.
        device: where augmentation and teacher run.
        on_batch: called with the store position after each batch (progress bars).

    Returns:
        the number of batches computed by this call.
    """
    if isinstance(teacher, nn.Module):
        teacher.eval()
    w = StoreWriter(path, rank)
    spec = w.spec
    if images_float.shape[0] != spec.num_images or tuple(images_float.shape[-2:]) != spec.image_hw:
        raise ValueError(
            f"images {tuple(images_float.shape)} do not match the store spec (N={spec.num_images}, hw={spec.image_hw})"
        )
    images = images_float.to(device)
    todo = [i for i in range(rank, len(w.batch_ids), world) if not w.done[i]]
    perms: dict[int, np.ndarray] = {}
    for n, i in enumerate(todo):
        e, b = (int(v) for v in w.batch_ids[i])
        if e not in perms:
            perms.clear()  # positions are sorted by epoch: keep only the current epoch's order
            perms[e] = augment.epoch_permutation(spec.seed, e, spec.num_images)
        size = int(w.offsets[i + 1] - w.offsets[i])
        idx = torch.from_numpy(perms[e][b * spec.batch_size : b * spec.batch_size + size].copy())
        rec = augment.draw(spec.aug, size, spec.image_hw, w.seed_of(i))
        x = augment.apply(images, idx, rec, spec.aug.out_size)
        logits = teacher(x)
        w.write(i, idx, rec, quant.encode(logits, spec.quant))
        if (n + 1) % chunk == 0:
            w.commit()
        if on_batch is not None:
            on_batch(i)
    w.close()
    return len(todo)
