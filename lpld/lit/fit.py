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

    Returns:
        The checkpoint the fit resumed from, or None for a fresh run.
    """
    last = Path(ckpt_dir) / LAST
    resume = resume_path(ckpt_dir)
    if resume is not None and check_resume is not None:
        check_resume(resume)
    if resume is not None:
        log.info("resuming %s training from %s", what, resume)
    data = {"datamodule": datamodule} if datamodule is not None else {}
    if train_dataloaders is not None:
        data["train_dataloaders"] = train_dataloaders
    if val_dataloaders is not None:
        data["val_dataloaders"] = val_dataloaders
    try:
        trainer.fit(module, **data, ckpt_path=str(resume) if resume else None, weights_only=True)
    except (OSError, RuntimeError) as e:
        if on_error is not None:
            on_error(e)
        raise
    if raise_if_interrupted and trainer.interrupted:
        raise RuntimeError(f"{what} training was interrupted; rerun the same command to resume from {last}")
    return resume
