"""Student benchmark (ratio measured in the same run).

* ``student_over_fwdbwd``: one student epoch through Lightning (``StudentModule`` + ``StudentData``:
  label-pool plan, ``store.read`` of every stored batch, on-device replay of the stored
  augmentation incl. CutMix, soft-label decoding at the DKR temperature, KL loss, backward,
  optimizer and lr-scheduler step) divided by a plain forward + backward of the same model on
  the same number of already-augmented batches held in memory, measured right after each student
  epoch. CIFAR ResNet-18 at 32 px, C = 100, batch 32, quant none, explicit records,
  ``granularity=batch``. Reported: the median over the epochs after the first (Trainer start-up
  and warm-up excluded) of (student epoch / the plain epoch next to it). Times are CPU seconds
  of this process (``time.process_time``; the loader runs in-process), which other jobs on a
  shared machine inflate far less than wall time.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from lpld.core import augment
from lpld.core.augment import AugConfig
from lpld.core.label_store import LabelStore, StoreSpec, finalize, prepare
from lpld.core.quant import QuantConfig
from lpld.core.relabel import generate

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

# CPU time of this process (all its threads): other jobs on a shared machine do not inflate it the
# way they inflate wall time. Everything runs in this process (num_workers=0), data path included.
_clock = time.process_time


class EpochTimer(L.Callback):
    """Times each student epoch and, right after it, one plain epoch (interleaved: shared-CPU load
    drifts slowly, so neighbouring measurements see the same load).

    Args:
        plain_epoch: runs one plain epoch and returns its time.
        clock: the clock (CPU time here; wall time for the GPU suite).
        sync: waits for the device before each reading (a no-op on the CPU).
    """

    def __init__(
        self,
        plain_epoch: Callable[[], float],
        clock: Callable[[], float] = _clock,
        sync: Callable[[], None] | None = None,
    ) -> None:
        self.times: list[float] = []
        self.plain: list[float] = []
        self.plain_epoch, self.clock = plain_epoch, clock
        self.sync = sync or (lambda: None)
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sync()
        self._t0 = self.clock()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sync()
        self.times.append(self.clock() - self._t0)
        self.plain.append(self.plain_epoch())

    def ratios(self) -> list[float]:
        """student epoch / its neighbouring plain epoch, the first (warm-up) epoch left out."""
        return [t / p for t, p in zip(self.times[1:], self.plain[1:])]


def bench_store(
    path: Path, u8: torch.Tensor, num_classes: int, batch: int, epochs: int, teacher: torch.nn.Module, **generate_kw
) -> LabelStore:
    """A finished label store (quant none, explicit records, 1x) of ``u8`` (N, 3, S, S) labelled by ``teacher``."""
    n, hw = u8.shape[0], u8.shape[-1]
    spec = StoreSpec(
        n, num_classes, (hw, hw), batch, epochs, "1x", 0.0, "batch", QuantConfig("none"), AugConfig(hw), "explicit", 0
    )
    prepare(path, spec, {"images_fingerprint": "bench", "teacher_fingerprint": "bench"})
    with torch.no_grad():
        generate(path, teacher, augment.to_model_input(u8, MEAN, STD), **generate_kw)
    finalize(path)
    return LabelStore.open(path)


def bench_module(arch: dict, num_classes: int, hw: int, temp: dict, epochs: int, n_batches: int):
    """The StudentModule both student benchmarks time: KL at T = 20, AdamW, no CA."""
    from lpld.lit.student_module import StudentModule

    return StudentModule(
        model_cfg=arch,
        num_classes=num_classes,
        in_chans=3,
        img_size=hw,
        quant_mode="none",
        loss={"name": "kl", "gamma": 0.1, "t2": False},
        temp=temp,
        ca={"mode": "none", "value": 1.0},
        optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
        epochs=epochs,
        steps_per_epoch=n_batches,
        mean=MEAN,
        std=STD,
    )


def bench_trainer(
    epochs: int, timer: L.Callback, accelerator: str = "cpu", precision: str = "32-true", callbacks: list | None = None
) -> L.Trainer:
    """A bare single-device Trainer: no logger, checkpoints, progress bar or validation (``callbacks`` added)."""
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, *(callbacks or [])],
        limit_val_batches=0,
        reload_dataloaders_every_n_epochs=1,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )


def run(quick: bool = False) -> dict[str, float]:
    from lpld.lit.student_module import StudentData
    from lpld.models import build_model

    torch.manual_seed(0)
    arch = {"name": "convnet", "width": 64} if quick else {"name": "resnet18_cifar"}
    c, b, hw = 100, 32, 32
    n_batches = 3 if quick else 4
    n = n_batches * b
    epochs = 4 if quick else 5
    u8 = torch.randint(0, 256, (n, 3, hw, hw), dtype=torch.uint8)
    labels = torch.arange(n) % c
    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_model({"name": "convnet", "width": 16}, num_classes=c, in_chans=3, img_size=hw).eval()
        store = bench_store(Path(tmp) / "store", u8, c, b, epochs, teacher)
        temp = {"t0": 20.0, "schedule": "step", "step_size": 1, "gamma": 0.7, "floor": 2.0, "t_min": 1.0}
        module = bench_module(arch, c, hw, temp, epochs, n_batches)
        module.set_images(u8, labels)
        data = StudentData(store, torch.arange(len(store)).numpy(), n_batches, "batch", seed=0)

        # plain forward + backward of the same architecture on the same number of in-memory batches
        model = build_model(arch, num_classes=c, in_chans=3, img_size=hw).train()
        x_all = augment.to_model_input(u8, MEAN, STD)
        batches = [store.read(i) for i in range(n_batches)]
        xs = [augment.replay(x_all, sb, hw) for sb in batches]
        ps = [torch.softmax(sb.logits.float() / 20.0, 1) for sb in batches]

        def plain_epoch() -> float:
            t0 = _clock()
            for x, p in zip(xs, ps):
                model.zero_grad(set_to_none=True)
                loss = F.kl_div(F.log_softmax(model(x) / 20.0, 1), p, reduction="batchmean")
                loss.backward()
            return _clock() - t0

        timer = EpochTimer(plain_epoch)
        bench_trainer(epochs, timer).fit(module, datamodule=data)
        # the first epoch of each is warm-up; the median of the neighbouring pairs' ratios of the rest
        ratios = timer.ratios()
    return {"student_over_fwdbwd": float(statistics.median(ratios))}
