"""The teacher: ``<artifacts>/<dataset>/<teacher key>/teacher/teacher.pt`` (written by stage=squeeze).

Identity: the model config (architecture, width, norm, checkpoint / pretrained source), the dataset's
identity (not its root: moving the data must not retrain) and ``teacher_seed``. The squeeze schedule
(``stage.epochs``, ``stage.lr``, ...) is a producer-only knob that the consuming stages cannot see; it
is recorded in ``teacher.pt`` as ``config_fingerprint`` and squeeze refuses to reuse a teacher trained
with another schedule (``stage.overwrite=true`` or ``model.tag=<name>``), so it is not silently reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lpld.artifacts.base import dataset_name, plain, plain_name, root, sign, under
from lpld.config.frozen import Experiment, once, select
from lpld.core.io import ArtifactError, fingerprint_state_dict

FILE = "teacher.pt"
# dataset keys that name where the data is, not what it is
_NOT_IDENTITY = ("recipe", "root", "download")


@once
def teacher_name(exp: Any) -> str:
    """Readable teacher name: model name, plus ``-<tag>`` for published / external weights (or
    ``-pretrained``), plus ``-s<teacher_seed>`` for a teacher trained with a non-zero ``teacher_seed``."""
    name = plain_name(exp.model.name, "model.name", "convnet")  # names the teacher's folder
    tag = select(exp, "model.tag")
    if tag:
        name = f"{name}-{plain_name(tag, 'model.tag')}"
    elif select(exp, "model.pretrained", False):
        return f"{name}-pretrained"
    tseed = int(select(exp, "teacher_seed", 0) or 0)
    if tseed and not select(exp, "model.checkpoint"):
        name = f"{name}-s{tseed}"
    return name


@once
def dataset_identity(exp: Any) -> dict[str, Any]:
    """The dataset config without where it lives (root, download) and without later stages' recipes."""
    return {k: v for k, v in (plain(exp.dataset) or {}).items() if k not in _NOT_IDENTITY}


@dataclass(frozen=True)
class TeacherSpec:
    """Resolved values that determine the teacher's weights (and every artifact made with it)."""

    dataset: str
    name: str  # readable: model name (+ tag / -pretrained / -s<teacher_seed>)
    model: dict[str, Any]
    data: dict[str, Any]
    teacher_seed: int

    def key(self) -> str:
        return f"{self.name}-{sign(self.__dict__)}"

    def dir(self, artifacts: Path) -> Path:
        """The teacher's folder (squeeze's ``last.ckpt`` and ``teacher.pt``)."""
        return under(Path(artifacts), self.dataset, self.key(), "teacher")

    def path(self, artifacts: Path) -> Path:
        return self.dir(artifacts) / FILE

    def base(self, artifacts: Path) -> Path:
        """``<artifacts>/<dataset>/<teacher key>``: stats, images, labels and students of this teacher."""
        return under(Path(artifacts), self.dataset, self.key())


@once
def spec(exp: Experiment) -> TeacherSpec:
    tseed = int(select(exp, "teacher_seed", 0) or 0)
    given = bool(select(exp, "model.checkpoint") or select(exp, "model.pretrained", False))
    return TeacherSpec(
        dataset=dataset_name(exp),
        name=teacher_name(exp),
        model=plain(exp.model),
        data=dataset_identity(exp),
        teacher_seed=0 if given else tseed,  # given weights do not depend on a training seed
    )


@once
def key(exp: Experiment) -> str:
    return spec(exp).key()


@once
def base_dir(exp: Experiment) -> Path:
    """``<artifacts>/<dataset>/<teacher key>``: where this teacher's downstream artifacts live."""
    return spec(exp).base(root(exp))


@once
def dir(exp: Experiment) -> Path:  # noqa: A001 - the module is the namespace: artifacts.teacher.dir(exp)
    return spec(exp).dir(root(exp))


@once
def path(exp: Experiment) -> Path:
    """Final teacher weights written by squeeze (``model.checkpoint`` overrides where it is read)."""
    return spec(exp).path(root(exp))


def read(path: Path) -> dict[str, Any]:
    """Read squeeze's teacher.pt ({state_dict, fingerprint, model, dataset, ...}) as plain tensors."""
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


def build(exp: Experiment) -> torch.nn.Module:
    """The teacher architecture for this dataset (weights per model.pretrained / model.checkpoint)."""
    from lpld.models import build_model

    d = exp.dataset
    return build_model(exp.model, num_classes=int(d.num_classes), in_chans=int(d.channels), img_size=int(d.image_size))


def load(exp: Experiment) -> tuple[torch.nn.Module, str]:
    """The teacher in eval mode (no grads) and its fingerprint (sha256 over its weights).

    Source, in order: ``model.checkpoint`` (a local file), ``model.pretrained`` (published
    weights), else the teacher trained by ``stage=squeeze`` at :func:`path`.
    """
    if select(exp, "model.checkpoint") or select(exp, "model.pretrained", False):
        model = build(exp)  # the registry loads the checkpoint / published weights
    else:
        p = path(exp)
        if not p.exists():
            raise ArtifactError(
                f"no teacher at {p}. Train one with `python run.py stage=squeeze dataset={exp.dataset.name} "
                f"model={exp.model.name}`, or set model.checkpoint=/path/to/weights.pt or model.pretrained=true"
                + _missing_hint(exp)
            )
        blob = read(p)
        model = build(exp)
        try:
            model.load_state_dict(blob["state_dict"])
        except RuntimeError as e:
            raise ArtifactError(
                f"teacher at {p} does not fit model={exp.model.name} for dataset={exp.dataset.name}: {e}"
            ) from e
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model, fingerprint_state_dict(model.state_dict())


def fingerprint(exp: Experiment) -> str | None:
    """The teacher's fingerprint without building it when squeeze wrote it (None: no teacher yet)."""
    if select(exp, "model.checkpoint") or select(exp, "model.pretrained", False):
        return load(exp)[1]
    p = path(exp)
    return read(p).get("fingerprint") if p.exists() else None


def prepare(exp: Experiment, config_fingerprint: str, overwrite: bool) -> dict[str, Any] | None:
    """Rank 0 of stage=squeeze: the finished teacher's val metrics (reuse), or None (train / resume).

    Takes the teacher folder's lock (released here on reuse, else by squeeze when the teacher is written).
    ``config_fingerprint`` signs the squeeze schedule, which consumers cannot see (not in the key): a finished
    teacher trained with another schedule is refused, never silently reused.

    Raises:
        ArtifactError: the finished teacher was trained from another config and ``overwrite`` is false.
    """
    from lpld.artifacts import overwrite as overwrite_artifact
    from lpld.core.io import acquire_lock, aside_path, release_lock

    out_dir, weights = dir(exp), path(exp)
    acquire_lock(out_dir, "teacher")  # one writer per teacher folder (released when done, or at exit)
    if weights.exists() and not overwrite:
        blob = read(weights)
        if blob.get("config_fingerprint") == config_fingerprint:
            release_lock(out_dir)
            return dict(blob["val"])
        raise ArtifactError(
            f"{weights} holds a teacher trained with a different recipe/config (fingerprint "
            f"{blob.get('config_fingerprint')} vs {config_fingerprint}). Rerun with stage.overwrite=true to retrain "
            "it, or set model.tag=<name> to keep both"
        )
    if overwrite and (out_dir.exists() or aside_path(out_dir).exists()):
        # start over (no resume from its last.ckpt); the old folder moves to teacher.replaced only once the new run
        # has started (lpld.lit.fit.fit_with_resume), comes back if it fails, and goes when the new teacher.pt is in
        overwrite_artifact.defer(out_dir)
    return None


def _missing_hint(exp: Experiment) -> str:
    """The closest existing teacher and the values that differ (lpld.artifacts.catalog), or ""."""
    from lpld.artifacts.catalog import missing_hint

    return missing_hint(exp, "teacher", spec(exp))
