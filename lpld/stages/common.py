"""Glue shared by the stages: teacher loading, loggers, trainers, dataset specs.

Everything here is thin: the algorithm lives in lpld.core; this module turns config into
Lightning objects and checks artifacts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from lpld.artifacts import teacher as teacher_artifact
from lpld.lit.display import log_images_uint8, progress_enabled  # noqa: F401 - moved to lit; re-exported

log = logging.getLogger("lpld")


@dataclass(frozen=True)
class DatasetSpec:
    """What a model / image writer needs to know about a dataset."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def dataset_spec(cfg: DictConfig) -> DatasetSpec:
    d = cfg.dataset
    return DatasetSpec(
        name=str(d.name),
        num_classes=int(d.num_classes),
        channels=int(d.channels),
        image_size=int(d.image_size),
        mean=tuple(float(v) for v in d.mean),
        std=tuple(float(v) for v in d.std),
    )


def to_container(node: Any) -> Any:
    """A resolved plain-python copy of a config node (for hparams, manifests, W&B)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build_teacher_model(cfg: DictConfig) -> torch.nn.Module:
    """The teacher architecture for this dataset (weights per model.pretrained/checkpoint)."""
    from lpld.models import build_model

    spec = dataset_spec(cfg)
    return build_model(cfg.model, num_classes=spec.num_classes, in_chans=spec.channels, img_size=spec.image_size)


# the teacher artifact (path, reading, loading) lives in lpld.artifacts.teacher; old names kept
read_teacher_file, load_teacher = teacher_artifact.read, teacher_artifact.load


def run_name(cfg: DictConfig, stage: str) -> str:
    return f"{stage}-{cfg.dataset.name}-{teacher_artifact.teacher_name(cfg)}-ipc{cfg.ipc}-s{cfg.seed}"


def run_group(cfg: DictConfig) -> str | None:
    """The W&B group of this run: ``logger.group`` (the pipeline sets its results name for every step), else
    the Hydra multirun's name (``<config name>-<sweep dir name>``), else None (a lone run is not grouped)."""
    group = cfg.logger.get("group") if cfg.get("logger") is not None else None
    if group:
        return str(group)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not launched through @hydra.main (compose API, tests)
        return None
    if hc.mode == RunMode.MULTIRUN:
        return f"{hc.job.config_name}-{Path(str(hc.sweep.dir)).name}"
    return None


def logged_config(cfg: DictConfig) -> dict[str, Any]:
    """What W&B records as the run's config: the resolved spec (``lpld.config.resolve``), i.e. the values the
    stage uses after the precedence, plus the trainer / logger presets that are not knob groups."""
    from lpld.config import resolve
    from lpld.errors import ConfigError

    try:
        spec = resolve(cfg).to_dict()
    except ConfigError as e:  # the stage itself refuses the config with the same message, naming the fix
        log.debug("resolved spec unavailable for the logger (%s)", e)
        spec = {}
    return {**spec, "trainer": to_container(cfg.get("trainer")), "overrides": _task_overrides()}


def _task_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


def build_logger(cfg: DictConfig, stage: str, name: str | None = None):
    """Lightning logger from ``cfg.logger`` (wandb | csv | none); ``None`` for none.

    W&B: the runs of one pipeline or sweep share a ``group`` (:func:`run_group`), ``job_type`` is the stage,
    and the run's config is the resolved spec (:func:`logged_config`).
    """
    kind = str(cfg.logger.name)
    if kind == "none":
        return None
    save_dir = Path(str(cfg.logger.dir)).expanduser()
    save_dir.mkdir(parents=True, exist_ok=True)
    name = name or run_name(cfg, stage)
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(save_dir), name=name)
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(
            project=str(cfg.logger.project),
            entity=cfg.logger.get("entity"),
            name=name,
            group=run_group(cfg),
            job_type=stage,
            save_dir=str(save_dir),
            mode=str(cfg.logger.mode),
            config=logged_config(cfg),
        )
    raise ValueError(f"unknown logger '{kind}'; choose logger=wandb|csv|none")


def finish_logger(logger: Any) -> None:
    """Close a W&B run (always call in a ``finally``)."""
    if logger is None:
        return
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish()
    else:
        try:
            logger.finalize("success")
        except Exception:  # noqa: BLE001 - finalising a csv logger twice is harmless
            pass


def log_metrics(logger: Any, metrics: dict[str, float], step: int | None = None) -> None:
    """Log namespaced scalars (``train/loss``...) outside a Trainer loop."""
    if logger is not None:
        logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def build_trainer(cfg: DictConfig, logger: Any = None, callbacks: list | None = None, **overrides: Any):
    """A lightning.Trainer from the ``trainer`` preset (cpu, gpu, ddp, ddp_spawn, ddp_cpu).

    Precision: ``precision=`` passed by the stage (its own knob: ``recover.precision``, relabel's
    ``relabel.precision``), else ``trainer.stage_precision[<stage name>]``, else ``trainer.precision``.
    On a CUDA device the preset's ``trainer.perf`` options apply (``lpld.lit.perf``: cuDNN benchmark,
    TF32, channels_last, torch.compile); a CPU run is untouched by them.
    """
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from lpld.lit.perf import GpuPerf, PerfOptions, apply_backend_flags, resolve_precision

    t = cfg.trainer
    stage = cfg.stage.get("name") if cfg.get("stage") is not None else None
    precision = resolve_precision(t, None if stage is None else str(stage), overrides.pop("precision", None))
    perf = PerfOptions.from_cfg(t.get("perf"))
    apply_backend_flags(perf, str(t.accelerator))
    callbacks = [*(callbacks or []), GpuPerf(perf)]
    bar = progress_enabled() and overrides.pop("enable_progress_bar", True)
    if bar:
        callbacks.append(RichProgressBar(leave=True) if _rich_ok() else TQDMProgressBar())
    kwargs: dict[str, Any] = dict(
        accelerator=str(t.accelerator),
        devices=t.devices,
        num_nodes=int(t.get("num_nodes", 1)),
        strategy=str(t.strategy),
        precision=precision,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=bool(bar),
        enable_model_summary=False,
        default_root_dir=str(Path(str(cfg.paths.log_dir)).expanduser()),
        deterministic=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def _rich_ok() -> bool:
    try:
        import rich  # noqa: F401

        return True
    except ImportError:
        return False


def num_workers(cfg: DictConfig) -> int:
    return int(cfg.trainer.get("num_workers", 0))
