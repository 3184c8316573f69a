"""What a run shows while it works: progress (rich bars on a terminal, a plain line every N seconds in a log
file), a quiet console (Lightning tips, accelerator lines and known library warnings at debug level only) and
image grids in W&B (a bounded number per run)."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("lpld")

# Lightning / library chatter that says nothing about the run; shown with LPLD_DEBUG=1 or at debug level
QUIET_MESSAGES = (
    "Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "IPU available:",
    "LOCAL_RANK:",
    "You are using a CUDA device",
    "`Trainer(limit_",
    "Trainer will use only",
    "Missing logger folder",
    "litlogger",
    "litmodels",
    "to estimate number of stepping batches",
    "`Trainer.fit` stopped: `max_epochs=",
)
# known library warnings (regular expressions on the message start) that a user cannot act on
QUIET_WARNINGS = (
    r".*does not have many workers",
    r".*The number of training batches .* is smaller than the logging interval",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated",
    r".*LeafSpec",
    r".*Checkpoint directory .* exists and is not empty",
    r".*Experiment logs directory .* exists and is not empty",
    r".*You called `self.log\(",
    r".*Total length of `.*` across ranks is zero",
    r".*It is recommended to use `self.log\(",
    r".*The `srun` command is available",
    r".*pkg_resources is deprecated",
    r".*Found .* module\(s\) in eval mode at the start of training",
    r".*Precision .* is not supported by the model summary",
    r".*torch.cuda.amp",
    r".*Consider setting `persistent_workers=True`",
    r".*The '.*_dataloader' does not have many workers",
    r".*upgrade_checkpoint",
    r".*Attribute '.*' is an instance of `nn.Module` and is already saved",
)
LOGGER_PREFIXES = ("lightning", "pytorch_lightning")


def debug_console() -> bool:
    """``LPLD_DEBUG=1`` (or the lpld logger at debug level) shows everything the console filter hides."""
    return os.environ.get("LPLD_DEBUG", "0") not in ("", "0") or log.isEnabledFor(logging.DEBUG)


class QuietFilter(logging.Filter):
    """Drops (demotes to nothing) Lightning's tips and accelerator lines; see :data:`QUIET_MESSAGES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not any(m in msg for m in QUIET_MESSAGES)


_FILTER = QuietFilter()


def quiet_console() -> None:
    """Filter Lightning's tips / accelerator lines and the known library warnings (not with LPLD_DEBUG=1);
    make wandb quiet unless the user chose (``WANDB_SILENT`` set). Idempotent; call once logging is set up."""
    os.environ.setdefault("WANDB_SILENT", "true")
    if debug_console():
        return
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in LOGGER_PREFIXES]
    rank_zero = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    for name in {*names, *LOGGER_PREFIXES, *rank_zero}:
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
        for h in lg.handlers:
            if _FILTER not in h.filters:
                h.addFilter(_FILTER)
    for h in logging.getLogger().handlers:  # records propagate to the root's handlers past the loggers' filters
        if _FILTER not in h.filters:
            h.addFilter(_FILTER)


def is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def progress_enabled() -> bool:
    """Rich progress bars are wanted: stdout is a terminal and ``LPLD_NO_RICH`` is not ``1`` (in a log file, e.g.
    a SLURM job's, rich bars print only at the end: :class:`TimedProgress` prints plain lines instead)."""
    return os.environ.get("LPLD_NO_RICH", "0") != "1" and is_tty()


def progress_every() -> float:
    """Seconds between plain progress lines (``LPLD_PROGRESS_EVERY``, default 30; <= 0 turns them off)."""
    try:
        return float(os.environ.get("LPLD_PROGRESS_EVERY", "30") or 30)
    except ValueError:
        return 30.0


def _duration(sec: float) -> str:
    sec = max(0, int(sec))
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressLine:
    """A plain ``<what>: done/total unit (pct), rate/s, ETA`` line through the lpld logger at most every
    :func:`progress_every` seconds (the first after one interval)."""

    def __init__(self, what: str, every: float | None = None):
        self.what = what
        self.every = progress_every() if every is None else every
        self.t0 = self.last = time.monotonic()

    def due(self) -> bool:
        return self.every > 0 and time.monotonic() - self.last >= self.every

    def update(self, done: float, total: float | None, unit: str = "it", extra: str = "", force: bool = False) -> None:
        if not (force or self.due()):
            return
        now = time.monotonic()
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = done / elapsed
        parts = [f"{self.what}: {int(done)}/{int(total)} {unit}" if total else f"{self.what}: {int(done)} {unit}"]
        if total:
            parts[0] += f" ({100 * done / max(total, 1):.0f}%)"
        parts.append(f"{rate:.2f} {unit}/s")
        if total and rate > 0:
            parts.append(f"ETA {_duration((total - done) / rate)}")
        parts.append(f"elapsed {_duration(elapsed)}")
        if extra:
            parts.append(extra)
        log.info(", ".join(parts))


class TimedProgress(Callback):  # module level: ddp_spawn pickles the Trainer's callbacks
    """In a non-TTY (a SLURM log) a plain progress line every ``LPLD_PROGRESS_EVERY`` seconds (default 30):
    epochs / batches done, rate, ETA (rank 0 only). Rich bars, when on, are the terminal's view instead."""

    def __init__(self, what: str, every: float | None = None):
        self.what, self.every = what, every
        self.line: ProgressLine | None = None

    def _start(self, trainer: Any) -> None:
        self.line = ProgressLine(self.what, self.every) if trainer.is_global_zero else None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start(trainer)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._start(trainer)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not _fitting(trainer):  # trainer.validate(): its own line (a fit's validation is part of the fit)
            self._start(trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.line is None or not self.line.due():
            return
        nb = trainer.num_training_batches
        nb = int(nb) if isinstance(nb, int) or (isinstance(nb, float) and nb != float("inf")) else 0
        epochs = int(trainer.max_epochs or 0)
        if nb and epochs > 0:  # progress over the whole fit, in batches
            done, total = trainer.current_epoch * nb + batch_idx + 1, epochs * nb
            self.line.update(done, total, "batches", extra=f"epoch {trainer.current_epoch + 1}/{epochs}")
        else:
            self.line.update(batch_idx + 1, None, "batches", extra=f"epoch {trainer.current_epoch + 1}")

    def on_predict_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:  # noqa: E501
        if self.line is None or not self.line.due():
            return
        nb = trainer.num_predict_batches
        total = int(sum(nb)) if isinstance(nb, list | tuple) else None
        self.line.update(batch_idx + 1, total, "batches")

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:  # noqa: E501
        if self.line is None or _fitting(trainer) or not self.line.due():
            return
        nb = trainer.num_val_batches
        total = int(sum(nb)) if isinstance(nb, list | tuple) else None
        self.line.update(batch_idx + 1, total, "val batches")


def _fitting(trainer: Any) -> bool:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return str(getattr(fn, "value", fn)) == "fit"


def timed_progress(what: str, every: float | None = None) -> Any:
    """A :class:`TimedProgress` Lightning callback for a stage (``what``: the label of its lines)."""
    return TimedProgress(what, every)


class RecoverProgress:
    """Recover's progress: classes and optimisation iterations (done/total), the loss, rate and ETA — a rich bar
    on a terminal, a plain line every ``LPLD_PROGRESS_EVERY`` seconds otherwise."""

    def __init__(self, method: str, classes: int, iterations: int, batches: int):
        self.classes_total, self.classes_done = classes, 0
        # every device batch runs `iterations` steps (a method that does not optimise has 0)
        self.per_batch = max(0, int(iterations))
        self.it_total, self.it_done, self.it_base, self.in_batch = self.per_batch * batches, 0, 0, False
        self.loss = "-"
        self.bar = None
        self.line = None
        if progress_enabled():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]recover {task.fields[method]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("iterations, classes {task.fields[classes]}" if self.it_total else "classes"),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task(
                "recover", total=self.it_total or classes, method=method, loss="-", classes=f"0/{classes}"
            )
            self.bar.start()
        else:
            self.line = ProgressLine(f"recover {method}")

    def step(self, t: int, iterations: int, loss: float | None = None) -> None:
        """Iteration ``t`` (0-based) of ``iterations`` of the current device batch."""
        if loss is not None:
            self.loss = f"{loss:.4f}"
        self.in_batch = True
        self._show(self.it_base + t + 1)

    def classes(self, n: int, loss: float | None = None) -> None:
        """``n`` more classes done: their device batch finished (or was already done: resume)."""
        self.classes_done += n
        self.it_base += self.per_batch  # a batch skipped as done counts its iterations as done too
        self.in_batch = False
        if loss is not None:
            self.loss = f"{loss:.4f}"
        self._show(self.it_base)

    def _show(self, it_done: int, force: bool = False) -> None:
        self.it_done = max(self.it_done, it_done)
        state = (self.it_done, self.classes_done)
        if self.bar is not None:
            completed = self.it_done if self.it_total else self.classes_done
            self.bar.update(
                self.task, completed=completed, loss=self.loss, classes=f"{self.classes_done}/{self.classes_total}"
            )
        elif state == getattr(self, "_shown", None):  # the loss of an iteration already shown: on the next line
            return
        elif self.line is not None and (force or self.line.due()):
            self._shown = state
            if self.it_total:
                self.line.update(
                    self.it_done,
                    self.it_total,
                    "iterations",
                    extra=f"classes {self.classes_done}/{self.classes_total}, loss {self.loss}",
                    force=True,
                )
            else:
                self.line.update(self.classes_done, self.classes_total, "classes", force=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def image_log_batches(n_batches: int, max_panels: int = 8) -> set[int]:
    """The device batches whose image grid is logged: at most ``max_panels``, spread evenly over the run (a
    1000-class recover logs ~8 grids, not one per device batch)."""
    if n_batches <= max_panels:
        return set(range(n_batches))
    return {round(i * (n_batches - 1) / (max_panels - 1)) for i in range(max_panels)}


def log_images_uint8(
    logger: Any, key: str, images: torch.Tensor, step: int | None = None, caption: str | None = None
) -> None:
    """Log a grid of images to W&B. ``images``: uint8 (B, C, H, W) (float images save black in wandb 0.31).

    Any logger other than a WandbLogger (or none) ignores the call.
    """
    if logger is None or images.numel() == 0:
        return
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    import torchvision

    assert images.dtype == torch.uint8, "log images as uint8"
    grid = torchvision.utils.make_grid(images, nrow=min(10, len(images)), padding=1)  # uint8 (C, H, W)
    arr = grid.permute(1, 2, 0).cpu().numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    kw = {"caption": [caption]} if caption else {}  # WandbLogger.log_image takes len(caption)
    logger.log_image(key=key, images=[arr], step=step, **kw)
