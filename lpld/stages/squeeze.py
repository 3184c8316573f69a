"""Stage ``squeeze``: train the teacher on the full real train set (resumable)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from lpld.artifacts import overwrite as overwrite_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.config import squeeze_settings
from lpld.config.frozen import Experiment
from lpld.core.io import drop_aside, fingerprint_obj, release_lock
from lpld.errors import ConfigError
from lpld.lit.fit import fit_with_resume, resumable_checkpoint
from lpld.stages.common import (
    build_logger,
    build_trainer,
    dataset_spec,
    finish_logger,
    num_workers,
    to_container,
)

log = logging.getLogger("lpld")

# Tests inject callbacks here (e.g. to simulate an interruption); empty in normal runs.
extra_callbacks: list[Any] = []


def teacher_seed(exp: Experiment) -> int:
    """The teacher's training seed: ``teacher_seed`` (not the run's ``seed``, so every seed of a sweep
    shares one teacher; a config without the key falls back to ``seed``)."""
    return int(exp.get("teacher_seed", exp.seed))


def teacher_config_fingerprint(exp: Experiment) -> str:
    """What a finished teacher was trained from (dataset, model, recipe, teacher_seed)."""
    # The dataset's identity, not its root (moving the data must not retrain) nor the recipes of
    # later stages (a student recipe change must not invalidate the teacher).
    ds = {k: v for k, v in to_container(exp.dataset).items() if k not in ("recipe", "root", "download")}
    return fingerprint_obj(
        {"dataset": ds, "model": to_container(exp.model), "optim": squeeze_settings(exp), "seed": teacher_seed(exp)}
    )


def check_epochs(epochs: int) -> None:
    """Refuse a schedule of no epochs: it would store the untrained teacher as finished.

    Raises:
        ConfigError: ``stage.epochs`` (or ``dataset.recipe.squeeze.epochs``) below 1.
    """
    if int(epochs) < 1:
        raise ConfigError(
            f"stage.epochs={epochs} (or dataset.recipe.squeeze.epochs) trains nothing and would store an untrained "
            "teacher; set stage.epochs=<at least 1>, or give the teacher with model.checkpoint=/path/to/weights.pt "
            "or model.pretrained=true"
        )


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and write / delete a probe file in it, so a read-only or full artifacts folder is refused
    before any work is done, naming the folder and the fix.

    Raises:
        ArtifactError: the folder cannot be created or written (``lpld.core.io.write_error``'s message).
    """
    import os
    import tempfile

    from lpld.core.io import write_error

    where = folder if folder.is_dir() else folder.parent  # probe without leaving an empty artifact folder behind
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        err = write_error(e, folder, what)
        if err is None:
            raise
        raise err from e


def _reuse_or_prepare(exp: Experiment, cfg_fp: str) -> dict[str, Any] | None:
    """Rank 0 decides, every rank follows: the finished teacher's val metrics (reuse) or None (train / resume).

    Raises:
        ArtifactError: the teacher file was trained from another config and ``stage.overwrite`` is false.
    """
    from lpld import dist

    def decide() -> dict[str, Any] | None:
        """Rank 0: the finished teacher's val metrics (reuse), None (train / resume), or an error."""
        return teacher_artifact.prepare(exp, cfg_fp, bool(exp.stage.overwrite))

    # a child re-launched by Lightning starts inside rank 0's Trainer
    return dist.decide(decide, follow=None, accelerator=dist.accelerator_of(exp))


def _dataloaders(exp: Experiment, st: dict[str, Any], per_rank: int) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders of the real data, sharded by rank and keyed by (teacher_seed, epoch, sample).

    Order and augmentation are keyed, not drawn from a stream, so a run resumed from last.ckpt trains on the
    same batches and crops as an uninterrupted one (same bytes), and W ranks of B / W images together hold
    the one-process batch (lpld.data.epoch_seeded).
    """
    from lpld.data import build_dataset
    from lpld.data.epoch_seeded import EpochSeededDataset, EpochShardSampler
    from lpld.data.transforms import eval_transform, train_transform

    train = build_dataset(exp.dataset, "train", transform=train_transform(exp.dataset))
    val = build_dataset(exp.dataset, "val", transform=eval_transform(exp.dataset))
    nw = num_workers(exp)
    tseed = teacher_seed(exp)
    train_dl = DataLoader(
        EpochSeededDataset(train, tseed),
        batch_size=per_rank,
        sampler=EpochShardSampler(len(train), tseed),
        drop_last=True,
        num_workers=nw,
        persistent_workers=nw > 0,
    )
    val_dl = DataLoader(
        EpochSeededDataset(val, tseed),
        batch_size=max(256, st["batch_size"]),
        sampler=EpochShardSampler(len(val), tseed, shuffle=False, drop_remainder=False),
        num_workers=nw,
        persistent_workers=nw > 0,
    )
    return train_dl, val_dl


def _train(exp: Experiment, st: dict[str, Any], module: Any, loaders: tuple[DataLoader, DataLoader]) -> Any:
    """Fit ``module`` (resuming from the teacher folder's last.ckpt); returns the Trainer."""
    out_dir = teacher_artifact.dir(exp)
    logger = build_logger(exp, "squeeze")
    try:
        trainer = build_trainer(
            exp,
            logger=logger,
            callbacks=[resumable_checkpoint(out_dir), *extra_callbacks],
            max_epochs=st["epochs"],
            check_val_every_n_epoch=int(exp.stage.val_every),
            use_distributed_sampler=False,  # the samplers shard by rank themselves
        )
        # interruption is checked by the caller after the barrier (rank 0 writes teacher.pt at fit end)
        fit_with_resume(
            trainer,
            module,
            out_dir,
            train_dataloaders=loaders[0],
            val_dataloaders=loaders[1],
            what="teacher",
            check_resume=_check_resume,
            raise_if_interrupted=False,
            stage="squeeze",
        )
    finally:
        finish_logger(logger)
    return trainer


def _check_resume(last: Path) -> None:
    """Refuse a teacher ``last.ckpt`` that pickles objects (never torch's "retry with weights_only=False")."""
    from lpld.models.checkpoint import check_plain_tensor_file

    check_plain_tensor_file(last, "delete it, or rerun with stage.overwrite=true to retrain the teacher from scratch")


def run(exp: Experiment) -> dict[str, Any]:
    """Train (or resume, or reuse) the teacher at ``teacher_artifact.path(exp)``; returns its val metrics."""
    import lightning as L

    from lpld import dist
    from lpld.lit.classifier import ClassifierModule

    if exp.model.get("pretrained") or exp.model.get("checkpoint"):
        log.info("model.pretrained/checkpoint set: the teacher is given, nothing to train")
        return {"skipped": True}
    out_dir = teacher_artifact.dir(exp)
    weights = teacher_artifact.path(exp)
    cfg_fp = teacher_config_fingerprint(exp)
    st = squeeze_settings(exp)
    check_epochs(st["epochs"])
    try:  # the recipe's batch is global: each of W ranks loads batch / W images per step
        per_rank = dist.per_rank_batch(st["batch_size"], dist.planned_world_size(exp), "stage.batch_size")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if st.get("bn_rows"):  # ghost BN: the groups must tile each rank's rows (refused now, not after the data loads)
        from lpld.core.ghost_bn import ghost_groups

        ghost_groups(int(st["bn_rows"]), per_rank, "stage.bn_rows")
    reused = _reuse_or_prepare(exp, cfg_fp)
    if reused is not None:
        log.info("teacher exists at %s (val %s); reusing it (stage.overwrite=true retrains)", weights, reused)
        return {"reused": True, **reused}
    if dist.rank() == 0:
        check_writable(out_dir, "stage squeeze")  # a read-only folder fails now, not after an epoch of training
    spec = dataset_spec(exp)
    L.seed_everything(teacher_seed(exp), workers=True, verbose=False)
    loaders = _dataloaders(exp, st, per_rank)
    module = ClassifierModule(
        model_cfg=to_container(exp.model),
        num_classes=spec.num_classes,
        in_chans=spec.channels,
        img_size=spec.image_size,
        optim=st,
        label_smoothing=st["label_smoothing"],
        out_path=str(weights),
        meta={"dataset": spec.name, "config_fingerprint": cfg_fp, "seed": teacher_seed(exp)},
    )
    trainer = _train(exp, st, module, loaders)
    dist.barrier()  # rank 0 wrote teacher.pt in on_fit_end; per-rank launches read it next
    if trainer.interrupted or not weights.exists():
        raise RuntimeError(
            f"teacher training was interrupted; rerun the same command to resume from {out_dir / 'last.ckpt'}"
        )
    blob = teacher_artifact.read(weights)
    if dist.rank() == 0:
        overwrite_artifact.finished(out_dir)
        drop_aside(out_dir)
        release_lock(out_dir)
    log.info("teacher saved to %s: %s", weights, blob["val"])
    return dict(blob["val"])
