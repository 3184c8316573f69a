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

from lpld.artifacts import images, labels, teacher
from lpld.artifacts import overwrite as overwrite_artifact
from lpld.artifacts.base import dataset_name, plain_name, root, sign, under
from lpld.config.frozen import Experiment, select
from lpld.core.io import acquire_lock, aside_path, read_json, release_lock


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
        return under(Path(artifacts), self.dataset, self.teacher, "students", self.images, self.store, self.key())


def store_dir(exp: Experiment, source: Experiment | None = None) -> Path:
    """The label store this student reads: ``stage.store`` if set, else the store of ``source`` (the config
    whose prune group is the metric's source ratio; default ``exp``)."""
    explicit = select(exp, "stage.store")
    if explicit:
        return Path(str(explicit)).expanduser().resolve()
    return labels.path(exp if source is None else source)


def spec(
    exp: Experiment,
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
    plain_name(model.get("name"), "student.arch", "resnet18")  # the run folder's name starts with it
    return StudentSpec(
        dataset=dataset_name(exp),
        teacher=teacher.key(exp),
        images=images.key(exp),
        store=plain_name(Path(store).name, "stage.store", "/path/to/labels/<store folder>"),
        model=dict(model),
        settings=dict(settings),
        metric=dict(metric),
        seed=int(exp.seed),
        images_fingerprint=images_fingerprint,
        world=int(world),
        precision=str(precision),
    )


def path(exp: Experiment, run: StudentSpec) -> Path:
    return run.path(root(exp))


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
    if overwrite and (run_dir.exists() or aside_path(run_dir).exists()):
        # moved aside only once the new run has started (lpld.lit.fit.fit_with_resume), back if it fails
        overwrite_artifact.defer(run_dir)
    return None
