"""Stage ``squeeze``: train the teacher on the full real train set (resumable)."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from lpld import paths
from lpld.core.io import ArtifactError, acquire_lock, drop_aside, fingerprint_obj, move_aside, release_lock
from lpld.stages import ConfigError
from lpld.stages.common import (
    build_logger,
    build_trainer,
    dataset_spec,
    finish_logger,
    num_workers,
    read_teacher_file,
    recipe,
    to_container,
)

log = logging.getLogger("lpld")

# Tests inject callbacks here (e.g. to simulate an interruption); empty in normal runs.
extra_callbacks: list[Any] = []


def squeeze_settings(cfg: DictConfig) -> dict[str, Any]:
    """Resolved training recipe: stage overrides on top of the dataset's recipe.squeeze."""
    return {
        "name": str(recipe(cfg, "squeeze", "optimizer", "sgd")),
        "epochs": int(recipe(cfg, "squeeze", "epochs", 10)),
        "batch_size": int(recipe(cfg, "squeeze", "batch_size", 128)),
        "lr": float(recipe(cfg, "squeeze", "lr", 0.05)),
        "weight_decay": float(recipe(cfg, "squeeze", "weight_decay", 5e-4)),
        "momentum": float(recipe(cfg, "squeeze", "momentum", 0.9)),
        "warmup_epochs": float(recipe(cfg, "squeeze", "warmup_epochs", 0)),
        "label_smoothing": float(recipe(cfg, "squeeze", "label_smoothing", 0.0)),
    }


def teacher_seed(cfg: DictConfig) -> int:
    """The teacher's training seed: ``teacher_seed`` (not the run's ``seed``, so every seed of a sweep
    shares one teacher; a config without the key falls back to ``seed``)."""
    return int(cfg.get("teacher_seed", cfg.seed))


def teacher_config_fingerprint(cfg: DictConfig) -> str:
    """What a finished teacher was trained from (dataset, model, recipe, teacher_seed)."""
    # The dataset's identity, not its root (moving the data must not retrain) nor the recipes of
    # later stages (a student recipe change must not invalidate the teacher).
    ds = {k: v for k, v in to_container(cfg.dataset).items() if k not in ("recipe", "root", "download")}
    return fingerprint_obj(
        {"dataset": ds, "model": to_container(cfg.model), "optim": squeeze_settings(cfg), "seed": teacher_seed(cfg)}
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    import lightning as L

    from lpld import dist
    from lpld.data import build_dataset
    from lpld.data.epoch_seeded import EpochSeededDataset, EpochShardSampler
    from lpld.data.transforms import eval_transform, train_transform
    from lpld.lit.classifier import ClassifierModule

    if cfg.model.get("pretrained") or cfg.model.get("checkpoint"):
        log.info("model.pretrained/checkpoint set: the teacher is given, nothing to train")
        return {"skipped": True}
    out_dir = paths.teacher_dir(cfg)
    weights = paths.teacher_weights_path(cfg)
    cfg_fp = teacher_config_fingerprint(cfg)
    st = squeeze_settings(cfg)
    try:  # the recipe's batch is global: each of W ranks loads batch / W images per step
        per_rank = dist.per_rank_batch(st["batch_size"], dist.planned_world_size(cfg), "stage.batch_size")
    except ValueError as e:
        raise ConfigError(str(e)) from e

    def decide() -> dict[str, Any] | None:
        """Rank 0: the finished teacher's val metrics (reuse), None (train / resume), or an error."""
        acquire_lock(out_dir, "teacher")  # one writer per teacher folder (released when done, or at exit)
        if weights.exists() and not cfg.stage.overwrite:
            blob = read_teacher_file(weights)
            if blob.get("config_fingerprint") == cfg_fp:
                release_lock(out_dir)
                return dict(blob["val"])
            raise ArtifactError(
                f"{weights} holds a teacher trained with a different recipe/config (fingerprint "
                f"{blob.get('config_fingerprint')} vs {cfg_fp}). Rerun with stage.overwrite=true to retrain it, or "
                "set model.tag=<name> to keep both"
            )
        if cfg.stage.overwrite and out_dir.exists():
            # start over (no resume from its last.ckpt); the old folder is kept as teacher.replaced until the new
            # teacher.pt is written
            move_aside(out_dir)
        return None

    # rank 0 decides and moves things aside; a child re-launched by Lightning starts inside rank 0's Trainer
    reused = dist.decide(decide, follow=None, accelerator=dist.accelerator_of(cfg))
    if reused is not None:
        log.info("teacher exists at %s (val %s); reusing it (stage.overwrite=true retrains)", weights, reused)
        return {"reused": True, **reused}
    spec = dataset_spec(cfg)
    L.seed_everything(teacher_seed(cfg), workers=True, verbose=False)
    train = build_dataset(cfg.dataset, "train", transform=train_transform(cfg.dataset))
    val = build_dataset(cfg.dataset, "val", transform=eval_transform(cfg.dataset))
    nw = num_workers(cfg)
    # order and augmentation are keyed by (teacher_seed, epoch, sample), not drawn from a stream, so a run
    # resumed from last.ckpt trains on the same batches and crops as an uninterrupted one (same bytes), and
    # W ranks of B / W images together hold the one-process batch (lpld.data.epoch_seeded)
    tseed = teacher_seed(cfg)
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

    module = ClassifierModule(
        model_cfg=to_container(cfg.model),
        num_classes=spec.num_classes,
        in_chans=spec.channels,
        img_size=spec.image_size,
        optim=st,
        label_smoothing=st["label_smoothing"],
        out_path=str(weights),
        meta={"dataset": spec.name, "config_fingerprint": cfg_fp, "seed": teacher_seed(cfg)},
    )
    ckpt = ModelCheckpoint(
        dirpath=str(out_dir),
        filename="epoch{epoch}",
        save_last=True,
        save_top_k=1,
        every_n_epochs=1,
        auto_insert_metric_name=False,
    )
    last = out_dir / "last.ckpt"
    resume = str(last) if last.exists() else None
    if resume:
        log.info("resuming teacher training from %s", last)
    logger = build_logger(cfg, "squeeze")
    try:
        trainer = build_trainer(
            cfg,
            logger=logger,
            callbacks=[ckpt, *extra_callbacks],
            max_epochs=st["epochs"],
            check_val_every_n_epoch=int(cfg.stage.val_every),
            use_distributed_sampler=False,  # the samplers above shard by rank themselves
        )
        trainer.fit(module, train_dl, val_dl, ckpt_path=resume, weights_only=True)
    finally:
        finish_logger(logger)
    dist.barrier()  # rank 0 wrote teacher.pt in on_fit_end; per-rank launches read it next
    if trainer.interrupted or not weights.exists():
        raise RuntimeError(f"teacher training was interrupted; rerun the same command to resume from {last}")
    blob = read_teacher_file(weights)
    if dist.rank() == 0:
        drop_aside(out_dir)
        release_lock(out_dir)
    log.info("teacher saved to %s: %s", weights, blob["val"])
    return dict(blob["val"])
