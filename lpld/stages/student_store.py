"""Student stage, inputs: the distilled images and the label store a student run reads, opened and checked once.

:func:`load_inputs` is the only function of the student stage's jobs that reads the experiment for its inputs; it
hands the rest of the stage a :class:`StudentInputs` holding every value they use (sections, not the experiment).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lpld.artifacts import images as images_artifact
from lpld.artifacts import students as students_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.config import metric_settings, student_settings
from lpld.config.frozen import Experiment, Node
from lpld.config.student_run import store_config, student_model_cfg, world_size
from lpld.core.io import ArtifactError
from lpld.errors import ConfigError
from lpld.stages.common import dataset_spec, num_workers


def label_store_dir(exp: Experiment) -> Path:
    """Directory of the label store this student reads (``stage.store`` overrides; lpld.config.student_run)."""
    if exp.stage.get("store"):
        return students_artifact.store_dir(exp)
    return students_artifact.store_dir(exp, store_config(exp))


def students_dir(store_dir: Path) -> Path:
    """Where the students of a label store keep their runs.

    ``<labels>/<images key>/<store key>`` -> ``<teacher dir>/students/<images key>/<store key>`` (outside
    the relabel stage's directories).
    """
    return store_dir.parent.parent.parent / "students" / store_dir.parent.name / store_dir.name


def check_store(
    store: Any, images_manifest: dict[str, Any], images: torch.Tensor, spec: Any, st: dict[str, Any], store_dir: Path
) -> None:
    """Refuse a store made for other images, another batch size, image size or class count."""
    man = store.manifest
    fp_img, fp_store = images_manifest.get("images_fingerprint"), man.get("images_fingerprint")
    if fp_img != fp_store:
        raise ArtifactError(
            f"label store {store_dir} was made for other images (images fingerprint {fp_store}, the distilled "
            f"images have {fp_img}); rerun stage=relabel for these images or point stage.store at the right store"
        )
    if int(man["num_images"]) != images.shape[0]:
        raise ArtifactError(
            f"label store {store_dir} holds labels for {man['num_images']} images, found "
            f"{images.shape[0]}; rerun stage=relabel"
        )
    if list(man["image_hw"]) != list(images.shape[-2:]):
        raise ArtifactError(
            f"label store {store_dir} was made for {man['image_hw']} images, found "
            f"{list(images.shape[-2:])}; rerun stage=relabel"
        )
    if int(man["num_classes"]) != spec.num_classes:
        raise ArtifactError(
            f"label store {store_dir} has {man['num_classes']} classes, dataset={spec.name} has {spec.num_classes}"
        )
    out = int(man["aug"]["out_size"])
    if out != spec.image_size:
        raise ArtifactError(
            f"label store {store_dir} augments to {out}px but dataset={spec.name} evaluates at "
            f"{spec.image_size}px; relabel with the dataset's image size"
        )
    bs = st.get("batch_size")
    if bs is not None and int(bs) != int(man["batch_size"]):
        raise ConfigError(
            f"student.batch_size={bs} differs from the label store's batch size {man['batch_size']}: stored labels "
            "belong to whole stored batches. Use student.batch_size=null, or relabel with that batch size"
        )


@dataclass(frozen=True)
class StudentInputs:
    """What a student run reads and every value of the experiment its jobs use, gathered once.

    Tensors: ``images`` uint8 (N, C, H, W), ``labels`` (N,) class of each distilled image.
    """

    spec: Any  # DatasetSpec
    metric: dict[str, Any]  # label-pool selection (metric_settings)
    images_dir: Path
    images: torch.Tensor
    labels: torch.Tensor
    images_manifest: dict[str, Any]
    store_dir: Path
    store: Any  # LabelStore
    settings: dict[str, Any]  # student_settings (the store's schedule filled in)
    model_cfg: dict[str, Any]  # the student architecture
    seed: int
    stage: Node  # the student stage's knobs (results_name, overwrite, ckpt_every, val_every, workers ...)
    dataset: Node  # the dataset section (the real validation set)
    prune: Node  # the prune group (name, ratio)
    method: str  # recover.name
    teacher_name: str
    world: int  # processes the trainer preset runs
    workers: int  # data-loader workers of the trainer preset
    teacher: Any = None  # student.labels=online: the teacher that labels each batch (``store`` is its schedule)
    teacher_bytes: int = 0  # ... and its fp16 parameter + buffer bytes (storage_accounting.model_bytes)
    label_source: str = "stored"  # student.labels: stored | online (the teacher) | generator (a trained generator)

    @property
    def online(self) -> bool:
        return self.teacher is not None

    @property
    def manifest(self) -> dict[str, Any]:
        return self.store.manifest


def _from_experiment(exp: Experiment) -> dict[str, Any]:
    """The :class:`StudentInputs` fields that come from the experiment alone (every label source has them)."""
    return {
        "model_cfg": student_model_cfg(exp),
        "seed": int(exp.seed),
        "stage": exp.stage,
        "dataset": exp.dataset,
        "prune": exp.prune,
        "method": str(exp.recover.name),
        "teacher_name": teacher_artifact.teacher_name(exp),
        "world": world_size(exp),
        "workers": num_workers(exp),
    }


def load_inputs(exp: Experiment) -> StudentInputs:
    """Open the distilled images and the label store of this experiment and resolve the student settings."""
    from lpld.core.images import load_distilled
    from lpld.core.label_store import LabelStore

    spec = dataset_spec(exp)
    images_dir = images_artifact.path(exp)
    teacher_fp = teacher_artifact.fingerprint(exp)
    images_artifact.require(exp)
    images, labels, img_man = load_distilled(
        images_dir,
        expect_teacher_fingerprint=teacher_fp,
        allow_other_teacher=bool(exp.stage["allow_other_teacher"]),
    )
    if str(exp.student.get("labels") or "stored") in ("online", "generator"):
        return _online_inputs(exp, spec, images_dir, images, labels, img_man)
    store_dir = label_store_dir(exp)
    if not exp.stage.get("store") and not (store_dir / "manifest.json").is_file():
        from lpld.artifacts import labels as labels_artifact
        from lpld.artifacts.catalog import missing_hint

        raise ArtifactError(
            f"no label store at {store_dir}; run `python run.py stage=relabel` with the same overrides first"
            + missing_hint(exp, "labels", labels_artifact.spec(store_config(exp)))
        )
    store = LabelStore.open(store_dir, verify=str(exp.stage["verify"]))
    st = student_settings(exp, store.manifest)
    check_store(store, img_man, images, spec, st, store_dir)
    return StudentInputs(
        spec=spec,
        metric=metric_settings(exp),
        images_dir=images_dir,
        images=images,
        labels=labels,
        images_manifest=img_man,
        store_dir=store_dir,
        store=store,
        settings=st,
        **_from_experiment(exp),
    )


def _online_inputs(
    exp: Experiment, spec: Any, images_dir: Path, images: torch.Tensor, labels: torch.Tensor, img_man: dict[str, Any]
) -> StudentInputs:
    """``student.labels=online``: no label store; the teacher (``lpld.artifacts.teacher.load``) labels every batch
    of this config's full schedule (``lpld.core.online_labels.OnlineSchedule``), its fp16 bytes counted.
    ``student.labels=generator``: a label generator trained here on the teacher's outputs (its own augmentation
    draws, ``lpld.core.label_generator``) labels them instead, its fp16 bytes counted."""
    import torch

    from lpld.artifacts import labels as labels_artifact
    from lpld.core.online_labels import OnlineSchedule
    from lpld.core.storage_accounting import model_bytes

    src = str(exp.student.get("labels"))
    metric = metric_settings(exp)
    if metric["name"] != "random" or exp.stage.get("store"):
        raise ConfigError(
            f"student.labels={src} reads no label store, so it cannot select stored batches (metric) or read "
            "stage.store; drop metric= / stage.store, or use student.labels=stored"
        )
    if float(exp.prune.ratio) > 0:
        raise ConfigError(
            f"student.labels={src} labels every batch of the schedule, so prune={exp.prune.name} has nothing to "
            "prune; drop the prune= override (prune=1x), or use student.labels=stored"
        )
    teacher, teacher_fp = teacher_artifact.load(exp)
    schedule = OnlineSchedule(
        labels_artifact.store_spec(exp, num_images=images.shape[0]),
        {"images_fingerprint": img_man.get("images_fingerprint"), "teacher_fingerprint": teacher_fp},
    )
    st = student_settings(exp, schedule.manifest)
    if st["granularity"] != "epoch" or st["loss"] == "ce":
        raise ConfigError(
            f"student.labels={src} labels every epoch's fresh batches (student.granularity=epoch) for a soft-label "
            f"loss; got student.granularity={st['granularity']}, student.loss={st['loss']}: drop those overrides"
        )
    # where its runs live: beside the stores of these images, keyed by the schedule and the teacher
    from lpld.core.io import fingerprint_obj

    source = str(st["labels"])
    key = fingerprint_obj([schedule.spec.to_dict(), teacher_fp])[:8]
    store_dir = labels_artifact.path(exp).parent / f"{source}_s{schedule.spec.seed}_{key}"
    check_store(schedule, img_man, images, spec, st, store_dir)
    if source == "generator":
        teacher = _train_generator(teacher, images, schedule, spec, st)
    return StudentInputs(
        spec=spec,
        metric=metric,
        images_dir=images_dir,
        images=images,
        labels=labels,
        images_manifest=img_man,
        store_dir=store_dir,
        store=schedule,
        settings=st,
        **_from_experiment(exp),
        teacher=teacher,
        teacher_bytes=model_bytes(teacher, torch.float16),
        label_source=source,
    )


def _train_generator(teacher: Any, images: torch.Tensor, schedule: Any, spec: Any, st: dict[str, Any]) -> Any:
    """The label generator of ``student.labels=generator``, trained on the teacher's logits over the schedule's
    augmentations drawn from the generator's own seed (never the student's draws); fp16-rounded, on the CPU."""
    import dataclasses

    import numpy as np

    from lpld.core.augment import to_model_input
    from lpld.core.label_generator import train_generator
    from lpld.core.online_labels import OnlineSchedule

    seed = int(np.random.SeedSequence([schedule.spec.seed, 0x6E4]).generate_state(1)[0])
    own = OnlineSchedule(dataclasses.replace(schedule.spec, seed=seed))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = to_model_input(images, spec.mean, spec.std).to(device)
    gen, _ = train_generator(
        teacher.to(device),
        x,
        own,
        float(st["temperature"]),
        passes=st["generator_passes"],
        width=st["generator_width"],
        depth=st["generator_depth"],
        lr=st["generator_lr"],
        seed=int(schedule.spec.seed),
    )
    teacher.cpu()
    return gen.cpu()
