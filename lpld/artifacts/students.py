"""Student runs: ``<teacher base>/students/<images key>/<store key>/<student model>-<8 hex>/`` (stage=student:
``last.ckpt`` to resume, ``final.json`` once finished; the record goes to :mod:`lpld.artifacts.results`).

Identity: the resolved student settings (lpld.config.student_settings, which reads the store's schedule),
the pool metric, the student architecture, seed, the label store and images (keys, and the images'
content fingerprint), the world size (BatchNorm normalises each rank's rows on their own) and the
precision the student trains in. The settings depend on the opened store's manifest, so the student
stage builds this spec after opening its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lpld.artifacts import images, labels, teacher
from lpld.artifacts.base import get, root, sign
from lpld.core.io import acquire_lock, move_aside, read_json, release_lock


@dataclass(frozen=True)
class StudentSpec:
    dataset: str
    teacher: str  # teacher key
    images: str  # images key
    store: str  # label-store key (the folder name of an explicit stage.store)
    model: dict[str, Any]
    settings: dict[str, Any]
    metric: dict[str, Any]
    seed: int
    images_fingerprint: str | None
    world: int
    precision: str

    def key(self) -> str:
        return f"{self.model['name']}-{sign(self.__dict__)}"

    def path(self, artifacts: Path) -> Path:
        return Path(artifacts) / self.dataset / self.teacher / "students" / self.images / self.store / self.key()


def store_dir(cfg: DictConfig, source: DictConfig | None = None) -> Path:
    """The label store this student reads: ``stage.store`` if set, else the store of ``source`` (the config
    whose prune group is the metric's source ratio; default ``cfg``)."""
    explicit = get(cfg, "stage.store")
    if explicit:
        return Path(str(explicit)).expanduser().resolve()
    return labels.path(cfg if source is None else source)


def spec(
    cfg: DictConfig,
    store: Path,
    *,
    model: dict[str, Any],
    settings: dict[str, Any],
    metric: dict[str, Any],
    images_fingerprint: str | None,
    world: int,
    precision: str,
) -> StudentSpec:
    """The run of this config on the store at ``store`` (settings resolved against its manifest)."""
    return StudentSpec(
        dataset=str(cfg.dataset.name),
        teacher=teacher.key(cfg),
        images=images.key(cfg),
        store=Path(store).name,
        model=dict(model),
        settings=dict(settings),
        metric=dict(metric),
        seed=int(cfg.seed),
        images_fingerprint=images_fingerprint,
        world=int(world),
        precision=str(precision),
    )


def path(cfg: DictConfig, run: StudentSpec) -> Path:
    return run.path(root(cfg))


def prepare(run_dir: Path, final: Path, overwrite: bool) -> dict[str, Any] | None:
    """The producer's decision for a student run folder (stage=student, rank 0).

    Returns the finished run's summary (``final``, i.e. ``final.json``: done, reuse it) or None (train; an existing
    ``last.ckpt`` resumes). Takes the folder's OS lock, released here when the run is done, else when training
    finishes or at exit. ``overwrite`` retrains from scratch: the old folder stays at ``<run>.replaced`` until the
    new run has written its record (which then replaces the old record, never duplicates it).
    """
    acquire_lock(run_dir, "student run")
    if final.exists() and not overwrite:
        done = read_json(final)
        release_lock(run_dir)
        return done
    if overwrite and run_dir.exists():
        move_aside(run_dir)
    return None
