"""Label stores: ``<teacher base>/labels/<images key>/<readable>_<8 hex>/`` (stage=relabel writes; student and
storage read). The format is :mod:`lpld.core.label_store`.

Identity: the full :class:`~lpld.core.label_store.StoreSpec` (schedule, pruning, quantization, augmentation,
record mode, seed, drop-last), the relabel teachers (``self`` or an ensemble's config), the teacher forward
precision and the images key. Every stage that locates the store builds it from the same resolved relabel
knobs (``lpld.config.relabel_settings``), so producer and consumer agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpld.artifacts import images, teacher
from lpld.artifacts.base import dataset_name, plain, plain_name, root, sign, under
from lpld.config.frozen import Experiment, once
from lpld.core.augment import AugConfig, switch_fields
from lpld.core.io import fingerprint_obj
from lpld.core.label_store import StoreSpec
from lpld.core.quant import QuantConfig
from lpld.errors import ConfigError


@once
def knobs(exp: Experiment) -> dict[str, Any]:
    """The resolved relabel knobs of this config (the same for relabel, storage and student)."""
    from lpld.config import relabel_settings

    return relabel_settings(exp)


@once
def quant_config(exp: Experiment) -> QuantConfig:
    """QuantConfig from the ``quant`` group (ms temperature null -> the student's KD temperature)."""
    from lpld.config import quant_settings

    return QuantConfig(**quant_settings(exp))


@once
def aug_config(exp: Experiment, st: dict[str, Any] | None = None) -> AugConfig:
    st = knobs(exp) if st is None else st
    scale, ratio = st["rrc_scale"], st["rrc_ratio"]
    return AugConfig(
        out_size=int(exp.dataset.image_size),
        scale=(float(scale[0]), float(scale[1])),
        ratio=(float(ratio[0]), float(ratio[1])),
        flip=bool(st["flip"]),  # relabel.flip, else the recipe's (in21k: false), else true
        mix=str(st["mix"]),
        cutmix_alpha=float(st["cutmix_alpha"]),
        cutout_factor=float(st["cutout_factor"]),
        # issue 12: RDED ShufflePatches, the official 21K random Cutout colour (off unless the knobs say so)
        **switch_fields(
            str(st["mix"]), st.get("shuffle_patches"), st.get("cutout_fill"), exp.dataset.mean, exp.dataset.std
        ),
    )


@once
def store_spec(exp: Experiment, num_images: int | None = None) -> StoreSpec:
    """The StoreSpec of this config (``num_images`` defaults to ipc x num_classes)."""
    from lpld.core.pruning import resolve_drop_last

    st = knobs(exp)
    c = int(exp.dataset.num_classes)
    n = int(num_images) if num_images is not None else int(exp.ipc) * c
    epochs, bs = st.get("epochs"), st.get("batch_size")
    if epochs is None or bs is None:
        raise ConfigError(
            "relabel needs epochs and batch_size: set relabel.epochs / relabel.batch_size or a dataset recipe"
        )
    record_mode = str(st["record_mode"])
    if record_mode not in ("explicit", "seed"):
        raise ConfigError(f"relabel record_mode must be explicit|seed, got {record_mode!r}")
    size = int(exp.dataset.image_size)
    try:
        drop_last = resolve_drop_last(st.get("drop_last", "auto"), float(exp.prune.ratio), n, int(bs))
        return StoreSpec(
            num_images=n,
            num_classes=c,
            image_hw=(size, size),
            batch_size=int(bs),
            epochs=int(epochs),
            prune_name=str(exp.prune.name),
            prune_ratio=float(exp.prune.ratio),
            granularity=str(exp.prune.granularity),
            pool_select=str(exp.prune.get("pool_select") or "first"),  # issue 20: official first K
            quant=quant_config(exp),
            aug=aug_config(exp, st),
            record_mode=record_mode,
            seed=int(exp.seed),
            drop_last=drop_last,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


@once
def teacher_tag(exp: Experiment, st: dict[str, Any] | None = None) -> str:
    """``self`` (the run's teacher) or ``ens<n>-<8 hex>`` of the ensemble's teacher configs."""
    st = knobs(exp) if st is None else st
    teachers = st.get("teachers")
    if not teachers:
        return "self"
    rescale = bool(st.get("ensemble_rescale", False))
    return f"ens{len(teachers)}-{fingerprint_obj([plain(teachers), str(st['ensemble']), rescale])[:8]}"


@dataclass(frozen=True)
class LabelsSpec:
    dataset: str
    teacher: str  # teacher key (the folder the store lives under)
    images: str  # images key
    teachers: str  # teacher_tag: self | ens<n>-<hash>
    store: dict[str, Any]  # StoreSpec.to_dict()
    precision: str  # teacher forward precision

    def key(self) -> str:
        s, q = self.store, self.store["quant"]
        quant = QuantConfig(**q).tag
        readable = (
            f"{self.teachers}_{s['aug']['mix']}_{s['prune']['name']}-{s['prune']['granularity']}_{quant}_"
            f"{s['record_mode']}_s{s['seed']}_e{s['epochs']}b{s['batch_size']}"
        )
        return f"{readable}_{sign(self.__dict__)}"

    def path(self, artifacts: Path) -> Path:
        return under(Path(artifacts), self.dataset, self.teacher, "labels", self.images, self.key())


@once
def spec(exp: Experiment) -> LabelsSpec:
    st = knobs(exp)
    # the names that make up the store's folder name (record_mode and mix are checked against their lists)
    plain_name(exp.prune.name, "prune.name", "10x")
    plain_name(exp.prune.granularity, "prune.granularity", "batch")
    return LabelsSpec(
        dataset=dataset_name(exp),
        teacher=teacher.key(exp),
        images=images.key(exp),
        teachers=teacher_tag(exp, st),
        store=store_spec(exp).to_dict(),
        precision=str(st.get("precision") or "32-true"),
    )


@once
def key(exp: Experiment) -> str:
    return spec(exp).key()


@once
def path(exp: Experiment) -> Path:
    return spec(exp).path(root(exp))


def prepare(store: Path, spec: StoreSpec, meta: dict[str, Any], overwrite: bool = False) -> str:
    """Create / check / resume decision of the store (``lpld.core.label_store.prepare``): fresh | resume | complete."""
    from lpld.core.label_store import prepare as _prepare

    return _prepare(store, spec, meta, overwrite=overwrite)


def open(store: Path, verify: str = "fast") -> Any:  # noqa: A001 - artifacts.labels.open(path)
    """The finished store at ``store`` (LabelStore.open: manifest, checksums per ``verify``: fast | full | none)."""
    from lpld.core.label_store import LabelStore

    return LabelStore.open(store, verify=verify)


def verify(store: Path) -> None:
    """Full integrity check of a finished store (every array's sha256 and per-batch CRCs)."""
    open(store, verify="full")
