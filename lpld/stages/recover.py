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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lpld import paths
from lpld.core.images import MANIFEST, class_dir_name, image_hashes, images_fingerprint, list_pngs, read_manifest
from lpld.core.io import (
    ArtifactError,
    acquire_lock,
    atomic_write_json,
    drop_aside,
    fingerprint_obj,
    fingerprint_tensors,
    move_aside,
    read_json,
    release_lock,
)
from lpld.stages import ConfigError

log = logging.getLogger("lpld")

# method -> how its images are made
METHODS: dict[str, dict[str, Any]] = {
    "lpld": {"kind": "optimize", "batching": "class", "classwise": True},
    "lpld_c": {"kind": "optimize", "batching": "class", "classwise": False},
    "sre2l": {"kind": "optimize", "batching": "slot", "classwise": False},
    "cda": {"kind": "optimize", "batching": "slot", "classwise": False},
    "rded": {"kind": "rded"},
    "random_real": {"kind": "random_real"},
}
RECORD = ".recover.json"
# knobs read from recover.<key>, else dataset.recipe.recover.<key>, else this default
RECIPE_DEFAULTS: dict[str, Any] = {
    "iterations": 1000,
    "lr": 0.1,
    "alpha": 0.05,
    "first_bn_multiplier": 10.0,
    "tv_l2": 1.0e-4,
    "l2": 1.0e-5,
    "jitter": 4,
    "betas": [0.5, 0.9],
}


@dataclass
class RecoverJob:
    """Everything a RecoverModule needs (plain values only, so it pickles into DDP ranks)."""

    method: str
    kind: str
    out_dir: str
    ipc: int
    seed: int
    num_classes: int
    channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    class_names: list[str]
    settings: dict[str, Any]
    batches: list[list[list[int]]]  # device batch -> units -> class ids
    teacher_fingerprint: str
    stats_fingerprint: str | None
    stats_path: str | None
    config_fingerprint: str
    progress_every: int = 25
    log_images: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[int]:
        return [c for b in self.batches for u in b for c in u]

    def class_dir(self, c: int) -> Path:
        return Path(self.out_dir) / class_dir_name(c, self.class_names[c])


def _get(node: Any, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    v = node.get(key) if hasattr(node, "get") else None
    return default if v is None else v


def resolve_settings(cfg: DictConfig) -> dict[str, Any]:
    """Resolved recover knobs (recover.<key> > dataset recipe > defaults), validated.

    Raises:
        ConfigError: unknown method, bad numbers, unsupported init.
    """
    from lpld.data.recipe import recipe

    rc = cfg.recover
    name = str(rc.name)
    if name not in METHODS:
        raise ConfigError(f"unknown recover method '{name}'; choose recover=<{'|'.join(METHODS)}>")
    ipc = int(cfg.ipc)
    if ipc < 1:
        raise ConfigError(f"ipc must be >= 1 (images per class), got {ipc}")
    rec = recipe(cfg.dataset, "recover", ipc)
    s: dict[str, Any] = {"name": name}
    for k, d in RECIPE_DEFAULTS.items():
        v = _get(rc, k)
        s[k] = v if v is not None else rec.get(k, d)
        if s[k] is None:
            s[k] = d
    s["betas"] = [float(b) for b in s["betas"]]
    for k in ("iterations", "jitter"):
        s[k] = int(s[k])
    for k in ("lr", "alpha", "first_bn_multiplier", "tv_l2", "l2"):
        s[k] = float(s[k])
    s["rrc_scale_min"] = float(_get(rc, "rrc_scale_min", 0.08))
    s["rrc_scale_max"] = float(_get(rc, "rrc_scale_max", 1.0))
    s["flip"] = bool(_get(rc, "flip", True))
    s["init"] = str(_get(rc, "init", "random"))
    s["precision"] = str(_get(rc, "precision", "32-true"))
    if s["iterations"] < 1 or s["lr"] <= 0 or s["jitter"] < 0:
        # 0 iterations would write the Gaussian-noise initialisation as finished distilled images
        bad = {k: s[k] for k in ("iterations", "lr", "jitter")}
        raise ConfigError(
            f"recover.iterations >= 1, recover.lr > 0 and recover.jitter >= 0 are required, got {bad}; set e.g. "
            "recover.iterations=1000 (for real images without synthesis use recover=random_real)"
        )
    if not 0 < s["rrc_scale_min"] <= s["rrc_scale_max"] <= 1:
        raise ConfigError("need 0 < recover.rrc_scale_min <= recover.rrc_scale_max <= 1")
    if s["init"] != "random":
        raise ConfigError(f"recover.init={s['init']} is not supported; the only initialisation is 'random' (Table 11)")
    meth = METHODS[name]
    if meth["kind"] == "optimize" and meth["batching"] == "slot":
        g = _get(rc, "group_classes")
        s["group_classes"] = int(g) if g is not None else min(int(cfg.dataset.num_classes), 100)
        if s["group_classes"] < 1:
            raise ConfigError("recover.group_classes must be >= 1")
    if name == "cda":
        cda = _get(rc, "cda", {}) or {}
        s["cda"] = {"schedule": str(_get(cda, "schedule", "cosine")), "milestone": float(_get(cda, "milestone", 1.0))}
        if s["cda"]["schedule"] not in ("step", "linear", "cosine") or not 0 <= s["cda"]["milestone"] <= 1:
            raise ConfigError("recover.cda.schedule must be step|linear|cosine and recover.cda.milestone in [0, 1]")
    if name == "rded":
        r = _get(rc, "rded", {}) or {}
        cs = list(_get(r, "crop_scale", [0.08, 1.0]))
        s["rded"] = {
            "factor": int(_get(r, "factor", 2)),
            "candidates_per_class": int(_get(r, "candidates_per_class", 300)),
            "crops_per_image": int(_get(r, "crops_per_image", 5)),
            "crop_scale": [float(cs[0]), float(cs[1])],
            "style": str(_get(r, "style", "official")),  # official: RDED's square half-size crops | lpld
        }
        if s["rded"]["factor"] < 1 or s["rded"]["crops_per_image"] < 1:
            raise ConfigError("recover.rded.factor and recover.rded.crops_per_image must be >= 1")
        if s["rded"]["style"] not in ("official", "lpld"):
            raise ConfigError(f"recover.rded.style must be official|lpld, got {s['rded']['style']!r}")
    if meth["kind"] != "optimize":  # knobs that do not affect these methods stay out of the identity
        for k in (*RECIPE_DEFAULTS, "rrc_scale_min", "rrc_scale_max", "flip", "init"):
            s.pop(k, None)
    return s


def class_range(cfg: DictConfig, settings: dict[str, Any]) -> list[int]:
    """The classes this run synthesises (recover.class_start .. class_end - 1)."""
    n = int(cfg.dataset.num_classes)
    start = int(_get(cfg.recover, "class_start", 0))
    end_v = _get(cfg.recover, "class_end")
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
    from lpld.core.synthesis import plan_units

    if classes_per_batch < 1:
        raise ConfigError(f"recover.classes_per_batch must be >= 1, got {classes_per_batch}")
    meth = METHODS[settings["name"]]
    if meth["kind"] == "optimize":
        units = [
            list(u.classes)
            for u in plan_units(classes, ipc, meth["batching"], meth["classwise"], settings.get("group_classes", 1))
        ]
    else:
        units = [[c] for c in classes]
    per = max(1, classes_per_batch // max(len(u) for u in units))
    return [units[i : i + per] for i in range(0, len(units), per)]


def identity(job_base: dict[str, Any]) -> str:
    """config_fingerprint of what determines the bytes."""
    return fingerprint_obj(job_base)


def class_done(job: RecoverJob, c: int) -> bool:
    """Class c is finished: its record matches this config and all its PNGs exist."""
    d = job.class_dir(c)
    rec_path = d / RECORD
    if not rec_path.exists():
        return False
    try:
        rec = read_json(rec_path)
    except ArtifactError:
        return False
    if rec.get("config_fingerprint") != job.config_fingerprint:
        return False
    return all((d / f"{j:05d}.png").exists() for j in range(job.ipc))


def write_class_record(job: RecoverJob, c: int, losses: dict[str, float]) -> None:
    atomic_write_json(
        job.class_dir(c) / RECORD, {"class": c, "config_fingerprint": job.config_fingerprint, "loss": losses}
    )


def base_manifest(job: RecoverJob) -> dict[str, Any]:
    return {
        "method": job.method,
        "config": job.settings,
        "config_fingerprint": job.config_fingerprint,
        "seed": job.seed,
        "ipc": job.ipc,
        "num_classes": job.num_classes,
        "dataset": job.extra.get("dataset"),
        "image_size": job.image_size,
        "channels": job.channels,
        "mean": job.mean,
        "std": job.std,
        "class_names": job.class_names,
        "teacher_fingerprint": job.teacher_fingerprint,
        "stats_fingerprint": job.stats_fingerprint,
    }


def finalize_manifest(job: RecoverJob) -> dict[str, Any]:
    """Collect the class records and write manifest.json (complete when every class is done)."""
    out = Path(job.out_dir)
    per_class: dict[str, Any] = {}
    for c in range(job.num_classes):
        if class_done(job, c):
            per_class[str(c)] = read_json(job.class_dir(c) / RECORD)["loss"]
    man = base_manifest(job)
    man["per_class_loss"] = per_class
    man["classes_done"] = len(per_class)
    man["complete"] = len(per_class) == job.num_classes
    man["images_fingerprint"] = images_fingerprint(out) if man["complete"] else None
    man["file_hashes"] = image_hashes(out) if man["complete"] else None  # checked file by file on load
    atomic_write_json(out / MANIFEST, man)
    if man["complete"]:
        drop_aside(out)  # recover.overwrite=true kept the replaced images until now
        release_lock(out)
    return man


def prepare_output(job: RecoverJob, overwrite: bool) -> str:
    """Check the output folder; returns 'fresh', 'resume' or 'done'.

    Raises:
        ArtifactError: the folder holds images from a different config (or images without a
            manifest) and ``overwrite`` is false.
    """
    out = Path(job.out_dir)
    acquire_lock(out, "distilled images")  # one writer per images folder (released when complete / at exit)
    man = read_manifest(out) if out.exists() else None
    has_pngs = bool(list_pngs(out))
    if man is None and not has_pngs:
        state = "fresh"
    elif man is not None and man.get("config_fingerprint") == job.config_fingerprint and not overwrite:
        state = "done" if man.get("complete") else "resume"
    elif not overwrite:
        what = (
            (
                f"images from a different config (method {man.get('method')}, teacher "
                f"{man.get('teacher_fingerprint')}, config {man.get('config_fingerprint')})"
            )
            if man
            else ("PNG images without a manifest")
        )
        raise ArtifactError(
            f"{out} holds {what}; this run's config is {job.config_fingerprint}. Pass recover.overwrite=true to "
            "replace them, or change seed/ipc/method so the run gets its own folder"
        )
    else:
        move_aside(out)  # kept as <folder>.replaced until the new images are complete (finalize_manifest)
        state = "fresh"
    if state == "fresh":
        out.mkdir(parents=True, exist_ok=True)
        man = base_manifest(job)
        man.update(per_class_loss={}, classes_done=0, complete=False, images_fingerprint=None)
        atomic_write_json(out / MANIFEST, man)
    return state


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


def build_job(cfg: DictConfig, teacher: torch.nn.Module, teacher_fp: str) -> RecoverJob:
    """Resolve and validate everything (raises before anything is written)."""
    from lpld.stages.common import dataset_spec

    settings = resolve_settings(cfg)
    meth = METHODS[settings["name"]]
    spec = dataset_spec(cfg)
    classes = class_range(cfg, settings)
    rc = cfg.recover
    allow_other = bool(_get(rc, "allow_other_teacher", False))
    stats_fp, stats_path = None, None
    if meth["kind"] == "optimize" and meth["classwise"]:
        from lpld.core.bnstats import load_classwise_stats

        p = Path(str(_get(rc, "stats_path"))) if _get(rc, "stats_path") else paths.stats_path(cfg)
        if not p.exists():
            raise ArtifactError(
                f"recover={settings['name']} needs class-wise BN statistics at {p}; run "
                f"`python run.py stage=stats dataset={cfg.dataset.name} model={cfg.model.name}` first "
                "(or recover.stats_path=/path/to/stats.pt)"
            )
        stats = load_classwise_stats(p, teacher_fp, allow_other_teacher=allow_other)
        _check_stats(stats, teacher, spec.num_classes, classes, p)
        stats_fp = fingerprint_tensors([*stats["mean"], *stats["var"]])
        stats_path = str(p)
    names = _class_names(cfg, spec.num_classes)
    cpb = _get(rc, "classes_per_batch", None)
    if cpb is None:
        # auto: fill device batches up to max_batch_images. Small batches are overhead-bound
        # (measured on CPU: 10-image batches of a 28 px ConvNet ran ~10x slower per image).
        cpb = max(1, int(_get(rc, "max_batch_images", 256)) // max(1, int(cfg.ipc)))
        # ...but give every rank at least one device batch (Lightning refuses an empty rank); the split
        # does not change any image (each class's objective is independent of its batch mates)
        cpb = min(int(cpb), max(1, -(-len(classes) // _planned_world(cfg))))
    cpb = int(cpb)
    batches = plan_batches(settings, classes, int(cfg.ipc), cpb)
    world = _planned_world(cfg)
    if len(batches) < world:
        raise ConfigError(
            f"recover has {len(batches)} device batches for {world} ranks (Lightning needs one per rank); lower "
            f"recover.classes_per_batch (now {cpb}) or run on fewer devices (trainer.devices)"
        )
    ident = {
        "settings": settings,
        "ipc": int(cfg.ipc),
        "seed": int(cfg.seed),
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
        kind=meth["kind"],
        out_dir=str(paths.images_dir(cfg)),
        ipc=int(cfg.ipc),
        seed=int(cfg.seed),
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
        progress_every=int(_get(cfg.stage, "progress_every", 25)),
        log_images=bool(_get(cfg.stage, "log_images", True)) and bool(_get(cfg.logger, "log_images", True)),
        extra={"dataset": spec.name, "classes_per_batch": cpb},
    )


def _class_names(cfg: DictConfig, n: int) -> list[str]:
    """Class names from the dataset (the images' folder names); falls back to indices."""
    names = _get(cfg.dataset, "class_names")
    if names is not None and len(names) == n:
        return [str(x) for x in names]
    try:
        from lpld.data import build_dataset

        ds = build_dataset(cfg.dataset, "train")
        if len(ds.classes) == n:
            return [str(x) for x in ds.classes]
    except Exception as e:  # noqa: BLE001 - names are cosmetic; a missing dataset fails later where it matters
        log.debug("class names unavailable (%s); using indices", e)
    return [str(i) for i in range(n)]


def run(cfg: DictConfig) -> dict[str, Any]:
    """Synthesise (or resume) the distilled images at ``paths.images_dir(cfg)``."""
    from lpld.lit.recover_module import RecoverModule
    from lpld.stages.common import build_logger, build_trainer, finish_logger, load_teacher, to_container

    teacher, teacher_fp = load_teacher(cfg)
    job = build_job(cfg, teacher, teacher_fp)
    from lpld import dist

    # rank 0 decides fresh / resume / done and creates the folder; every rank takes its decision (a child
    # re-launched by Lightning starts inside rank 0's Trainer, after rank 0 prepared: it resumes)
    state = dist.decide(
        lambda: prepare_output(job, bool(_get(cfg.recover, "overwrite", False))),
        follow="resume",
        accelerator=dist.accelerator_of(cfg),
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
    module = RecoverModule(to_container(cfg), asdict(job))
    logger = build_logger(cfg, "recover")
    try:
        trainer = build_trainer(
            cfg,
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


def _planned_world(cfg: DictConfig) -> int:
    from lpld.dist import planned_world_size

    return planned_world_size(cfg) if cfg.get("trainer") is not None else 1


def _summary(man: dict[str, Any] | None) -> dict[str, Any]:
    man = man or {}
    losses = [v.get("total") for v in (man.get("per_class_loss") or {}).values() if v.get("total") is not None]
    return {
        "complete": bool(man.get("complete")),
        "classes_done": int(man.get("classes_done", 0)),
        "images_fingerprint": man.get("images_fingerprint"),
        "mean_final_loss": float(sum(losses) / len(losses)) if losses else None,
    }
