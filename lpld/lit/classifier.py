"""ClassifierModule: supervised training of a registry model (the squeeze stage's teacher)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lpld.core.io import atomic_torch_save, fingerprint_state_dict
from lpld.lit.optim import LRSchedule, build_optimizer, step_scheduler


class ClassifierModule(L.LightningModule):
    """Trains ``model_cfg`` on real data with cross-entropy; reports val top-1/top-5.

    Args:
        model_cfg: model config as a plain dict (name + knobs), built with lpld.models.build_model.
        num_classes, in_chans, img_size: from the dataset spec.
        optim: {"name": sgd|adamw, "lr", "weight_decay", "momentum", "epochs", "warmup_epochs"}.
        label_smoothing: cross-entropy label smoothing.
        out_path: where global rank 0 writes the final weights (``teacher.pt``) at fit end.
        meta: extra fields stored next to the weights (dataset, config fingerprint...).
    """

    def __init__(
        self,
        model_cfg: dict[str, Any],
        num_classes: int,
        in_chans: int,
        img_size: int,
        optim: dict[str, Any],
        label_smoothing: float = 0.0,
        out_path: str | None = None,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        from lpld.models import build_model

        self.model = build_model(model_cfg, num_classes=num_classes, in_chans=in_chans, img_size=img_size)
        k5 = min(5, num_classes)
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=k5, average="micro")
        self.last_val: dict[str, float] = {}

    def setup(self, stage: str) -> None:
        """Ghost BN (``optim["bn_rows"]``, squeeze's ``stage.bn_rows``): each rank's forward of batch / W rows is
        normalised in groups of bn_rows rows, so the teacher's BatchNorm sees the same rows at any world size W
        (interleaved groups, as the sampler shards)."""
        rows = int(self.hparams.optim.get("bn_rows") or 0)
        if not rows or getattr(self, "_bn_applied", False):
            return
        from lpld.core.ghost_bn import convert_ghost_bn, ghost_groups

        world = int(self.trainer.world_size) if self._trainer is not None else 1
        per_rank = int(self.hparams.optim["batch_size"]) // world
        groups = ghost_groups(rows, per_rank, "stage.bn_rows")
        # EpochShardSampler deals each global batch's rows to ranks round-robin: rank r holds rows r, r + W, ... of it,
        # so the groups interleave (group g = rows g, g + G, ...) and G groups on one process are the W ranks' groups
        self.model = convert_ghost_bn(self.model, groups, "first", "stage.bn_rows", interleave=True)
        self._bn_applied = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=float(self.hparams.label_smoothing))
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict(
            {"train/loss": loss, "train/acc1": acc}, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y)
        )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.val_acc1.update(logits, y)
        self.val_acc5.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True, batch_size=len(y))

    def on_validation_epoch_end(self) -> None:
        a1, a5 = self.val_acc1.compute(), self.val_acc5.compute()
        self.log_dict({"val/acc1": a1, "val/acc5": a5}, prog_bar=True)
        self.last_val = {"val/acc1": float(a1), "val/acc5": float(a5)}
        self.val_acc1.reset()
        self.val_acc5.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.hparams.optim
        opt = build_optimizer(
            o["name"],
            self.parameters(),
            lr=float(o["lr"]),
            weight_decay=float(o.get("weight_decay", 0.0)),
            momentum=float(o.get("momentum", 0.9)),
            nesterov=bool(o.get("nesterov", False)),
            key="stage.optimizer",
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = int(round(float(o.get("warmup_epochs", 0)) * total / max(1, int(o["epochs"]))))
        # the teacher's warm-up: step s at lr (s + 1) / W, then cosine to 0 (lpld.lit.optim)
        schedule = LRSchedule(total_steps=total, warmup_steps=warm, warmup="counted", decay="cosine")
        return {"optimizer": opt, "lr_scheduler": step_scheduler(opt, schedule)}

    def on_fit_end(self) -> None:
        out = self.hparams.out_path
        if out and self.trainer.is_global_zero and not self.trainer.interrupted:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            check_finite_weights(state, "squeeze", "teacher")
            atomic_torch_save(
                out,
                {
                    "state_dict": state,
                    "fingerprint": fingerprint_state_dict(state),
                    "model": self.hparams.model_cfg,
                    "epochs": int(self.current_epoch),
                    "val": self.last_val,
                    **(self.hparams.meta or {}),
                },
            )


def check_finite_weights(state: dict[str, torch.Tensor], stage: str, what: str) -> None:
    """Refuse to store weights with a NaN/inf entry (checked once, before saving), naming the first tensor.

    Raises:
        ConfigError: the trained weights are not finite (a learning rate too high, or a wrong dataset.mean/std).
    """
    from lpld.errors import ConfigError

    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(
            f"stage {stage}: the trained {what} has non-finite weights ({len(bad)} tensor(s), first {bad[0]}); it was "
            "not saved. Likely cause: a learning rate too high (stage.lr) or a wrong dataset.mean/std; fix it and "
            f"rerun with stage.overwrite=true"
        )
