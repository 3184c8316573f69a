"""Glue shared by the stages: teacher loading, loggers, trainers, dataset specs.

Everything here is thin: the algorithm lives in lpld.core; this module turns config into
Lightning objects and checks artifacts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lpld.artifacts import teacher as teacher_artifact
from lpld.config.frozen import Experiment, to_plain
from lpld.lit.display import progress_enabled

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


def dataset_spec(exp: Experiment) -> DatasetSpec:
    d = exp.dataset
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
    return to_plain(node)


def build_teacher_model(exp: Experiment) -> torch.nn.Module:
    """The teacher architecture for this dataset (weights per model.pretrained/checkpoint)."""
    from lpld.models import build_model

    spec = dataset_spec(exp)
    return build_model(exp.model, num_classes=spec.num_classes, in_chans=spec.channels, img_size=spec.image_size)


def _tag(fn: Any) -> str | None:
    try:
        v = fn()
    except Exception:  # noqa: BLE001 - a knob this stage does not resolve is left out of the name
        return None
    return None if v is None or v == "" else str(v)


def run_name(exp: Experiment, stage: str) -> str:
    """The W&B run name: ``<stage>-<method>-ipc<ipc>-<prune>-<quant tag>-s<seed>`` where they apply.

    student / relabel: all of them (student adds ``-hard`` for hard labels and the pruning metric when it is not
    random); recover / analyze: method, ipc, seed; squeeze / stats: the teacher; report: the results name.
    Unique within a pipeline (one run per step of its plan).
    """
    from lpld.artifacts import labels

    def g(key: str) -> Any:
        return exp.select(key)

    teacher = _tag(lambda: teacher_artifact.teacher_name(exp))
    method, ipc, seed = _tag(lambda: g("recover.name")), _tag(lambda: int(exp.ipc)), _tag(lambda: int(exp.seed))
    if stage in ("squeeze", "stats"):
        parts = [stage, _tag(lambda: g("dataset.name")), teacher]
    elif stage == "report":
        res = _tag(lambda: g("stage.results"))
        parts = [stage, _tag(lambda: g("stage.results_name")) or (Path(res).stem if res else "all")]
    elif stage in ("recover", "analyze"):
        parts = [stage, method, ipc and f"ipc{ipc}", seed and f"s{seed}"]
    elif stage in ("relabel", "student"):
        parts = [
            stage,
            method,
            ipc and f"ipc{ipc}",
            _tag(lambda: g("prune.name")),
            _tag(lambda: labels.quant_config(exp).tag),
        ]
        if stage == "student":
            metric = _tag(lambda: g("metric.name"))
            parts += [metric if metric not in (None, "random") else None]
            parts += ["hard" if _tag(lambda: g("student.loss")) == "ce" else None]
        parts.append(seed and f"s{seed}")
    else:
        parts = [stage, _tag(lambda: g("dataset.name")), teacher, ipc and f"ipc{ipc}", seed and f"s{seed}"]
    return "-".join(p for p in parts if p)


def run_group(exp: Experiment) -> str | None:
    """The W&B group of this run: ``logger.group`` (a pipeline sets one per invocation for its steps:
    :func:`pipeline_group`), else the Hydra multirun's name (``<config name>-<sweep dir name>``), else None (a
    lone run is not grouped)."""
    group = exp.logger.get("group") if exp.get("logger") is not None else None
    if group:
        return str(group)
    return exp.sweep_group  # the Hydra multirun's group, recorded when the experiment was frozen


def pipeline_group(exp: Experiment, results_name: str) -> str:
    """The W&B group of one pipeline invocation's steps: the sweep's group inside a multirun (all its jobs form one
    group), else ``<results name>-<YYYYmmdd-HHMMSS>`` decided once, when the pipeline starts."""
    import time

    return exp.sweep_group or f"{results_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def logged_config(exp: Experiment, store_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """What W&B records as the run's config: :func:`lpld.config.experiment.experiment_config`, the same mapping
    ``stage=show`` prints and the results records carry (the student passes its store's manifest)."""
    from lpld.config.experiment import experiment_config
    from lpld.errors import ConfigError

    try:
        return experiment_config(exp, store_manifest)
    except ConfigError as e:  # the stage itself refuses the config with the same message, naming the fix
        log.debug("resolved experiment unavailable for the logger (%s)", e)
        return {}


def build_logger(exp: Experiment, stage: str, name: str | None = None, store_manifest: dict[str, Any] | None = None):
    """Lightning logger from ``exp.logger`` (wandb | csv | none); ``None`` for none.

    W&B: the runs of one pipeline or sweep share a ``group`` (:func:`run_group`), ``job_type`` is the stage,
    and the run's config is the resolved spec (:func:`logged_config`).
    """
    kind = str(exp.logger.name)
    if kind == "none":
        return None
    save_dir = Path(str(exp.logger.dir)).expanduser()
    save_dir.mkdir(parents=True, exist_ok=True)
    name = name or run_name(exp, stage)
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(save_dir), name=name)
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        from lpld.lit.display import debug_console

        if not debug_console():
            os.environ.setdefault("WANDB_SILENT", "true")  # no `wandb:` lines unless the user asked (WANDB_SILENT)
        wl = WandbLogger(
            project=str(exp.logger.project),
            entity=exp.logger.get("entity"),
            name=name,
            group=run_group(exp),
            job_type=stage,
            save_dir=str(save_dir),
            mode=str(exp.logger.mode),
            config=logged_config(exp, store_manifest),
        )
        init = getattr(wl, "_wandb_init", None)
        if isinstance(init, dict) and init.get("anonymous") is None:
            init.pop("anonymous", None)  # Lightning passes None: wandb >= 0.19 warns "anonymous has no effect"
        return wl
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


def log_summary(logger: Any, values: dict[str, Any]) -> None:
    """Set the run's summary (W&B: ``run.summary``, the values a dashboard's runs table shows; other loggers:
    logged as metrics). Rank 0 only; the values are stored as given (the record's floats, unrounded)."""
    if logger is None or not values:
        return
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update(dict(values))
    else:
        num = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        if num:
            logger.log_metrics(num)


def build_trainer(exp: Experiment, logger: Any = None, callbacks: list | None = None, **overrides: Any):
    """A lightning.Trainer from the ``trainer`` preset (cpu, gpu, ddp, ddp_spawn, ddp_cpu).

    Precision: ``precision=`` passed by the stage (its own knob: ``recover.precision``, relabel's
    ``relabel.precision``), else ``trainer.stage_precision[<stage name>]``, else ``trainer.precision``.
    On a CUDA device the preset's ``trainer.perf`` options apply (``lpld.lit.perf``: cuDNN benchmark,
    TF32, channels_last, torch.compile); a CPU run is untouched by them.
    """
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from lpld import dist
    from lpld.lit.display import progress_every, timed_progress
    from lpld.lit.perf import GpuPerf, PerfOptions, apply_backend_flags, resolve_precision

    t = exp.trainer
    stage = exp.stage.get("name") if exp.get("stage") is not None else None
    precision = resolve_precision(t, None if stage is None else str(stage), overrides.pop("precision", None))
    perf = PerfOptions.from_cfg(t.get("perf"))
    apply_backend_flags(perf, str(t.accelerator))
    callbacks = [*(callbacks or []), GpuPerf(perf)]
    wanted = overrides.pop("enable_progress_bar", True)
    bar = progress_enabled() and wanted
    if bar:
        callbacks.append(RichProgressBar(leave=True) if _rich_ok() else TQDMProgressBar())
    elif wanted and progress_every() > 0 and stage != "recover":  # recover prints its own (iterations)
        callbacks.append(timed_progress(str(stage or "lpld")))  # non-TTY (SLURM log): a plain line every N s
    kwargs: dict[str, Any] = dict(
        accelerator=str(t.accelerator),
        devices=t.devices,
        num_nodes=int(t["num_nodes"]),
        strategy=dist.trainer_strategy(str(t.strategy)),  # DDP: the process-group timeout of lpld.dist
        precision=precision,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=bool(bar),
        enable_model_summary=False,
        default_root_dir=str(Path(str(exp.paths.log_dir)).expanduser()),
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


def num_workers(exp: Experiment) -> int:
    return int(exp.trainer["num_workers"])
