"""Stage ``recover``: synthesise the distilled images (lpld, lpld_c, sre2l, cda, rded, random_real).

This module turns the config into a :class:`RecoverJob` (resolved knobs, class range, device
batches), checks the inputs, prepares/validates the output folder, runs
:class:`lpld.lit.recover_module.RecoverModule` under a Lightning Trainer (``trainer.predict``;
with DDP, rank r takes device batches r, r+W, ...), and writes the manifest.

Output identity: ``config_fingerprint`` covers everything that changes the bytes (method and
its knobs, ipc, seed, dataset geometry, teacher and stats fingerprints) but not
``classes_per_batch`` or the class range, which only decide how the work is split. Every
finished class leaves a ``.recover.json`` record in its folder; a rerun with the same config
skips device batches whose classes are all recorded (resume), and refuses a folder written with
another config unless ``recover.overwrite=true``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lpld.artifacts import images as images_artifact
from lpld.artifacts import stats as stats_artifact
from lpld.config import recover_settings
from lpld.config.frozen import Experiment
from lpld.core.images import read_manifest
from lpld.core.io import (
    ArtifactError,
    fingerprint_obj,
    fingerprint_tensors,
)
from lpld.core.recover_job import RecoverJob
from lpld.core.recover_methods import get_recover_method
from lpld.stages import ConfigError

log = logging.getLogger("lpld")


def _get(node: Any, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    v = node.get(key) if hasattr(node, "get") else None
    return default if v is None else v


def class_range(exp: Experiment, settings: dict[str, Any]) -> list[int]:
    """The classes this run synthesises (recover.class_start .. class_end - 1)."""
    n = int(exp.dataset.num_classes)
    start = int(_get(exp.recover, "class_start", 0))
    end_v = _get(exp.recover, "class_end")
    end = n if end_v is None else int(end_v)
    if not 0 <= start < end <= n:
        raise ConfigError(
            f"class range [{start}, {end}) is outside the dataset's {n} classes; "
            f"use 0 <= recover.class_start < recover.class_end <= {n}"
        )
    g = settings.get("group_classes")
    if g and (start % g or (end % g and end != n)):
        raise ConfigError(
            f"{settings['name']} couples classes in groups of recover.group_classes={g}; the class range "
            f"[{start}, {end}) must start and end on a group boundary (multiples of {g}, or end at {n})"
        )
    return list(range(start, end))


def plan_batches(
    settings: dict[str, Any], classes: list[int], ipc: int, classes_per_batch: int
) -> list[list[list[int]]]:
    """Device batches -> units -> class ids. A unit holds the classes that must be optimised together."""
    if classes_per_batch < 1:
        raise ConfigError(f"recover.classes_per_batch must be >= 1, got {classes_per_batch}")
    units = get_recover_method(settings["name"]).plan(classes, ipc, settings)  # lpld.core.recover_methods
    per = max(1, classes_per_batch // max(len(u) for u in units))
    return [units[i : i + per] for i in range(0, len(units), per)]


def identity(job_base: dict[str, Any]) -> str:
    """config_fingerprint of what determines the bytes."""
    return fingerprint_obj(job_base)


def _check_stats(stats: dict[str, Any], teacher: torch.nn.Module, num_classes: int, classes: list[int], path: Path):
    from lpld.core.bn_hooks import bn_layers

    layers = bn_layers(teacher)
    names = [n for n, _ in layers]
    if list(stats["layers"]) != names:
        raise ArtifactError(
            f"stats at {path} list BN layers {list(stats['layers'])[:3]}... but the teacher has "
            f"{names[:3]}...; rerun `stage=stats` for this teacher"
        )
    for (n, m), mu, var in zip(layers, stats["mean"], stats["var"]):
        if tuple(mu.shape) != (num_classes, m.num_features) or tuple(var.shape) != (num_classes, m.num_features):
            raise ArtifactError(
                f"stats at {path}: layer {n} has shape {tuple(mu.shape)}, expected "
                f"({num_classes}, {m.num_features}); rerun `stage=stats`"
            )
    count = stats["count"]
    missing = [c for c in classes if int(count[c]) == 0 or not torch.isfinite(stats["mean"][0][c]).all()]
    if missing:
        raise ArtifactError(
            f"stats at {path} have no images of classes {missing[:10]}; class-wise supervision "
            "needs them. Use recover=lpld_c for those classes or fix the train set"
        )


def classes_per_batch(exp: Experiment, classes: list[int]) -> int:
    """Classes optimised together in one device batch: ``recover.classes_per_batch``, or auto."""
    cpb = _get(exp.recover, "classes_per_batch", None)
    if cpb is None:
        # auto: fill device batches up to max_batch_images. Small batches are overhead-bound
        # (measured on CPU: 10-image batches of a 28 px ConvNet ran ~10x slower per image).
        cpb = max(1, int(_get(exp.recover, "max_batch_images", 256)) // max(1, int(exp.ipc)))
        # ...but give every rank at least one device batch (Lightning refuses an empty rank); the split
        # does not change any image (each class's objective is independent of its batch mates)
        cpb = min(int(cpb), max(1, -(-len(classes) // _planned_world(exp))))
    return int(cpb)


def planned_device_rows(exp: Experiment) -> tuple[int, int]:
    """(images in the largest device batch, device batches) of this experiment's recover, from the config alone
    (``stage=plan``)."""
    settings = recover_settings(exp)
    classes = class_range(exp, settings)
    batches = plan_batches(settings, classes, int(exp.ipc), classes_per_batch(exp, classes))
    return max((sum(len(u) for u in b) for b in batches), default=0) * int(exp.ipc), len(batches)


def build_job(exp: Experiment, teacher: torch.nn.Module, teacher_fp: str) -> RecoverJob:
    """Resolve and validate everything (raises before anything is written)."""
    from lpld.stages.common import dataset_spec

    settings = recover_settings(exp)
    meth = get_recover_method(settings["name"])
    spec = dataset_spec(exp)
    classes = class_range(exp, settings)
    rc = exp.recover
    allow_other = bool(_get(rc, "allow_other_teacher", False))
    stats_fp, stats_path = None, None
    if meth.classwise:
        from lpld.core.bnstats import load_classwise_stats

        p = Path(str(_get(rc, "stats_path"))) if _get(rc, "stats_path") else stats_artifact.path(exp)
        if not p.exists():
            raise ArtifactError(
                f"recover={settings['name']} needs class-wise BN statistics at {p}; run "
                f"`python run.py stage=stats dataset={exp.dataset.name} model={exp.model.name}` first "
                "(or recover.stats_path=/path/to/stats.pt)"
            )
        stats = load_classwise_stats(p, teacher_fp, allow_other_teacher=allow_other)
        _check_stats(stats, teacher, spec.num_classes, classes, p)
        stats_fp = fingerprint_tensors([*stats["mean"], *stats["var"]])
        stats_path = str(p)
    names = _class_names(exp, spec.num_classes)
    cpb = classes_per_batch(exp, classes)
    batches = plan_batches(settings, classes, int(exp.ipc), cpb)
    world = _planned_world(exp)
    if len(batches) < world:
        raise ConfigError(
            f"recover has {len(batches)} device batches for {world} ranks (Lightning needs one per rank); lower "
            f"recover.classes_per_batch (now {cpb}) or run on fewer devices (trainer.devices)"
        )
    ident = {
        "settings": settings,
        "ipc": int(exp.ipc),
        "seed": int(exp.seed),
        "dataset": {
            "name": spec.name,
            "num_classes": spec.num_classes,
            "channels": spec.channels,
            "image_size": spec.image_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "teacher": teacher_fp,
        "stats": stats_fp,
    }
    return RecoverJob(
        method=settings["name"],
        kind=meth.kind,
        out_dir=str(images_artifact.path(exp)),
        ipc=int(exp.ipc),
        seed=int(exp.seed),
        num_classes=spec.num_classes,
        channels=spec.channels,
        image_size=spec.image_size,
        mean=list(spec.mean),
        std=list(spec.std),
        class_names=names,
        settings=settings,
        batches=batches,
        teacher_fingerprint=teacher_fp,
        stats_fingerprint=stats_fp,
        stats_path=stats_path,
        config_fingerprint=identity(ident),
        progress_every=int(_get(exp.stage, "progress_every", 25)),
        log_images=bool(_get(exp.stage, "log_images", True)) and bool(_get(exp.logger, "log_images", True)),
        extra={"dataset": spec.name, "classes_per_batch": cpb},
    )


def _class_names(exp: Experiment, n: int) -> list[str]:
    """Class names from the dataset (the images' folder names); falls back to indices."""
    names = _get(exp.dataset, "class_names")
    if names is not None and len(names) == n:
        return [str(x) for x in names]
    try:
        from lpld.data import build_dataset

        ds = build_dataset(exp.dataset, "train")
        if len(ds.classes) == n:
            return [str(x) for x in ds.classes]
    except Exception as e:  # noqa: BLE001 - names are cosmetic; a missing dataset fails later where it matters
        log.debug("class names unavailable (%s); using indices", e)
    return [str(i) for i in range(n)]


def run(exp: Experiment) -> dict[str, Any]:
    """Synthesise (or resume) the distilled images at ``lpld.artifacts.images.path(exp)``."""
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.lit.recover_module import RecoverModule
    from lpld.stages.common import build_logger, build_trainer, finish_logger, to_container

    teacher, teacher_fp = teacher_artifact.load(exp)
    job = build_job(exp, teacher, teacher_fp)
    check_feasible(exp, job)  # before the output folder exists: a refused config leaves nothing behind
    from lpld import dist

    # rank 0 decides fresh / resume / done and creates the folder; every rank takes its decision (a child
    # re-launched by Lightning starts inside rank 0's Trainer, after rank 0 prepared: it resumes)
    state = dist.decide(
        lambda: images_artifact.prepare(job, bool(_get(exp.recover, "overwrite", False))),
        follow="resume",
        accelerator=dist.accelerator_of(exp),
    )
    if state == "done":
        log.info("distilled images at %s are complete for this config; nothing to do", job.out_dir)
        return {"out_dir": job.out_dir, "state": state, **_summary(read_manifest(job.out_dir))}
    log.info(
        "recover %s: %d classes in %d device batches -> %s (%s)",
        job.method,
        len(job.classes),
        len(job.batches),
        job.out_dir,
        state,
    )
    module = RecoverModule(teacher, asdict(job), to_container(exp.dataset), int(exp.trainer["num_workers"] or 0))
    logger = build_logger(exp, "recover")
    try:
        trainer = build_trainer(
            exp,
            logger=logger,
            enable_progress_bar=False,
            use_distributed_sampler=False,
            inference_mode=False,
            precision=job.settings.get("precision", "32-true"),
        )
        trainer.predict(module, return_predictions=False)
    finally:
        finish_logger(logger)
    man = read_manifest(job.out_dir) or {}
    return {"out_dir": job.out_dir, "state": state, **_summary(man)}


def check_real_images(exp: Experiment, job: RecoverJob) -> None:
    """recover=random_real copies ``ipc`` distinct real images of every class: refuse an ipc above the smallest
    class of the train set, naming that class and the largest ipc that works.

    Raises:
        ConfigError: before the output folder is created.
    """
    from collections import Counter

    from lpld.data import build_dataset
    from lpld.stages.common import to_container

    ds = dict(to_container(exp.dataset))
    if ds.get("in_memory"):
        ds["in_memory"] = False  # only the labels are counted: list the files, decode nothing
    counts = Counter(build_dataset(ds, "train").targets)
    short = [(counts.get(c, 0), c) for c in job.classes if counts.get(c, 0) < job.ipc]
    if short:
        have, c = min(short)
        name = job.class_names[c] if c < len(job.class_names) else str(c)
        largest = min(counts.get(k, 0) for k in job.classes)
        raise ConfigError(
            f"recover={job.method} ipc={job.ipc} needs {job.ipc} real images of every class, but class {c} ({name}) "
            f"has only {have} in the train set ({len(short)} class(es) too small); set ipc<={largest}, or use a "
            "recover method that synthesises images (e.g. recover=lpld)"
        )


def device_batch_rows(job: RecoverJob) -> int:
    """Images in the largest device batch (its classes x ipc)."""
    return max((sum(len(unit) for unit in batch) for batch in job.batches), default=0) * job.ipc


def device_batch_bytes(exp: Experiment, job: RecoverJob) -> int:
    """fp32 bytes of the largest device batch an optimising method holds at once: the images, their gradient,
    Adam's two moments, and the teacher's activations kept for the backward pass to the images (measured as
    ``stage=plan`` does, one forward on the ``meta`` device)."""
    from lpld.stages.common import to_container
    from lpld.stages.plan import _model, activation_bytes_per_sample

    rows, chw = device_batch_rows(job), job.channels * job.image_size**2
    try:
        meta = _model(to_container(exp.model), job.num_classes, job.channels, job.image_size)
        act, _ = activation_bytes_per_sample(meta, job.channels, job.image_size)
    except Exception as e:  # noqa: BLE001 - an architecture the meta device cannot run: the images alone
        log.debug("recover memory check without activations (%s)", e)
        act = 0
    return rows * (chw * 4 * 4 + act * 4)


def check_feasible(exp: Experiment, job: RecoverJob) -> None:
    """Refuse what cannot finish, before anything is written: too few real images for random_real, device batches
    larger than the memory (``lpld.stages.preflight.check_fits``)."""
    from lpld.stages.preflight import check_fits

    if job.kind == "random_real":
        check_real_images(exp, job)
    elif job.kind == "optimize":
        check_fits(
            exp,
            device_batch_bytes(exp, job),
            f"a device batch of {device_batch_rows(job):,d} images being optimised (fp32 images, gradients, Adam "
            "moments and the teacher's activations)",
            "lower ipc (a class's ipc images are optimised together) or recover.classes_per_batch, or run on a "
            "machine with more memory",
            source="predicted from the config before anything is written",
        )


def _planned_world(exp: Experiment) -> int:
    from lpld.dist import planned_world_size

    return planned_world_size(exp) if exp.get("trainer") is not None else 1


def _summary(man: dict[str, Any] | None) -> dict[str, Any]:
    man = man or {}
    losses = [v.get("total") for v in (man.get("per_class_loss") or {}).values() if v.get("total") is not None]
    return {
        "complete": bool(man.get("complete")),
        "classes_done": int(man.get("classes_done", 0)),
        "images_fingerprint": man.get("images_fingerprint"),
        "mean_final_loss": float(sum(losses) / len(losses)) if losses else None,
    }
