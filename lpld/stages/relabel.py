"""Stage ``relabel``: generate the (pruned, quantized) soft-label store for the distilled images.

``python run.py stage=relabel prune=40x quant=mr quant.k=100 stage.record_mode=seed`` writes
``paths.labels_root(cfg) / store_key(cfg)`` (see ``lpld.core.label_store`` for the format).
Only the kept batches are computed (pruning at generation), sharded across ranks with the
trainer preset (``trainer=ddp_cpu`` / ``ddp_spawn``); an interrupted run resumes.

The student stage finds the store with ``store_path(cfg)`` and opens it with
``LabelStore.open(path)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lpld import paths
from lpld.core.augment import AugConfig
from lpld.core.io import ArtifactError, fingerprint_obj
from lpld.core.label_store import LabelStore, StoreSpec, disk_bytes, finalize, prepare
from lpld.core.quant import QuantConfig
from lpld.stages import ConfigError

log = logging.getLogger("lpld")


_DEFAULT_KNOBS = Path(__file__).resolve().parents[2] / "conf" / "stage" / "relabel.yaml"


def _stage(cfg: DictConfig) -> Any:
    """The relabel knobs, identical for every stage that locates the label store (relabel, storage, student).

    A top-level ``relabel`` node (composed by experiments such as ``table9_ours_plus``) holds the knobs of
    the run; under ``stage=relabel`` a ``stage.<key>`` that differs from conf/stage/relabel.yaml (a
    command-line override) wins over it. Without the node: ``cfg.stage`` when running stage=relabel,
    else conf/stage/relabel.yaml's defaults.
    """
    node = cfg.get("relabel")
    if str(cfg.stage.get("name")) == "relabel" and node is None:
        return cfg.stage
    if node is None:
        return OmegaConf.load(_DEFAULT_KNOBS)
    if str(cfg.stage.get("name")) == "relabel":
        default = OmegaConf.load(_DEFAULT_KNOBS)
        merged = OmegaConf.merge(node)  # a copy: the experiment's knobs ...
        OmegaConf.set_struct(merged, False)  # (a `+stage.<new key>` may add keys the node lacks)
        for k, v in cfg.stage.items():  # ... under the command line's stage.<key> overrides
            if k not in default or v != default.get(k):
                merged[k] = v
        return merged
    return node


def _recipe(cfg: DictConfig, key: str, default: Any = None) -> Any:
    from lpld.stages.common import recipe

    return recipe(cfg, "student", key, default=default, node=_stage(cfg))


def quant_config(cfg: DictConfig) -> QuantConfig:
    """QuantConfig from the ``quant`` group (ms temperature null -> the student's KD temperature)."""
    q = cfg.quant
    mode = str(q.get("mode", q.get("name")))
    k = int(q.get("k") or 0)
    if mode == "ms":
        t = q.get("temperature")
        if t is None:
            from lpld.stages.common import recipe

            t = recipe(cfg, "student", "temperature", default=1.0, node=cfg.get("student"))
        temp = float(t)
    else:
        temp = 1.0  # unused by none/mr/hard: kept fixed so it does not split store identities
    return QuantConfig(mode=mode, k=k if mode in ("mr", "ms") else 0, temperature=temp)


def aug_config(cfg: DictConfig) -> AugConfig:
    st = _stage(cfg)
    mix = st.get("mix") or _recipe(cfg, "mix", "cutmix")
    scale = st.get("rrc_scale") or _recipe(cfg, "rrc_scale", [0.08, 1.0])
    return AugConfig(
        out_size=int(cfg.dataset.image_size),
        scale=(float(scale[0]), float(scale[1])),
        ratio=(float(st.rrc_ratio[0]), float(st.rrc_ratio[1])),
        flip=bool(_recipe(cfg, "flip", True)),  # stage.flip, else the recipe's (in21k: false), else true
        mix=str(mix),
        cutmix_alpha=float(st.cutmix_alpha),
        cutout_factor=float(st.cutout_factor),
    )


def build_spec(cfg: DictConfig, num_images: int | None = None) -> StoreSpec:
    """The StoreSpec of this config (``num_images`` defaults to ipc x num_classes)."""
    st = _stage(cfg)
    c = int(cfg.dataset.num_classes)
    n = int(num_images) if num_images is not None else int(cfg.ipc) * c
    epochs = st.get("epochs") or _recipe(cfg, "epochs")
    bs = st.get("batch_size") or _recipe(cfg, "batch_size")
    if epochs is None or bs is None:
        raise ConfigError(
            "relabel needs epochs and batch_size: set stage.epochs / stage.batch_size or a dataset recipe"
        )
    record_mode = str(st.record_mode)
    if record_mode not in ("explicit", "seed"):
        raise ConfigError(f"relabel record_mode must be explicit|seed, got {record_mode!r}")
    size = int(cfg.dataset.image_size)
    try:
        return StoreSpec(
            num_images=n,
            num_classes=c,
            image_hw=(size, size),
            batch_size=int(bs),
            epochs=int(epochs),
            prune_name=str(cfg.prune.name),
            prune_ratio=float(cfg.prune.ratio),
            granularity=str(cfg.prune.granularity),
            quant=quant_config(cfg),
            aug=aug_config(cfg),
            record_mode=record_mode,
            seed=int(cfg.seed),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _teacher_tag(cfg: DictConfig) -> str:
    st = _stage(cfg)
    teachers = st.get("teachers")
    if not teachers:
        return "self"
    plain = OmegaConf.to_container(teachers, resolve=True) if OmegaConf.is_config(teachers) else teachers
    rescale = bool(st.get("ensemble_rescale", False))
    return f"ens{len(plain)}-{fingerprint_obj([plain, str(st.ensemble), rescale])[:8]}"


def store_key(cfg: DictConfig) -> str:
    """Directory name of the store: readable parts + a hash of the full spec.

    e.g. ``self_cutmix_40x-batch_mr100_seed_s0_e300b128_1a2b3c4d``.
    """
    spec = build_spec(cfg)
    readable = (
        f"{_teacher_tag(cfg)}_{spec.aug.mix}_{spec.prune_name}-{spec.granularity}_{spec.quant.tag}_"
        f"{spec.record_mode}_s{spec.seed}_e{spec.epochs}b{spec.batch_size}"
    )
    return f"{readable}_{fingerprint_obj([spec.to_dict(), _teacher_tag(cfg)])[:8]}"


def store_path(cfg: DictConfig) -> Path:
    """Where this config's label store lives: ``paths.labels_root(cfg) / store_key(cfg)``."""
    return paths.labels_root(cfg) / store_key(cfg)


def load_relabel_teacher(cfg: DictConfig) -> tuple[Any, str, dict[str, Any]]:
    """The teacher (or EnsembleTeacher of the relabel knobs' ``teachers``), its fingerprint and manifest metadata."""
    from lpld.core.relabel import EnsembleTeacher
    from lpld.stages.common import load_teacher

    st = _stage(cfg)
    if not st.get("teachers"):
        model, fp = load_teacher(cfg)
        return model, fp, {"teacher": paths.teacher_key(cfg)}
    models, fps, names = [], [], []
    for entry in st.teachers:
        sub = cfg.copy()
        OmegaConf.set_struct(sub, False)
        sub.model = OmegaConf.merge(cfg.model, entry)
        m, fp = load_teacher(sub)
        models.append(m)
        fps.append(fp)
        names.append(paths.teacher_key(sub))
    rescale = bool(st.get("ensemble_rescale", False))
    ens = EnsembleTeacher(models, str(st.ensemble), rescale=rescale)
    fp = fingerprint_obj([fps, str(st.ensemble), rescale])
    meta = {"teacher": names, "teacher_fingerprints": fps, "ensemble": str(st.ensemble), "ensemble_rescale": rescale}
    return ens, fp, meta


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate (or resume) the label store of this config; every rank returns the same summary.

    Rank 0 alone prepares the store (create / check / resume decision), the decision is broadcast
    (``lpld.dist.decide``); after the predict loop every rank waits for every commit, rank 0 hashes the
    store (``finalize``) and a barrier holds the others until the store is complete, so the next
    stage never opens a half-written store.
    """
    from lpld import dist
    from lpld.core.images import load_distilled
    from lpld.core.storage_accounting import format_table
    from lpld.lit.relabel_datamodule import RelabelDataModule
    from lpld.lit.relabel_module import RelabelModule
    from lpld.stages.common import build_trainer, dataset_spec, num_workers

    st = cfg.stage
    teacher, teacher_fp, tmeta = load_relabel_teacher(cfg)
    images_dir = paths.images_dir(cfg)
    images, _labels, img_man = load_distilled(
        images_dir,
        expect_teacher_fingerprint=None if "ensemble" in tmeta else teacher_fp,  # images come from model=
        allow_other_teacher=bool(st.allow_other_teacher),
    )
    ds = dataset_spec(cfg)
    if tuple(images.shape[1:]) != (ds.channels, ds.image_size, ds.image_size):
        raise ArtifactError(
            f"distilled images at {images_dir} are {tuple(images.shape[1:])}, dataset={ds.name} expects "
            f"{(ds.channels, ds.image_size, ds.image_size)}; rerun stage=recover for this dataset"
        )
    spec = build_spec(cfg, num_images=images.shape[0])
    path = store_path(cfg)
    png_bytes = sum(p.stat().st_size for p in images_dir.rglob("*.png"))
    meta = {
        "images_fingerprint": img_man.get("images_fingerprint"),
        "teacher_fingerprint": teacher_fp,
        "images_dir": str(images_dir),
        "image_bytes": {"png_files": int(png_bytes), "uint8_pixels": int(images.numel())},
        **tmeta,
    }
    bpf = st.get("batches_per_forward")
    if bpf is not None and int(bpf) < 1:
        raise ConfigError(f"stage.batches_per_forward must be >= 1 or null (auto), got {bpf}")
    acc = dist.accelerator_of(cfg)
    # a child re-launched by Lightning starts inside rank 0's Trainer: rank 0 prepared the store already
    state = dist.decide(
        lambda: prepare(path, spec, meta, overwrite=bool(st.overwrite)), follow="resume", accelerator=acc
    )
    if state == "complete":
        log.info("label store %s is complete for this config; nothing to do", path)
    else:
        log.info("relabel (%s): %s", state, path)
        nw = st.get("num_workers")
        dm = RelabelDataModule(
            path, None if bpf is None else int(bpf), num_workers=num_workers(cfg) if nw is None else int(nw)
        )
        module = RelabelModule(teacher, path, images, ds.mean, ds.std, chunk=int(st.chunk))
        del images  # the module holds the only copy (moved to the device by the Trainer)
        trainer = build_trainer(
            cfg, logger=None, use_distributed_sampler=False, inference_mode=True, precision=str(st.precision)
        )
        trainer.predict(module, datamodule=dm, return_predictions=False)
        # per-rank launchers: every rank returns here; wait for all commits before rank 0 hashes
        dist.barrier()
        if dist.rank() == 0:
            finalize(path)
        dist.barrier()  # nobody opens the store before rank 0 marked it complete
    store = LabelStore.open(path, verify="fast")
    man = store.manifest
    acc_tbl = man["accounting"]
    on_disk = disk_bytes(path)
    if dist.rank() == 0:
        rows = sorted(acc_tbl["components"].items()) + [("npy_headers", acc_tbl["npy_headers"])]
        print(format_table(rows, f"label store {path} ({len(store)} batches)"))
        print(f"bytes on disk (incl. manifest): {on_disk:,d}; disk / accounting = {on_disk / acc_tbl['total']:.4f}")
    return {"path": str(path), "batches": len(store), "label_bytes": acc_tbl["total"], "disk_bytes": on_disk}
