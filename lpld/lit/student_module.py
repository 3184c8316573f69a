"""StudentModule: train a fresh registry model on distilled images against stored soft labels.

One training item is one stored batch (served once per gradient-accumulation slice): the
DataLoader runs with ``batch_size=None`` over ``label_store.StoredBatchDataset`` whose item i is
the i-th stored batch of this epoch's plan (``lpld.core.label_pool.epoch_plan``).
``training_step`` rebuilds on the device exactly the augmented tensor the teacher labelled
(``lpld.core.augment.apply`` on the distilled images, which live on the device as uint8),
decodes the stored labels at this epoch's teacher temperature (DKR,
``lpld.core.temperature.dkr_temperature``; ``lpld.core.quant.decode``) and applies the loss of
``lpld.core.kd_loss``. Calibrated Alignment re-searches the student temperature on the epoch's
last stored batch (all its rows: loss sums and row counts summed over DDP ranks, so any world size picks the
one-process temperature).

Gradient accumulation (``accumulate > 1``) splits every stored batch into that many slices, one
training step each, and lets Lightning step the optimizer once per stored batch: the summed
slice losses are weighted by slice size, so the gradient equals the whole-batch gradient
(up to BatchNorm statistics, which are per slice, as in the public code).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lpld.core import augment, kd_loss, quant
from lpld.core.label_pool import epoch_plan
from lpld.core.temperature import CA_MODES, SCHEDULES, ca_grid, ca_losses, dkr_temperature
from lpld.lit.optim import DECAYS, LRSchedule, build_optimizer, step_scheduler
from lpld.lit.spawn_images import ReloadableImages


class StudentData(L.LightningDataModule):
    """Train loader = this epoch's plan of stored batches (rebuilt every epoch); val loader = real val set.

    The train DataLoader has ``batch_size=None`` over ``label_store.StoredBatchDataset`` (item = one
    StoredBatch, replayed on the device by the module). The plan depends only on (seed, epoch), so a
    resumed run replays the same batches. Under DDP every rank serves the *whole* plan and
    ``StudentModule.training_step`` takes this rank's share of each stored batch's rows, so one
    optimizer step consumes exactly one stored batch at any world size (global batch = the recipe's
    batch; the trainer must run with ``use_distributed_sampler=False`` and
    ``reload_dataloaders_every_n_epochs=1``).

    Args:
        store: an open LabelStore.
        pool: (P,) store rows forming the label pool.
        batches_per_epoch: stored batches per student epoch.
        granularity: ``epoch`` or ``batch`` (``lpld.core.label_pool.epoch_plan``).
        seed: run seed.
        accumulate: slices per stored batch (each stored batch is served ``accumulate`` times in a row).
        val_dataset: the real validation set (items (image, label)), or None.
        val_batch_size: validation batch size.
        num_workers: DataLoader workers of the train loader (stored-batch reads).
        val_num_workers: DataLoader workers of the val loader (image decoding); None = ``num_workers``.
    """

    def __init__(
        self,
        store: Any,
        pool: np.ndarray,
        batches_per_epoch: int,
        granularity: str,
        seed: int,
        accumulate: int = 1,
        val_dataset: Any = None,
        val_batch_size: int = 256,
        num_workers: int = 0,
        val_num_workers: int | None = None,
        draw: str = "with_replacement",
        swap_last: bool = True,
    ):
        super().__init__()
        self.draw, self.swap_last = draw, bool(swap_last)  # issue 20: label_pool.epoch_plan's draw / last-batch swap
        self.store, self.pool = store, np.asarray(pool, dtype=np.int64)
        self.batches_per_epoch, self.granularity, self.seed = int(batches_per_epoch), granularity, int(seed)
        self.accumulate, self.val_dataset = int(accumulate), val_dataset
        self.val_batch_size, self.num_workers = int(val_batch_size), int(num_workers)
        self.val_num_workers = int(num_workers if val_num_workers is None else val_num_workers)
        self.batch_ids = store.batch_ids

    def plan(self, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Store rows served in ``epoch`` (the same on every rank), each repeated ``accumulate`` times.

        ``rank`` / ``world_size`` do not change the plan: ranks split rows, not batches.
        """
        full = epoch_plan(
            self.pool,
            self.batch_ids,
            self.batches_per_epoch,
            epoch,
            self.granularity,
            self.seed,
            self.draw,
            self.swap_last,
        )
        return np.repeat(full, self.accumulate)

    def train_dataloader(self) -> DataLoader:
        from lpld.core.label_store import StoredBatchDataset

        t = self.trainer
        epoch = t.current_epoch if t is not None else 0
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        ds = StoredBatchDataset(self.store, None, self.plan(epoch, rank, world))
        return DataLoader(
            ds, batch_size=None, shuffle=False, num_workers=self.num_workers, collate_fn=_identity, pin_memory=False
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            return []  # type: ignore[return-value]
        from lpld.lit.sharding import ShardSampler

        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        sampler = ShardSampler(len(self.val_dataset), rank, world)
        return DataLoader(
            self.val_dataset, batch_size=self.val_batch_size, sampler=sampler, num_workers=self.val_num_workers
        )


def _identity(x: Any) -> Any:
    return x


def move_to(obj: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) dataclass / dict / list to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: move_to(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def rank_rows(b: int, chunk: int, accumulate: int, rank: int, world: int) -> slice:
    """Rows of a stored batch of ``b`` rows trained by ``rank`` in accumulation slice ``chunk``.

    The batch is cut into ``accumulate x world`` contiguous pieces of ceil(b / (k W)) rows; piece
    ``chunk * W + rank`` is this rank's (the last pieces of a short batch may be empty). Over all ranks and
    slices every row is trained exactly once per stored batch.
    """
    size = -(-b // (accumulate * world))
    p = chunk * world + rank
    return slice(min(b, p * size), min(b, (p + 1) * size))


def cutmix_share(aug: Any, out_size: int) -> float | None:
    """Area share of the base image after CutMix (1 - clipped box area / S^2), None without CutMix.

    The stored lambda is the Beta draw; the pasted area follows the clipped box, so the label mix
    uses the box (as SRe2L-family code does after clipping).
    """
    if getattr(aug, "mix", "none") != "cutmix" or getattr(aug, "box", None) is None:
        return None
    y1, x1, y2, x2 = (int(v) for v in aug.box.tolist())
    return 1.0 - (y2 - y1) * (x2 - x1) / float(out_size * out_size)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: weight decay on weight matrices / conv kernels only.

    As the official students (LPLD/SRe2L ``utils.get_parameters``): a parameter is decayed when its name
    contains ``weight`` and it has more than one dimension; BatchNorm/LayerNorm scales and every bias get
    ``weight_decay=0``. ``student.wd_exclude_bn_bias=false`` decays every parameter (lpld's old choice).

    Returns:
        ``[{"params": decayed}, {"params": others, "weight_decay": 0.0}]`` (empty groups dropped).
    """
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if "weight" in name and p.dim() > 1 else rest).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class StudentModule(ReloadableImages, L.LightningModule):
    """Student training on a label store.

    Args:
        model_cfg: student model config (plain dict, ``lpld.models.build_model``).
        num_classes, in_chans, img_size: dataset spec (img_size = the store's augmentation output side).
        quant_mode: the store's label format (none | mr | ms | hard); ``quant_gen_temperature`` its T_g (ms).
        loss: {"name": kl | mse_gt | ce, "gamma": float (mse_gt), "t2": bool (KL x T^2), "mse_target": logits |
            probs (mse_gt), "smoothing_space": probs | logits (where label smoothing acts)}.
        temp: DKR {"t0", "schedule", "step_size", "gamma", "floor", "t_min", "epoch_base"}.
        ca: {"mode": none | fixed | search, "value": float (fixed / search start), "lo", "hi", "n"}.
        optim: {"name": adamw | sgd | adam, "lr", "weight_decay", "momentum", "warmup_epochs",
            "warmup_start", "scheduler": cosine | constant, "wd_exclude_bn_bias": bool (default true)}.
        epochs: student epochs E (schedules and DKR).
        steps_per_epoch: optimizer steps per epoch (for the per-step learning-rate schedule).
        label_smoothing: smoothing of the soft target (kl, mse) or of the hard labels (ce, GT term).
        accumulate: gradient-accumulation slices per stored batch.
        ema_decay: > 0 keeps an EMA copy of the weights, used for validation.
        mean, std: normalization of the distilled images (``augment.to_model_input``).
        label_schedule: {"name": none | hald | ..., "hard_epochs", "smoothing"}: the epochs that train on the images'
            own classes (``lpld.core.label_schedule``; cross-entropy, CutMix-mixed, smoothed by "smoothing"); None:
            every epoch on the labels.
        teacher: ``student.labels=online``: a frozen teacher whose fp32 logits on each replayed batch are its
            labels (decoded like a ``quant=none`` store; ``lpld.core.online_labels``); None reads the store's.
        bn: the student's BatchNorm grouping, applied in ``setup`` once the world size is known
            (``lpld.core.ghost_bn``): {"rows": rows per group (0: each rank's forward), "running": first | mean,
            "sync": SyncBatchNorm over the ranks, "batch": the stored batch}; None: plain BatchNorm.

    With an image source (``set_image_source``) the images stay out of the module's pickle (ddp_spawn ranks load
    them from the folder: ``lpld.lit.spawn_images``).
    """

    image_attrs = ("images_u8", "image_labels")

    def __init__(
        self,
        model_cfg: dict[str, Any],
        num_classes: int,
        in_chans: int,
        img_size: int,
        quant_mode: str,
        loss: dict[str, Any],
        temp: dict[str, Any],
        ca: dict[str, Any],
        optim: dict[str, Any],
        epochs: int,
        steps_per_epoch: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        quant_gen_temperature: float | None = None,
        label_smoothing: float = 0.0,
        accumulate: int = 1,
        ema_decay: float = 0.0,
        teacher: torch.nn.Module | None = None,
        label_schedule: dict[str, Any] | None = None,
        bn: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["teacher"])
        from lpld.models import build_model

        kd_loss.get_student_loss(loss["name"])  # an unknown name fails here, naming the valid losses
        from lpld.core.label_schedule import get_label_schedule

        get_label_schedule(str((label_schedule or {}).get("name", "none")))  # likewise
        if temp["schedule"] not in SCHEDULES:
            raise ValueError(f"unknown temperature schedule '{temp['schedule']}'; valid: {', '.join(SCHEDULES)}")
        if ca["mode"] not in CA_MODES:
            raise ValueError(f"unknown calibrated-alignment mode '{ca['mode']}'; valid: {', '.join(CA_MODES)}")
        quant.get_label_codec(quant_mode)  # an unknown format fails here, naming the valid ones
        self.model = build_model(model_cfg, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        self.ema = None
        if ema_decay > 0:
            self.ema = copy.deepcopy(self.model)
            for p in self.ema.parameters():
                p.requires_grad_(False)
        k5 = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=k5, average="micro")
        # distilled images (uint8) and their classes; set by set_images, never checkpointed. Plain attributes,
        # not buffers: DDP re-broadcasts every buffer from rank 0 before each forward (the whole image set
        # per step, ~7.5 GB at in1k IPC 50). Every rank loads the same files; `_place_data` moves them to
        # the device once per fit/validate.
        self.images_u8 = torch.zeros(0, in_chans, 1, 1, dtype=torch.uint8)
        self.image_labels = torch.zeros(0, dtype=torch.long)
        # CA state (checkpointed through on_save_checkpoint)
        self.student_temperature = float(ca.get("value") or 1.0)
        self.last_val: dict[str, float] = {}
        self._ca_rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # this rank's (logits, target) of the last batch
        self._epoch_rows, self._epoch_steps = 0, 0  # this rank's rows / optimizer steps in the current epoch
        # student.labels=online (lpld.core.online_labels): the frozen teacher labels each replayed batch. Held in a
        # tuple, not as a submodule: never trained, checkpointed, put in train mode or broadcast by DDP
        self._online_teacher: tuple[torch.nn.Module, ...] = ()
        if teacher is not None:
            if quant_mode != "none":
                raise ValueError(f"an online teacher's labels decode as quant=none, got quant_mode={quant_mode!r}")
            for p in teacher.parameters():
                p.requires_grad_(False)
            self._online_teacher = (teacher.eval(),)

    # ----- data -----------------------------------------------------------------------------
    def set_images(self, images_u8: torch.Tensor, labels: torch.Tensor) -> None:
        """Distilled images (N, C, H, W) uint8 and their classes (N,) used to replay stored batches.

        Held on the module's current device now and moved with it by ``_place_data`` at the start of
        fit / validate (plain attributes: no DDP buffer broadcast).
        """
        if images_u8.dtype != torch.uint8:
            raise ValueError(f"set_images needs uint8 images, got {images_u8.dtype}")
        self.images_u8 = images_u8.to(self.device)
        self.image_labels = labels.long().to(self.device)

    def _place_data(self) -> None:
        """Move the images / labels to the module's device (once: a no-op when already there)."""
        if self.images_u8.device != self.device:
            self.images_u8 = self.images_u8.to(self.device)
            self.image_labels = self.image_labels.to(self.device)
        if self._online_teacher:
            self._online_teacher = (self._online_teacher[0].to(self.device).eval(),)

    def label(self, stored: Any, x: torch.Tensor) -> Any:
        """The batch with its labels: a stored batch as read, or (online teacher) the teacher's logits on ``x``."""
        if not self._online_teacher:
            return stored
        from lpld.core.online_labels import teacher_logits, with_teacher_logits

        return with_teacher_logits(stored, teacher_logits(self._online_teacher[0], x))

    def setup(self, stage: str) -> None:
        """Regroup the student's BatchNorm layers for this world size (before DDP wraps the model); a spawned rank
        first loads its images (``ReloadableImages.setup``)."""
        super().setup(stage)
        bn = dict(self.hparams.get("bn") or {})
        if not bn or getattr(self, "_bn_applied", False):
            return
        from lpld.core import ghost_bn

        world = int(self.trainer.world_size) if self._trainer is not None else 1
        group_rows, running = int(bn.get("rows") or 0), str(bn.get("running", "first"))
        rows = int(bn.get("batch") or 0) // (int(self.hparams.accumulate) * world)  # one rank's forward (rank_rows)
        if bool(bn.get("sync")) and world > 1:
            self.model = ghost_bn.convert_sync_bn(self.model)
        elif group_rows and rows < group_rows:  # a group over consecutive ranks (in1k's 32 rows on 8 devices)
            span = ghost_bn.ranks_per_group(group_rows, rows, world)
            self.model = ghost_bn.convert_cross_rank_bn(self.model, span, running)
        elif group_rows:
            self.model = ghost_bn.convert_ghost_bn(self.model, ghost_bn.ghost_groups(group_rows, rows), running)
        self._bn_applied = True

    def on_fit_start(self) -> None:
        self._place_data()

    def on_validation_start(self) -> None:
        self._place_data()

    def rank_rows(self, b: int, chunk: int) -> slice:
        """Rows of a stored batch of ``b`` rows this rank trains on in accumulation slice ``chunk``."""
        attached = self._trainer is not None
        w, r = (int(self.trainer.world_size), int(self.global_rank)) if attached else (1, 0)
        return rank_rows(b, chunk, int(self.hparams.accumulate), r, w)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Move a batch to ``device``; a StoredBatch's CutMix box stays on the host.

        The box slices tensors (``augment.apply``) and weighs the hard labels (``cutmix_share``), both
        as Python ints: reading them from a device tensor would block the host every step.
        """
        aug = getattr(batch, "aug", None)
        if isinstance(aug, augment.AugRecord) and dataclasses.is_dataclass(batch):
            moved = move_to(dataclasses.replace(batch, aug=None), device)
            return dataclasses.replace(moved, aug=augment.record_to(aug, device, non_blocking=True))
        return move_to(batch, device)

    def replay(self, stored: Any) -> torch.Tensor:
        """The augmented batch the teacher labelled: (B, C, S, S) float32 on the module's device.

        Only this batch's images are converted to float (the full set stays uint8), which gives the
        same values as ``augment.replay`` on the whole converted set: ``to_model_input`` is elementwise
        and ``resized_crop`` samples each crop from its own source image only. An image drawn twice is
        converted twice rather than deduplicated (``torch.unique`` has a data-dependent size, a host sync
        per step on a GPU).
        """
        idx = stored.index.to(self.images_u8.device)
        src = augment.to_model_input(self.images_u8.index_select(0, idx), self.hparams.mean, self.hparams.std)
        pos = torch.arange(idx.numel(), device=idx.device)
        return augment.apply(src, pos, stored.aug, int(self.hparams.img_size))

    # ----- temperatures ---------------------------------------------------------------------
    def teacher_temperature(self, epoch: int | None = None) -> float:
        """DKR temperature T(e) of the stored labels this epoch."""
        t = self.hparams.temp
        e = self.current_epoch if epoch is None else epoch
        return dkr_temperature(
            str(t["schedule"]),
            int(e),
            int(self.hparams.epochs),
            float(t["t0"]),
            int(t.get("step_size", 30)),
            float(t.get("gamma", 0.7)),
            float(t.get("floor", 2.0)),
            float(t.get("t_min", 1.0)),
            epoch_base=int(t.get("epoch_base", 0)),
        )

    def student_temp(self, teacher_t: float) -> float:
        """Student softmax temperature: T (CA none), the fixed value, or the current searched value."""
        mode = self.hparams.ca["mode"]
        return teacher_t if mode == "none" else float(self.student_temperature)

    def targets(self, stored: Any, teacher_t: float) -> torch.Tensor:
        """(B, C) teacher distribution of a stored batch at temperature T, label-smoothed.

        ``loss["smoothing_space"] == "logits"`` (official 21K) smooths the stored logits, which equals
        decoding at T / (1 - eps) (``kd_loss.smoothing_temperature``); stores without logits (ms, hard)
        fall back to smoothing the probabilities.
        """
        eps = float(self.hparams.label_smoothing)
        mode = self.hparams.quant_mode
        logit_space = self.hparams.loss.get("smoothing_space", "probs") == "logits"
        in_logits = eps > 0 and logit_space and quant.get_label_codec(mode).keeps_logits
        t = kd_loss.smoothing_temperature(teacher_t, eps) if in_logits else teacher_t
        probs = quant.decode(
            stored, mode, t, int(self.hparams.num_classes), gen_temperature=self.hparams.quant_gen_temperature
        )
        return probs if in_logits else kd_loss.smooth_targets(probs, eps)

    def label_phase(self, epoch: int | None = None) -> str:
        """``soft`` or ``hard``: how this epoch trains under ``student.label_schedule`` (lpld.core.label_schedule)."""
        from lpld.core.label_schedule import label_phase

        sched = dict(self.hparams.get("label_schedule") or {})
        e = self.current_epoch if epoch is None else epoch
        return label_phase(str(sched.get("name", "none")), int(e), int(self.hparams.epochs), sched)

    def compute_loss(self, logits: torch.Tensor, stored: Any, sl: slice, teacher_t: float) -> tuple[torch.Tensor, Any]:
        """Loss of one slice of a stored batch; also returns the slice's target (for CA) or None."""
        index = stored.index.to(self.image_labels.device)
        labels = self.image_labels[index]
        lam = cutmix_share(stored.aug, int(self.hparams.img_size))
        partner = labels[stored.aug.mix_index.to(labels.device)] if lam is not None else None
        if self.label_phase() == "hard":  # HALD's hard phase: the images' own classes, no label read
            eps = float((self.hparams.get("label_schedule") or {}).get("smoothing", 0.0))
            return kd_loss.hard_ce(logits, labels[sl], partner[sl] if partner is not None else None, lam, eps), None
        inputs = kd_loss.LossInputs(
            logits=logits,
            labels=labels[sl],
            partner=partner[sl] if partner is not None else None,
            lam=lam,
            stored=stored,
            rows=sl,
            quant_mode=self.hparams.quant_mode,
            target=lambda: self.targets(stored, teacher_t)[sl],
            teacher_t=teacher_t,
            student_t=self.student_temp(teacher_t),
            label_smoothing=float(self.hparams.label_smoothing),
            options=dict(self.hparams.loss),
        )
        return kd_loss.get_student_loss(self.hparams.loss["name"])(inputs)

    # ----- training -------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        stored = batch  # a StoredBatch, served `accumulate` times in a row (one slice each)
        k = int(self.hparams.accumulate)
        w = int(self.trainer.world_size)
        chunk = batch_idx % k
        # every rank replays the whole stored batch (CutMix pairs rows across the batch), then trains on its
        # own rows: one optimizer step = one stored batch = the recipe's global batch at any world size
        x = self.replay(stored)
        if self.label_phase() == "soft":  # a hard epoch reads no label: the online teacher rests
            stored = self.label(stored, x)  # online teacher: its logits on the whole replayed batch
        b = x.shape[0]
        sl = self.rank_rows(b, chunk)
        n = sl.stop - sl.start
        teacher_t = self.teacher_temperature()
        if n <= 0:  # a short batch with fewer rows than pieces: keep every rank's step count equal
            logits = self.model(x[:1])
            self._ca_step(batch_idx, None)  # ...and its part in CA's reduction
            return logits.sum() * 0.0
        logits = self.model(x[sl])
        loss, target = self.compute_loss(logits, stored, sl, teacher_t)
        # Lightning divides by `accumulate` and DDP averages over W ranks: weighting each piece's mean by
        # n k W / b makes the applied gradient the whole stored batch's mean, as on one process
        scaled = loss * (n * k * w / b)
        self.log_dict(
            {"train/loss": loss.detach()},
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=n,
            sync_dist=True,  # on_epoch only: one reduction per epoch, the epoch mean over all ranks' rows
        )
        if batch_idx == 0:
            # Python floats become device tensors in `log` (a blocking host->device copy on a GPU): the
            # temperatures are constant within an epoch (CA changes T_s after its last batch), so log them
            # once per epoch, the values this epoch trained with
            self.log_dict(
                {"train/temperature": teacher_t, "train/student_temperature": self.student_temp(teacher_t)},
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                batch_size=1,
            )
        # recipe accounting (results record): counted as host ints (shapes, no device values) and logged once
        # per epoch in on_train_epoch_end, since a per-step `log` of a Python float is a host->device copy
        self._epoch_rows += n
        self._epoch_steps += int(chunk == k - 1)
        self._ca_step(batch_idx, None if target is None else (logits.detach(), target.detach()))
        return scaled

    def on_train_epoch_start(self) -> None:
        self._epoch_rows, self._epoch_steps = 0, 0

    def on_train_epoch_end(self) -> None:
        # rows over all ranks (summed) and optimizer steps (equal on every rank) of the epoch just trained
        self.log("train/rows", float(self._epoch_rows), reduce_fx="sum", sync_dist=True)
        self.log("train/steps", float(self._epoch_steps))

    def _ca_step(self, batch_idx: int, rows: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """CA search: keep this rank's rows of the epoch's last stored batch (its ``accumulate`` slices); search after
        its last slice. Every rank calls this at every step (rows None: none here), so all join the reduction."""
        if self.hparams.ca["mode"] != "search" or self.label_phase() != "soft":
            return
        last = int(self.trainer.num_training_batches)
        if batch_idx < last - int(self.hparams.accumulate):
            return
        if rows is not None:
            self._ca_rows.append(rows)
        if batch_idx == last - 1:
            self._ca_search()

    def _ca_search(self) -> None:
        """CA: pick T_s minimising KL(p || softmax(z / T_s)) over the rows of the epoch's last stored batch.

        On W ranks the per-candidate loss sums and row counts are summed over the ranks, so the mean is the one
        process's over the whole batch (a rank may hold no row of a short batch); one process ranks its mean as is.
        """
        c = self.hparams.ca
        grid = ca_grid(float(c.get("lo", 0.01)), float(c.get("hi", 1.0)), int(c.get("n", 100)))
        rows, self._ca_rows = self._ca_rows, []
        if self.trainer.world_size > 1:
            total = torch.zeros(len(grid) + 1, dtype=torch.float64, device=self.device)
            if rows:
                z, p = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
                total[:-1] = ca_losses(z, p, grid) * z.shape[0]
                total[-1] = z.shape[0]
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
            if float(total[-1]) == 0:
                return
            losses = (total[:-1] / total[-1]).float()
        elif rows:
            losses = ca_losses(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]), grid).float()
        else:
            return
        self.student_temperature = float(grid[int(torch.argmin(losses.cpu()))])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self._ema_update()

    @torch.no_grad()
    def _ema_update(self) -> None:
        d = float(self.hparams.ema_decay)
        for pe, p in zip(self.ema.parameters(), self.model.parameters()):
            pe.mul_(d).add_(p.detach(), alpha=1.0 - d)
        for be, bm in zip(self.ema.buffers(), self.model.buffers()):
            be.copy_(bm)

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.hparams.optim
        wd = float(o.get("weight_decay") or 0.0)
        params: Any = list(self.model.parameters())
        if bool(o.get("wd_exclude_bn_bias", True)):
            params = decay_groups(self.model, wd)
        opt = build_optimizer(
            o["name"],
            params,
            lr=float(o["lr"]),
            weight_decay=wd,
            momentum=float(o.get("momentum") or 0.9),
            fused=self.device.type in ("cpu", "cuda"),
            key="student.optimizer",
        )
        spe = max(1, int(self.hparams.steps_per_epoch))
        kind = str(o.get("scheduler", "cosine"))
        if kind not in DECAYS:
            raise ValueError(
                f"unknown lr scheduler '{kind}'; choose student.scheduler=cosine | smooth_cosine | constant"
            )
        # the student's warm-up (Table 15): linear from warmup_start x lr, then cosine to 0 (lpld.lit.optim)
        schedule = LRSchedule(
            total_steps=spe * int(self.hparams.epochs),
            warmup_steps=int(round(float(o.get("warmup_epochs") or 0) * spe)),
            warmup="from_fraction",
            warmup_start=float(o.get("warmup_start", 0.01)),
            decay=kind,
        )
        return {"optimizer": opt, "lr_scheduler": step_scheduler(opt, schedule)}

    # ----- evaluation -----------------------------------------------------------------------
    def eval_model(self) -> torch.nn.Module:
        return self.ema if self.ema is not None else self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.eval_model()(x)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.eval_model()(x)
        self.val_top1.update(logits, y)
        self.val_top5.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        a1, a5 = self.val_top1.compute(), self.val_top5.compute()
        self.log_dict({"val/top1": a1, "val/top5": a5}, prog_bar=True)
        self.last_val = {"top1": float(a1), "top5": float(a5)}
        self.val_top1.reset()
        self.val_top5.reset()

    # ----- checkpoint state -----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lpld_student_temperature"] = float(self.student_temperature)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.student_temperature = float(checkpoint.get("lpld_student_temperature", self.student_temperature))
