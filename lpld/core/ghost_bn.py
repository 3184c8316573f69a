"""Ghost (grouped) BatchNorm: the student's BatchNorm statistics over a fixed number of rows, whatever the world size.

A BatchNorm layer in training normalises with the mean and variance of the rows it sees in one forward. Under
``nn.DataParallel`` (the official ImageNet students: 4 replicas, ``train_FKD_label_pruning_batch.py``) each
replica sees ``batch / 4`` rows; under DDP each rank sees ``batch / W``. So the BN statistics, and the student's
accuracy, depend on how many devices ran it. :func:`convert_ghost_bn` fixes the group instead: in training, a
forward of ``n`` rows is cut into ``groups`` contiguous pieces of ``ceil(n / groups)`` rows (the last may be
shorter, as ``torch.chunk``, DataParallel's scatter and ``lpld.lit.student_module.rank_rows`` cut a batch) and
each piece is normalised with its own batch statistics. One process with ``groups = G`` then computes the same
outputs and gradients as ``G`` replicas / ranks with plain BatchNorm (DDP averages the ranks' gradients; the
per-rank losses are weighted so their mean is the whole-batch loss).

Running statistics (what evaluation uses). ``nn.DataParallel`` re-replicates the module every forward; only the
replica on ``device_ids[0]`` shares its buffers with the wrapped module (``replicate`` broadcasts the buffers and
the broadcast's source copy *is* the original tensor), so the running mean / variance / ``num_batches_tracked``
written by replica 0 survive and the other replicas' updates are discarded (torch's DataParallel docs: "in-place
updates to the parameters or buffers on device[0] will be recorded"). DDP with ``broadcast_buffers=True`` (its
default, and Lightning's) does the same: rank 0's buffers overwrite every rank's before each forward. Hence the
default rule ``running="first"``: the running statistics take one momentum update from the *first* group's
statistics (biased mean, unbiased variance, exactly as a plain BatchNorm layer on that group), and
``num_batches_tracked`` grows by one per forward. The alternative ``running="mean"`` averages what every group
would have written: ``r <- (1 - m) r + m * mean_g(s_g)`` with s_g each group's mean / unbiased variance.

Groups larger than one rank's rows (in1k's 32 rows on 8 devices of 16): :func:`convert_cross_rank_bn` makes each
group span ``bn_rows / rows`` consecutive ranks (consecutive rows of the stored batch), whose per-channel sums and
centred squares are all-reduced with ``torch.distributed.nn.functional.all_reduce`` (autograd-aware: the backward
all-reduces the gradients of the statistics, so each rank's input gradient is the one-process group's). Plain
PyTorch collectives, so it runs under gloo (CPU tests) and NCCL alike; each group's running statistics take that
group's update and DDP's broadcast keeps rank 0's, the first group's, as above.

Evaluation (``module.eval()``), or ``groups = 1``: the plain BatchNorm forward, unchanged. The converted layers
keep the parameters, buffers and ``state_dict`` keys of the original ones (a checkpoint loads into a plain model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lpld.core.errors import ConfigError

RUNNING_RULES = ("first", "mean")  # whose statistics update the running buffers (module doc)


class _GhostMixin:
    """The grouped training forward, mixed into ``nn.BatchNorm{1,2,3}d`` (their input checks and eval forward)."""

    groups: int = 1
    running: str = "first"
    # rows of group g: contiguous pieces (False: DataParallel's scatter, the student's rank_rows) or every
    # groups-th row from g (True: squeeze's EpochShardSampler deals the epoch order to ranks round-robin)
    interleave: bool = False

    def _momentum_factor(self) -> float:
        """The running-update weight of this training forward, counting it in ``num_batches_tracked`` (as
        ``nn.BatchNorm``: ``momentum``, or the cumulative 1 / count when momentum is None)."""
        factor = 0.0 if self.momentum is None else float(self.momentum)
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, ...) -> (N, C, ...); training: each of the ``groups`` row pieces normalised on its own."""
        if not self.training or self.groups <= 1:
            return super().forward(x)  # type: ignore[misc]
        self._check_input_dim(x)  # type: ignore[attr-defined]
        perm = None
        if self.interleave:  # group g = rows g, g + G, g + 2G, ...: gather each group contiguous, scatter back after
            n = x.shape[0]
            if n % self.groups:
                raise ConfigError(f"interleaved ghost BatchNorm: {n} rows do not split into {self.groups} groups")
            perm = torch.arange(n, device=x.device).view(n // self.groups, self.groups).t().reshape(-1)
            x = x.index_select(0, perm)
        size = -(-x.shape[0] // self.groups)
        pieces = x.split(size)
        tracked = self.track_running_stats and self.running_mean is not None
        factor = self._momentum_factor() if tracked else 0.0
        w, b, eps = self.weight, self.bias, self.eps
        first = self.running == "first" and tracked
        out = [
            F.batch_norm(
                p,
                self.running_mean if first and i == 0 else None,  # the first group's update survives (module doc)
                self.running_var if first and i == 0 else None,
                w,
                b,
                True,
                factor if first and i == 0 else 0.0,
                eps,
            )
            for i, p in enumerate(pieces)
        ]
        if tracked and self.running == "mean":
            self._mean_update(pieces, factor)
        y = torch.cat(out)
        if perm is not None:
            y = torch.empty_like(y).index_copy(0, perm, y)
        return y

    @torch.no_grad()
    def _mean_update(self, pieces: tuple[torch.Tensor, ...], factor: float) -> None:
        """``running="mean"``: r <- (1 - m) r + m * mean over groups of (group mean | group unbiased variance)."""
        dims = [0, *range(2, pieces[0].dim())]
        means, vars_ = [], []
        for p in pieces:  # in float32 at least (a bf16 / fp16 activation), float64 stays float64
            v, m = torch.var_mean(p.to(torch.promote_types(p.dtype, torch.float32)), dim=dims, correction=1)
            means.append(m)
            vars_.append(v)
        rm, rv = self.running_mean, self.running_var
        rm.mul_(1.0 - factor).add_(torch.stack(means).mean(0).to(rm.dtype), alpha=factor)
        rv.mul_(1.0 - factor).add_(torch.stack(vars_).mean(0).to(rv.dtype), alpha=factor)

    def extra_repr(self) -> str:
        inter = ", interleave=True" if self.interleave else ""
        return f"{super().extra_repr()}, groups={self.groups}, running={self.running}{inter}"  # type: ignore[misc]


class GhostBatchNorm1d(_GhostMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training forward normalises ``groups`` row pieces separately."""


class GhostBatchNorm2d(_GhostMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training forward normalises ``groups`` row pieces separately."""


class GhostBatchNorm3d(_GhostMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose training forward normalises ``groups`` row pieces separately."""


_GHOST = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d, nn.BatchNorm3d: GhostBatchNorm3d}


def ghost_groups(bn_rows: int, rows: int, key: str = "student.bn_rows") -> int:
    """Groups per forward when each BatchNorm group holds ``bn_rows`` of the ``rows`` one forward has.

    Raises:
        ConfigError: ``bn_rows`` does not divide ``rows`` or exceeds them (the config layer refuses a world size that
            fits neither this nor :func:`ranks_per_group` before a run: ``lpld.config.student.bn_layout``).
    """
    if bn_rows < 1 or rows < bn_rows or rows % bn_rows:
        raise ConfigError(
            f"{key}={bn_rows} does not divide the {rows} rows of one rank's forward at this world size; choose a "
            f"world size whose per-rank rows {key} divides, or set {key}=0"
        )
    return rows // bn_rows


def _plain_bn_layers(model: nn.Module, key: str) -> list[str]:
    """Names of the BatchNorm layers of ``model`` (exact ``nn.BatchNorm{1,2,3}d``), refusing other BatchNorm kinds.

    A subclass (timm's ``BatchNormAct2d`` fuses its activation into ``forward``) or a SyncBatchNorm would lose its
    own forward in a conversion.
    """
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if type(m) not in _GHOST:
                raise ConfigError(
                    f"{key} regroups plain BatchNorm layers, but the student's {name or 'model'} is a "
                    f"{type(m).__name__}; use a student architecture with nn.BatchNorm layers or set {key} off"
                )
            names.append(name)
    return names


def _sharing(old: nn.Module, kinds: dict[type, type]) -> nn.Module:
    """A ``kinds[type(old)]`` layer holding ``old``'s very parameter and buffer tensors, in ``old``'s train mode."""
    new = kinds[type(old)](old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats, device="meta")
    new.weight, new.bias = old.weight, old.bias
    for buf in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, buf, getattr(old, buf))
    new.train(old.training)
    return new


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def convert_ghost_bn(
    model: nn.Module, groups: int, running: str = "first", key: str = "student.bn_rows", interleave: bool = False
) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` by its ghost version with ``groups`` groups per training forward.

    The new layers hold the *same* parameter and buffer tensors (an optimizer built before keeps working, the
    ``state_dict`` is unchanged). ``groups = 1`` returns ``model`` untouched.

    Args:
        model: the student (converted in place; the return value matters only when ``model`` is itself a BN layer).
        groups: row groups per training forward (rows per forward / BN rows per group).
        running: whose statistics update the running buffers: ``first`` (DataParallel / DDP) | ``mean``.
        key: the config key named in errors.
        interleave: group g holds rows g, g + groups, ... (a round-robin shard of the rows over ranks) instead of
            the g-th contiguous piece.

    Raises:
        ConfigError: an unknown ``running`` rule, ``groups < 1``, or a BatchNorm layer that is not plain.
    """
    if running not in RUNNING_RULES:
        raise ConfigError(f"unknown {key.rsplit('.', 1)[0]}.bn_running={running!r}; valid: {', '.join(RUNNING_RULES)}")
    if groups < 1:
        raise ConfigError(f"{key} needs at least one group per forward, got {groups}")
    names = _plain_bn_layers(model, key)
    if groups == 1:
        return model
    for name in names:
        new = _sharing(model.get_submodule(name) if name else model, _GHOST)
        new.groups, new.running, new.interleave = int(groups), str(running), bool(interleave)
        model = _swap(model, name, new)
    return model


class _CrossRankMixin(_GhostMixin):
    """A BatchNorm group spanning the ranks of ``process_group`` (each holding its rows of the group): statistics
    all-reduced over the group with autograd-aware collectives, so the gradient is the one-process group's."""

    process_group: object = None
    world_group: object = None  # running="mean": the groups' statistics are averaged over every rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, ...) this rank's rows of one group -> normalised with the whole group's batch statistics."""
        if not self.training:
            return nn.modules.batchnorm._BatchNorm.forward(self, x)  # type: ignore[arg-type]
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)  # type: ignore[attr-defined]
        dims = [0, *range(2, x.dim())]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=xf.dtype, device=x.device)
        # two passes (mean, then the centred squares) as F.batch_norm: no E[x^2] - E[x]^2 cancellation
        tot = all_reduce(torch.cat([xf.sum(dims), count]), group=self.process_group)
        n = tot[-1]
        mean = tot[:-1] / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims), group=self.process_group) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            self._running_update(mean.detach(), var.detach() * n.detach() / (n.detach() - 1))
        return y.to(x.dtype)

    @torch.no_grad()
    def _running_update(self, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
        factor = self._momentum_factor()
        if self.running == "mean" and self.world_group is not None:
            import torch.distributed as dist

            both = torch.stack([mean, var_unbiased])  # every rank of a group holds its group's values: the mean over
            dist.all_reduce(both, group=self.world_group)  # all ranks is the mean over the (equal-sized) groups
            mean, var_unbiased = both / dist.get_world_size(self.world_group)
        rm, rv = self.running_mean, self.running_var
        rm.mul_(1.0 - factor).add_(mean.to(rm.dtype), alpha=factor)
        rv.mul_(1.0 - factor).add_(var_unbiased.to(rv.dtype), alpha=factor)


class CrossRankBatchNorm1d(_CrossRankMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` normalising one group spread over the ranks of ``process_group``."""


class CrossRankBatchNorm2d(_CrossRankMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` normalising one group spread over the ranks of ``process_group``."""


class CrossRankBatchNorm3d(_CrossRankMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` normalising one group spread over the ranks of ``process_group``."""


_CROSS = {
    nn.BatchNorm1d: CrossRankBatchNorm1d,
    nn.BatchNorm2d: CrossRankBatchNorm2d,
    nn.BatchNorm3d: CrossRankBatchNorm3d,
}


def ranks_per_group(bn_rows: int, rows: int, world: int, key: str = "student.bn_rows") -> int:
    """Ranks one BatchNorm group spans when ``bn_rows`` exceeds the ``rows`` of one rank's forward.

    Raises:
        ConfigError: ``rows`` does not divide ``bn_rows``, or the span does not divide ``world``.
    """
    span = bn_rows // rows if rows > 0 else 0
    if rows < 1 or bn_rows % rows or span < 1 or world % span:
        raise ConfigError(
            f"{key}={bn_rows} is not a whole number of ranks' rows ({rows} per rank, world size {world}); choose a "
            f"world size whose per-rank rows divide {key}, or set {key}=0"
        )
    return span


def convert_cross_rank_bn(
    model: nn.Module, span: int, running: str = "first", key: str = "student.bn_rows"
) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` by a group spanning ``span`` consecutive ranks (ranks 0..span-1,
    span..2 span-1, ...: the contiguous rows ``rank_rows`` gives them), for a ``bn_rows`` larger than one rank's rows.

    Needs an initialised default process group (called on every rank: the subgroups are created collectively).
    Running statistics: ``first`` = each group's own update (DDP's buffer broadcast keeps rank 0's, the first
    group's); ``mean`` = the mean of the groups' updates (one more all-reduce over every rank).
    """
    import torch.distributed as dist

    if running not in RUNNING_RULES:
        raise ConfigError(f"unknown {key.rsplit('.', 1)[0]}.bn_running={running!r}; valid: {', '.join(RUNNING_RULES)}")
    names = _plain_bn_layers(model, key)
    group, _ = dist.new_subgroups(group_size=int(span))
    for name in names:
        new = _sharing(model.get_submodule(name) if name else model, _CROSS)
        new.running, new.process_group, new.world_group = str(running), group, dist.group.WORLD
        model = _swap(model, name, new)
    return model


def convert_sync_bn(model: nn.Module, process_group: object = None, key: str = "student.sync_bn") -> nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` over the plain BatchNorm layers of ``model`` (statistics
    over every rank's rows of the process group), refusing BatchNorm subclasses it would strip of their forward."""
    _plain_bn_layers(model, key)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
