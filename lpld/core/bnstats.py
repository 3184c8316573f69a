"""Class-wise BatchNorm statistics (LPLD "Module 1", Eq. 7).

For every BatchNorm layer l and class c we need the mean and (biased) variance, per channel,
of that layer's *input* over all images of class c. The official code keeps an EMA with
momentum 0.1 and loops over classes in Python per layer per batch; here:

* ``exact`` (default): one pass accumulates per-class count, sum and sum of squares in
  float64 with one segment sum (``index_put_(accumulate=True)``) per layer per batch (no loop over classes). To keep the
  sum-of-squares formula numerically safe the data are shifted by the layer's global
  running mean K (the "shifted data" algorithm): we accumulate sum(x - K) and
  sum((x - K)^2), which stay additive (so DDP ranks combine with a plain all-reduce SUM)
  while avoiding the cancellation of E[x^2] - E[x]^2 when |mean| >> std.
* ``official``: the official ``ClassAwareBatchNorm2d`` (LPLD ``recover/models/resnet_class.py``):
  running buffers initialised at mean 0 / var 1, and for each class c present in a batch
  ``run_c = (1 - m) * run_c + m * stat_c`` with m = 0.1 and stat_c the mean and *biased* variance
  over the batch's images of class c and all positions. The stage feeds it RandomResizedCrop +
  flip images in batches of 256, as the official forward pass.
* ``ema``: the same update with the unbiased batch variance (as PyTorch's BatchNorm updates
  running_var); lpld's earlier approximation of the official code, kept for ablation.

The model's own running statistics are never modified (the model runs in eval mode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lpld.core.bn_hooks import BNInputHooks
from lpld.core.io import ArtifactError

STATS_MODES = ("exact", "official", "ema")
EMA_MODES = ("official", "ema")  # order-dependent running updates


def per_sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-sample, per-channel mean and biased variance of a BN input.

    Computed from one sum and one L2 norm over the spatial positions (both single fast
    reductions; ``torch.var_mean`` is ~4x slower on CPU), combined in float64. The only
    float32 step is each sample's own reduction (relative error ~1e-7), so the variance keeps
    ~1e-7 * (1 + mean^2 / var) relative accuracy, ample for BN matching.

    Args:
        x: (B, C, *spatial) or (B, C) activations.

    Returns:
        mean: (B, C) float64, var: (B, C) float64 (biased, over positions), n: positions per sample.
    """
    if x.dim() == 2:
        return x.double(), torch.zeros_like(x, dtype=torch.float64), 1
    dims = tuple(range(2, x.dim()))
    n = 1
    for d in dims:
        n *= x.shape[d]
    s = x.sum(dim=dims, dtype=torch.float32).double()
    q = torch.linalg.vector_norm(x, dim=dims).double().square()
    mean = s / n
    var = (q / n - mean * mean).clamp_min(0)
    return mean, var, n


class ClasswiseBNStats:
    """Accumulates class-wise BN-input statistics of ``model`` over labelled batches.

    Args:
        model: any nn.Module with BatchNorm layers (put in eval mode by ``update``).
        num_classes: C.
        mode: ``exact``, ``official`` or ``ema`` (see module docstring).
        momentum: EMA momentum (``official`` / ``ema`` modes), 0.1 as in the official code.

    Accumulators (per BN layer l with ch_l channels), float64:
        count (C,): images seen per class, s1 (C, ch_l) = sum over images and positions of (x - K_l),
        s2 (C, ch_l) = sum of (x - K_l)^2, where K_l is the layer's global running mean.
    """

    def __init__(self, model: nn.Module, num_classes: int, mode: str = "exact", momentum: float = 0.1):
        if mode not in STATS_MODES:
            raise ValueError(f"unknown stats mode '{mode}'; choose one of {STATS_MODES}")
        self.model = model
        self.num_classes = int(num_classes)
        self.mode = mode
        self.momentum = float(momentum)
        self._hooks = BNInputHooks(model, on_input=self._on_input)
        self.layer_names = self._hooks.names
        bns = [m for _, m in self._hooks.layers]
        dev = next(model.parameters()).device
        self.shift = [self._shift_of(m, dev) for m in bns]
        C = self.num_classes
        self.count = torch.zeros(C, dtype=torch.float64, device=dev)
        self.s1 = [torch.zeros(C, k.numel(), dtype=torch.float64, device=dev) for k in self.shift]
        self.s2 = [torch.zeros(C, k.numel(), dtype=torch.float64, device=dev) for k in self.shift]
        # spatial positions per image for each layer (known after the first batch)
        self.positions = [0] * len(bns)
        if mode in EMA_MODES:
            self.run_mean = [torch.zeros(C, k.numel(), dtype=torch.float64, device=dev) for k in self.shift]
            self.run_var = [torch.ones(C, k.numel(), dtype=torch.float64, device=dev) for k in self.shift]
        self._y: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None  # rows of the current batch that count (None: all)
        # Optional cross-process reduction applied to per-batch sums in EMA mode (DDP: the EMA
        # then sees the global batch, as SyncBatchNorm would). Set by the Lightning glue.
        self.batch_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    @staticmethod
    def _shift_of(bn: nn.Module, dev: torch.device) -> torch.Tensor:
        rm = getattr(bn, "running_mean", None)
        if rm is None:  # track_running_stats=False: no global mean to shift by
            return torch.zeros(bn.num_features, dtype=torch.float32, device=dev)
        return rm.detach().clone().float()

    def _on_input(self, i: int, x: torch.Tensor) -> None:
        y = self._y
        assert y is not None
        x = x.detach()
        mean, var, n = per_sample_moments(x.float())
        self.positions[i] = n
        d = mean - self.shift[i].double()  # (B, ch) per-sample mean minus the shift
        if self._valid is not None:  # padding rows went through the model but count nowhere
            d, var = d[self._valid], var[self._valid]
        b1 = d * n  # per-sample sum of (x - K)
        b2 = (var + d * d) * n  # per-sample sum of (x - K)^2
        if self.mode == "exact":
            # index_put_(accumulate=True) rather than index_add_: same segment sum, but
            # index_add_ on float64 CPU tensors is ~1000x slower in torch 2.14 (measured).
            self.s1[i].index_put_((y,), b1, accumulate=True)
            self.s2[i].index_put_((y,), b2, accumulate=True)
            return
        # EMA: class batch moments, then the running update for classes present in the batch.
        C = self.num_classes
        ones = torch.ones_like(y, dtype=torch.float64)
        cnt = torch.zeros(C, dtype=torch.float64, device=x.device).index_put_((y,), ones, accumulate=True)
        t1 = torch.zeros(C, d.shape[1], dtype=torch.float64, device=x.device).index_put_((y,), b1, accumulate=True)
        t2 = torch.zeros_like(t1).index_put_((y,), b2, accumulate=True)
        if self.batch_reduce is not None:
            packed = self.batch_reduce(torch.cat([cnt[:, None], t1, t2], dim=1))
            cnt, t1, t2 = packed[:, 0], packed[:, 1 : 1 + d.shape[1]], packed[:, 1 + d.shape[1] :]
        N = (cnt * n)[:, None]
        present = cnt > 0
        safe = N.clamp_min(1)
        m_shift = t1 / safe
        bvar = (t2 / safe - m_shift * m_shift).clamp_min(0)
        # official: biased variance (ClassAwareBatchNorm2d's var(unbiased=False)); ema: unbiased
        bstat = bvar if self.mode == "official" else bvar * N / (N - 1).clamp_min(1)
        bmean = m_shift + self.shift[i].double()
        m = self.momentum
        self.run_mean[i][present] = (1 - m) * self.run_mean[i][present] + m * bmean[present]
        self.run_var[i][present] = (1 - m) * self.run_var[i][present] + m * bstat[present]

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """One eval-mode forward of ``x`` (B, ...) with labels ``y`` (B,); returns the logits.

        Args:
            x: (B, ...) images.
            y: (B,) labels.
            valid: (B,) bool, the rows that count (None: all). A DDP rank whose share of the last global batch
                is empty forwards a padding row (``valid`` all False) so that it still joins every
                ``batch_reduce`` of that batch; the model is in eval mode, so rows do not interact.
        """
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got range [{int(y.min())}, {int(y.max())}]")
        self.model.eval()
        y = y.to(self.count.device).long()
        if valid is not None:
            valid = valid.to(self.count.device).bool()
            self._valid = None if bool(valid.all()) else valid
            y = y[valid]
        self._y = y
        self.count.index_put_((y,), torch.ones_like(y, dtype=torch.float64), accumulate=True)
        try:
            with self._hooks:
                out = self.model(x)
        finally:
            self._y, self._valid = None, None
        return out

    def to_private(self, device: torch.device | str) -> None:
        """Move every accumulator to ``device`` as a private copy (a clone, even when already there).

        Under ``ddp_spawn`` the accumulators are pickled through torch.multiprocessing, which puts CPU
        tensors in shared memory: without the clone every rank would add into the same buffers.
        """
        self.count = self.count.to(device).clone()
        self.s1 = [t.to(device).clone() for t in self.s1]
        self.s2 = [t.to(device).clone() for t in self.s2]
        self.shift = [t.to(device).clone() for t in self.shift]
        if self.mode in EMA_MODES:
            self.run_mean = [t.to(device).clone() for t in self.run_mean]
            self.run_var = [t.to(device).clone() for t in self.run_var]

    def sums(self) -> list[torch.Tensor]:
        """The additive accumulators, in a fixed order (for an all-reduce SUM across ranks)."""
        return [self.count, *self.s1, *self.s2]

    def load_sums(self, tensors: Sequence[torch.Tensor]) -> None:
        L = len(self.s1)
        self.count = tensors[0]
        self.s1 = list(tensors[1 : 1 + L])
        self.s2 = list(tensors[1 + L : 1 + 2 * L])

    def finalize(self) -> dict[str, Any]:
        """Per-layer class-wise mean/var (float32, NaN for unseen classes) and counts.

        Returns:
            dict with "layers", "mean" list[(C, ch_l)], "var" list[(C, ch_l)], "count" (C,) int64,
            "missing" list[int] of class indices never seen, "mode".
        """
        count = self.count.round().long().cpu()
        missing = torch.nonzero(count == 0).flatten().tolist()
        means, vars_ = [], []
        for i in range(len(self.s1)):
            if self.mode in EMA_MODES:
                mu, var = self.run_mean[i], self.run_var[i]
            else:
                N = (self.count * self.positions[i])[:, None].clamp_min(1)
                d = self.s1[i] / N
                var = (self.s2[i] / N - d * d).clamp_min(0)
                mu = d + self.shift[i].double()
            mu, var = mu.float().cpu().clone(), var.float().cpu().clone()
            mu[count == 0] = float("nan")
            var[count == 0] = float("nan")
            means.append(mu)
            vars_.append(var)
        return {
            "layers": list(self.layer_names),
            "mean": means,
            "var": vars_,
            "count": count,
            "missing": missing,
            "mode": self.mode,
        }


def load_classwise_stats(
    path: str | Path, expect_teacher_fingerprint: str | None = None, allow_other_teacher: bool = False
) -> dict[str, Any]:
    """Load a stats artifact written by ``stage=stats`` and check it belongs to the teacher.

    Raises:
        ArtifactError: missing/corrupt file, or stats made for another teacher.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(
            f"class-wise BN statistics not found at {path}; run `python run.py stage=stats` "
            "with the same dataset/model first"
        )
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise ArtifactError(f"{path} is corrupt ({e}); delete it and rerun `stage=stats`") from e
    for k in ("layers", "mean", "var", "count", "teacher_fingerprint"):
        if k not in stats:
            raise ArtifactError(f"{path} lacks '{k}'; it is not a stats artifact. Rerun `stage=stats`")
    check_global_batch(stats, path)
    fp = stats["teacher_fingerprint"]
    if expect_teacher_fingerprint is not None and fp != expect_teacher_fingerprint and not allow_other_teacher:
        raise ArtifactError(
            f"stats at {path} were made for teacher {fp}, but the current teacher is {expect_teacher_fingerprint}. "
            "Rerun `python run.py stage=stats stage.overwrite=true` for this teacher, or set "
            "recover.allow_other_teacher=true to use them anyway"
        )
    return stats


def check_global_batch(stats: dict[str, Any], path: str | Path) -> None:
    """Refuse EMA statistics (``official`` / ``ema``) written before the global-batch fix (issue 20).

    Before it, a pass on W processes updated each rank's EMA with that rank's rows alone (batch / W images per
    update, W times as many updates) and saved rank 0's counts; such a file has the same name as a correct one
    and lacks ``global_batch``. A one-process file of that time is correct but cannot be told apart, so every
    EMA file without the field is refused. Exact-mode files are unaffected (their sums were always reduced).

    Raises:
        ArtifactError: naming the fix, ``stage=stats stage.overwrite=true``.
    """
    mode = stats.get("mode")
    if mode in EMA_MODES and "global_batch" not in stats:
        raise ArtifactError(
            f"{path} holds {mode}-mode class-wise BN statistics written before the global-batch fix (no "
            "'global_batch' in the file): on several processes their EMA saw one rank's rows per update; rerun "
            "`python run.py stage=stats stage.overwrite=true` with the same dataset/model overrides to recompute them"
        )
