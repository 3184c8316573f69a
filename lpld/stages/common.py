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
from omegaconf import DictConfig, OmegaConf

from lpld import paths
from lpld.core.io import ArtifactError, fingerprint_state_dict

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


def read_teacher_file(path: Path) -> dict[str, Any]:
    """Read squeeze's teacher.pt ({state_dict, fingerprint, model, dataset, ...})."""
    fix = (
        "retrain it: rerun stage=squeeze with stage.overwrite=true and the same dataset/model overrides "
        "(`python run.py stage=squeeze stage.overwrite=true ...`; the old teacher folder is kept as teacher.replaced "
        "until the new teacher is written)"
    )
    try:
        # weights_only: tensors and plain containers only, so a tampered file cannot run code when it is read
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle opcode, refused global: all unusable
        raise ArtifactError(f"teacher weights {path} are corrupt or not a plain weights file ({e}); {fix}") from e
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise ArtifactError(f"{path} is not a teacher file written by stage=squeeze; {fix}")
    return blob


def load_teacher(cfg: DictConfig) -> tuple[torch.nn.Module, str]:
    """The teacher in eval mode and its fingerprint (sha256 over its weights).

    Source, in order: ``model.checkpoint`` (a local file), ``model.pretrained`` (published
    weights), else the teacher trained by ``stage=squeeze`` at its deterministic path.
    """
    model_cfg = cfg.model
    if model_cfg.get("checkpoint") or model_cfg.get("pretrained"):
        model = build_teacher_model(cfg)  # the registry loads the checkpoint / published weights
    else:
        path = paths.teacher_weights_path(cfg)
        if not path.exists():
            raise ArtifactError(
                f"no teacher at {path}. Train one with `python run.py stage=squeeze dataset={cfg.dataset.name} "
                f"model={cfg.model.name}`, or set model.checkpoint=/path/to/weights.pt or model.pretrained=true"
            )
        blob = read_teacher_file(path)
        model = build_teacher_model(cfg)
        try:
            model.load_state_dict(blob["state_dict"])
        except RuntimeError as e:
            raise ArtifactError(
                f"teacher at {path} does not fit model={cfg.model.name} for dataset={cfg.dataset.name}: {e}"
            ) from e
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, fingerprint_state_dict(model.state_dict())


def run_name(cfg: DictConfig, stage: str) -> str:
    return f"{stage}-{cfg.dataset.name}-{paths.teacher_key(cfg)}-ipc{cfg.ipc}-s{cfg.seed}"


def build_logger(cfg: DictConfig, stage: str, name: str | None = None):
    """Lightning logger from ``cfg.logger`` (wandb | csv | none); ``None`` for none."""
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
            group=stage,
            save_dir=str(save_dir),
            mode=str(cfg.logger.mode),
            config=to_container(cfg),
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


def log_images_uint8(
    logger: Any, key: str, images: torch.Tensor, step: int | None = None, caption: str | None = None
) -> None:
    """Log a grid of images to W&B. ``images``: uint8 (B, C, H, W) (float images save black in wandb 0.31)."""
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


def progress_enabled() -> bool:
    return os.environ.get("LPLD_NO_RICH", "0") != "1"


def build_trainer(cfg: DictConfig, logger: Any = None, callbacks: list | None = None, **overrides: Any):
    """A lightning.Trainer from the ``trainer`` preset (cpu, gpu, ddp, ddp_spawn, ddp_cpu).

    Precision: ``precision=`` passed by the stage (its own knob: ``recover.precision``, relabel's
    ``stage.precision``), else ``trainer.stage_precision[<stage name>]``, else ``trainer.precision``.
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


def recipe(cfg: DictConfig, section: str, key: str, default: Any = None, node: Any = None) -> Any:
    """A stage knob: ``<node>.<key>`` if set (node defaults to ``cfg.stage``), else the dataset's
    ``recipe.<section>.<key>`` (with its ``ipc_table`` override for ``cfg.ipc``), else ``default``.

    Per-dataset settings from the paper's Appendix C live in the dataset file's ``recipe``
    block; stage files leave them ``null`` so one command-line override still wins.
    """
    from lpld.data.recipe import recipe as dataset_recipe

    node = cfg.get("stage") if node is None else node
    v = node.get(key) if node is not None else None
    if v is not None:
        return v
    v = dataset_recipe(cfg.dataset, section, ipc=int(cfg.ipc) if "ipc" in cfg else None).get(key)
    return default if v is None else v
