"""Resumable training: one checkpoint callback and one ``fit_with_resume`` for the teacher and the student.

A run keeps ``<ckpt_dir>/last.ckpt`` (written at every checkpointed epoch end); rerunning the same command
finds it and continues from there, and the deterministic data order (epoch-keyed seeds) makes the resumed
run train on the same batches as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lpld.errors import ConfigError

log = logging.getLogger("lpld")

LAST = "last.ckpt"


def resumable_checkpoint(ckpt_dir: str | Path, every_n_epochs: int = 1, save_on_train_epoch_end: bool | None = None):
    """The ModelCheckpoint of a resumable run: ``last.ckpt`` plus the newest ``epoch<N>.ckpt``.

    save_top_k=1 without a monitor keeps the newest epoch file; Lightning >= 2.6 writes last.ckpt only in a
    step that also saved a top-k checkpoint, so save_top_k=0 would never write it.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    kw = {} if save_on_train_epoch_end is None else {"save_on_train_epoch_end": save_on_train_epoch_end}
    return ModelCheckpoint(
        dirpath=str(ckpt_dir),
        filename="epoch{epoch}",
        save_last=True,
        save_top_k=1,
        every_n_epochs=max(1, int(every_n_epochs)),
        auto_insert_metric_name=False,
        **kw,
    )


def resume_path(ckpt_dir: str | Path) -> Path | None:
    """``<ckpt_dir>/last.ckpt`` if an earlier run left one, else None."""
    last = Path(ckpt_dir) / LAST
    return last if last.exists() else None


def fit_with_resume(
    trainer: Any,
    module: Any,
    ckpt_dir: str | Path,
    *,
    datamodule: Any = None,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    what: str = "model",
    check_resume: Callable[[Path], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
    raise_if_interrupted: bool = True,
    stage: str | None = None,
) -> Path | None:
    """``trainer.fit`` that continues from ``<ckpt_dir>/last.ckpt`` when it exists.

    Args:
        trainer, module: the Lightning Trainer (with a :func:`resumable_checkpoint` callback) and module.
        ckpt_dir: the folder holding the run's checkpoints.
        datamodule / train_dataloaders, val_dataloaders: the data, as ``trainer.fit`` takes it.
        what: the run's name in messages ("teacher", "student").
        check_resume: called with the checkpoint before resuming from it (raise to refuse, e.g. a corrupt file).
        on_error: called with an OSError/RuntimeError raised by ``fit`` (raise to translate it); the error is
            re-raised when it returns.
        raise_if_interrupted: raise RuntimeError naming the checkpoint when the fit was interrupted.
        stage: the stage named in messages (default ``what``).

    A deferred ``stage.overwrite=true`` of ``ckpt_dir`` (:mod:`lpld.artifacts.overwrite`) starts here and is
    undone if the fit fails; a non-finite training loss stops the fit (:class:`FiniteLossGuard`); epoch files
    older than the newest are removed (:class:`StaleEpochCheckpoints`).

    Returns:
        The checkpoint the fit resumed from, or None for a fresh run.
    """
    from lpld import dist
    from lpld.artifacts import overwrite

    last = Path(ckpt_dir) / LAST
    # stage.overwrite=true: the finished run moves aside only now, with the Trainer built (a settings error
    # before this point leaves it in place), and comes back if this fit fails
    overwrite.begin(ckpt_dir)
    dist.barrier()  # per-rank launches: no rank looks for last.ckpt before rank 0 moved the old run aside
    resume = resume_path(ckpt_dir)
    try:
        if resume is not None and check_resume is not None:
            check_resume(resume)
        if resume is not None:
            log.info("resuming %s training from %s", what, resume)
        data = {"datamodule": datamodule} if datamodule is not None else {}
        if train_dataloaders is not None:
            data["train_dataloaders"] = train_dataloaders
        if val_dataloaders is not None:
            data["val_dataloaders"] = val_dataloaders
        callbacks = getattr(trainer, "callbacks", None)  # a Trainer's list (test doubles may have none)
        if isinstance(callbacks, list):
            callbacks.extend([FiniteLossGuard(stage or what, what), StaleEpochCheckpoints(ckpt_dir)])
        try:
            trainer.fit(module, **data, ckpt_path=str(resume) if resume else None, weights_only=True)
        except (OSError, RuntimeError) as e:
            if on_error is not None:
                on_error(e)
            raise
        if raise_if_interrupted and trainer.interrupted:
            raise RuntimeError(f"{what} training was interrupted; rerun the same command to resume from {last}")
    except BaseException:
        overwrite.restore(ckpt_dir)  # no-op unless this run moved a finished run aside
        raise
    return resume


class FiniteLossGuard(Callback):
    """Stops a fit whose training loss became NaN/inf, naming the stage, the epoch and the likely causes.

    Cheap: each step ORs a device flag (no host sync); the flag is read once per epoch and before every checkpoint
    save, so a non-finite model is never checkpointed (``last.ckpt``) nor stored (``teacher.pt``).
    """

    def __init__(self, stage: str, what: str) -> None:
        self.stage, self.what = stage, what
        self.bad: Any = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or not hasattr(loss, "detach"):
            return
        flag = ~torch.isfinite(loss.detach()).all()
        self.bad = flag if self.bad is None else self.bad | flag

    def _check(self, trainer: Any) -> None:
        if self.bad is None or not bool(self.bad):  # one host sync per check
            return
        raise ConfigError(
            f"stage {self.stage}: the {self.what}'s training loss is not finite (NaN/inf) in epoch "
            f"{trainer.current_epoch} (by global step {trainer.global_step}); nothing was saved for this epoch. "
            "Likely causes: a learning rate too high (stage.lr) or a wrong dataset.mean/std; fix it and rerun the "
            "same command (stage.overwrite=true starts over)"
        )

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._check(trainer)

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.training:  # the end-of-epoch validation runs (and may checkpoint) before on_train_epoch_end
            self._check(trainer)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._check(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._check(trainer)  # callbacks run before the module's on_fit_end (which stores teacher.pt)


class StaleEpochCheckpoints(Callback):
    """Removes ``epoch<N>.ckpt`` files older than the newest one (global rank 0) at every epoch start and at fit
    end: an interrupted save (disk full, kill) can leave an older epoch file that ModelCheckpoint no longer tracks.
    The newest file was written in an earlier hook, so it is complete when the older ones go."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.dir = Path(ckpt_dir)

    def _prune(self, trainer: Any) -> None:
        if trainer.is_global_zero:
            remove_stale_epoch_checkpoints(self.dir)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._prune(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._prune(trainer)


def remove_stale_epoch_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Delete every ``epoch<N>.ckpt`` in ``ckpt_dir`` but the one with the highest N; returns the removed files."""
    import re

    found = []
    for p in Path(ckpt_dir).glob("epoch*.ckpt"):
        m = re.fullmatch(r"epoch(\d+)\.ckpt", p.name)
        if m:
            found.append((int(m.group(1)), p))
    found.sort()
    removed = []
    for _, p in found[:-1]:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed stale epoch checkpoint(s): %s", ", ".join(p.name for p in removed))
    return removed
