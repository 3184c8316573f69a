"""The recover job and its on-disk records: what a recover run makes, and which classes are finished.

:class:`RecoverJob` holds everything a worker needs to synthesise a share of the classes (plain values only,
so it pickles into DDP ranks). Every finished class leaves a ``.recover.json`` record next to its PNGs;
``finalize_manifest`` collects them into the images folder's ``manifest.json``. Both the recover stage
(planning, resume) and the Lightning worker (``lpld.lit.recover_module``) use these functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpld.core.images import MANIFEST, class_dir_name, image_hashes, image_path, image_settings, images_fingerprint
from lpld.core.io import ArtifactError, atomic_write_json, drop_aside, read_json, release_lock

RECORD = ".recover.json"


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
    fmt = image_settings(job.settings)[0]
    return all(image_path(d, j, fmt).exists() for j in range(job.ipc))


def write_class_record(job: RecoverJob, c: int, losses: dict[str, float]) -> None:
    """Mark class ``c`` finished (written after all its PNGs, so a record implies the images)."""
    atomic_write_json(
        job.class_dir(c) / RECORD, {"class": c, "config_fingerprint": job.config_fingerprint, "loss": losses}
    )


def base_manifest(job: RecoverJob) -> dict[str, Any]:
    """The manifest fields fixed by the job (no per-class progress)."""
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
