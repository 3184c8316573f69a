"""Distilled images: ``<teacher base>/images/<method>_ipc<ipc>_seed<seed>_<8 hex>/`` (stage=recover writes
PNGs + manifest.json; relabel, student and analyze read them).

Identity: the resolved recover settings (method, iterations, lr, BN-matching weights, priors, jitter,
crop / flip, precision, method-specific knobs), ipc, seed, the teacher key and the stats the synthesis
matches (their key, or an explicit ``recover.stats_path``). Not: how classes are split over device
batches or over jobs (``classes_per_batch``, ``class_start``/``class_end``), which changes no image.
Inside the folder, ``manifest.json``'s ``config_fingerprint`` (content: teacher and stats fingerprints)
still refuses a folder written from other inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lpld.artifacts import stats, teacher
from lpld.artifacts.base import dataset_name, plain_name, root, sign, under
from lpld.config.frozen import Experiment, once, select
from lpld.core.images import MANIFEST, list_pngs, read_manifest
from lpld.core.io import ArtifactError, acquire_lock, atomic_write_json, move_aside, release_lock
from lpld.core.recover_job import RecoverJob, base_manifest


@dataclass(frozen=True)
class ImagesSpec:
    dataset: str
    teacher: str  # teacher key
    method: str
    ipc: int
    seed: int
    settings: dict[str, Any]  # lpld.config.recover_settings
    stats: str | None  # stats key, "file:<path>" for recover.stats_path, None for methods without class stats

    def key(self) -> str:
        return f"{self.method}_ipc{self.ipc}_seed{self.seed}_{sign(self.__dict__)}"

    def path(self, artifacts: Path) -> Path:
        return under(Path(artifacts), self.dataset, self.teacher, "images", self.key())


@once
def spec(exp: Experiment) -> ImagesSpec:
    from lpld.config import recover_methods, recover_settings

    s = recover_settings(exp)
    # what the synthesis matches: the stats key (``recover.stats_path``: that file), None without class stats
    stats_ref = None
    if recover_methods()[str(s["name"])].get("classwise"):
        explicit = select(exp, "recover.stats_path")
        stats_ref = f"file:{Path(str(explicit)).expanduser().resolve()}" if explicit else stats.spec(exp).key()
    return ImagesSpec(
        dataset=dataset_name(exp),
        teacher=teacher.key(exp),
        method=plain_name(s["name"], "recover.name", "lpld"),
        ipc=int(exp.ipc),
        seed=int(exp.seed),
        settings=dict(s),
        stats=stats_ref,
    )


def with_method(exp: Experiment, method: str) -> Experiment:
    """``exp`` as the command ``recover=<method>`` composes it: the run's own method keeps its node (command-line
    ``recover.*`` knobs included), another method gets its group option's knobs (its images were made by
    ``stage=recover recover=<method>``; images made with other knobs are named with ``stage.image_dirs``)."""
    if str(exp.recover.name) == method:
        return exp
    from lpld.config.experiment import with_group

    return with_group(exp, "recover", method, "stage.methods")


@once
def key(exp: Experiment) -> str:
    return spec(exp).key()


@once
def path(exp: Experiment) -> Path:
    return spec(exp).path(root(exp))


def open(  # noqa: A001 - artifacts.images.open(exp), like the other artifacts
    exp: Experiment, teacher_fingerprint: str | None, allow_other_teacher: bool = False, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(uint8 images (N, C, H, W), labels (N,), manifest) of this config, checked against the manifest's
    fingerprints and the teacher (``lpld.core.images.load_distilled``; each refusal names the fix)."""
    from lpld.core.images import MANIFEST, load_distilled

    require(exp, MANIFEST)
    return load_distilled(
        path(exp),
        expect_teacher_fingerprint=teacher_fingerprint,
        allow_other_teacher=allow_other_teacher,
        verify=verify,
    )


def require(exp: Experiment, manifest: str = "manifest.json") -> None:
    """Refuse a config whose images do not exist, naming the recover command and the closest existing images.

    Raises:
        ArtifactError: no ``manifest.json`` at :func:`path`.
    """
    from lpld.artifacts.catalog import missing_hint

    p = path(exp)
    if not (p / manifest).is_file():
        raise ArtifactError(
            f"no distilled images at {p}; run `python run.py stage=recover` with the same overrides first"
            + missing_hint(exp, "images", spec(exp))
        )


def verify(exp: Experiment) -> None:
    """Raise ArtifactError naming any PNG that differs from the manifest's per-file hashes."""
    from lpld.core.images import check_image_files, list_pngs, read_manifest
    from lpld.core.io import ArtifactError

    p = path(exp)
    man = read_manifest(p)
    if man is None:
        raise ArtifactError(f"no distilled images at {p} (manifest.json missing); run `python run.py stage=recover`")
    check_image_files(p, man, list_pngs(p))


def prepare(job: RecoverJob, overwrite: bool) -> str:
    """The producer's decision for ``job.out_dir`` (stage=recover, rank 0): 'fresh', 'resume' or 'done'.

    Takes the folder's OS lock (released here when they are already complete, else when they are written, or at
    exit); a folder of another config
    is refused unless ``overwrite``, which moves it aside until the new images are complete.

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
    if state == "done":
        release_lock(out)  # nothing to write: a long-lived process (a multirun sweep) must not keep others waiting
    if state == "fresh":
        out.mkdir(parents=True, exist_ok=True)
        man = base_manifest(job)
        man.update(per_class_loss={}, classes_done=0, complete=False, images_fingerprint=None)
        atomic_write_json(out / MANIFEST, man)
    return state
