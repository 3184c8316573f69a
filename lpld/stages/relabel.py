"""Stage ``relabel``: generate the (pruned, quantized) soft-label store for the distilled images.

``python run.py stage=relabel prune=40x quant=mr quant.k=100 relabel.record_mode=seed`` writes
``lpld.artifacts.labels.path(exp)`` (see ``lpld.core.label_store`` for the format).
Only the kept batches are computed (pruning at generation), sharded across ranks with the
trainer preset (``trainer=ddp_cpu`` / ``ddp_spawn``); an interrupted run resumes.

The student stage finds the store with the same ``lpld.artifacts.labels.path(exp)`` (one spec, built from
the same resolved knobs) and opens it with ``lpld.artifacts.labels.open(path)``.
"""

from __future__ import annotations

import logging
from typing import Any

from lpld.artifacts import images as images_artifact
from lpld.artifacts import labels
from lpld.artifacts import teacher as teacher_artifact
from lpld.config import relabel_settings
from lpld.config.frozen import Experiment
from lpld.core.io import ArtifactError, fingerprint_obj
from lpld.core.label_store import disk_bytes, finalize
from lpld.stages import ConfigError

log = logging.getLogger("lpld")


# the label store's identity and path live in lpld.artifacts.labels; these names stay for old callers


def load_relabel_teacher(exp: Experiment) -> tuple[Any, str, dict[str, Any]]:
    """The teacher (or EnsembleTeacher of the relabel knobs' ``teachers``), its fingerprint and manifest metadata."""
    from lpld.core.relabel import EnsembleTeacher

    st = relabel_settings(exp)
    if not st["teachers"]:
        model, fp = teacher_artifact.load(exp)
        return model, fp, {"teacher": teacher_artifact.teacher_name(exp)}
    models, fps, names = [], [], []
    for entry in st["teachers"]:
        sub = exp.replace(model=_merged(exp.model.to_dict(), entry))  # the ensemble member as the teacher
        m, fp = teacher_artifact.load(sub)
        models.append(m)
        fps.append(fp)
        names.append(teacher_artifact.teacher_name(sub))
    rescale, how = st["ensemble_rescale"], st["ensemble"]
    ens = EnsembleTeacher(models, how, rescale=rescale)
    fp = fingerprint_obj([fps, how, rescale])
    meta = {"teacher": names, "teacher_fingerprints": fps, "ensemble": how, "ensemble_rescale": rescale}
    return ens, fp, meta


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` at any depth (a teacher entry of ``relabel.teachers`` over ``model``)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run(exp: Experiment) -> dict[str, Any]:
    """Generate (or resume) the label store of this config; every rank returns the same summary.

    Rank 0 alone prepares the store (create / check / resume decision), the decision is broadcast
    (``lpld.dist.decide``); after the predict loop every rank waits for every commit, rank 0 hashes the
    store (``finalize``) and a barrier holds the others until the store is complete, so the next
    stage never opens a half-written store.
    """
    from lpld import dist
    from lpld.core.storage_accounting import format_table
    from lpld.lit.relabel_datamodule import RelabelDataModule
    from lpld.lit.relabel_module import RelabelModule
    from lpld.lit.spawn_images import DistilledImagesSource
    from lpld.stages.common import build_trainer, dataset_spec, num_workers

    st = exp.stage  # how this stage runs; what the store holds is relabel_settings(exp) (the `relabel` group)
    teacher, teacher_fp, tmeta = load_relabel_teacher(exp)
    images_dir = images_artifact.path(exp)
    images, _labels, img_man = images_artifact.open(
        exp,
        teacher_fingerprint=None if "ensemble" in tmeta else teacher_fp,  # images come from model=
        allow_other_teacher=bool(st.allow_other_teacher),
    )
    ds = dataset_spec(exp)
    if tuple(images.shape[1:]) != (ds.channels, ds.image_size, ds.image_size):
        raise ArtifactError(
            f"distilled images at {images_dir} are {tuple(images.shape[1:])}, dataset={ds.name} expects "
            f"{(ds.channels, ds.image_size, ds.image_size)}; rerun stage=recover for this dataset"
        )
    spec = labels.store_spec(exp, num_images=images.shape[0])
    path = labels.path(exp)
    from lpld.core.images import image_file_bytes  # issue 20: the stored files (JPEG or PNG)

    file_bytes = image_file_bytes(images_dir)
    meta = {
        "images_fingerprint": img_man.get("images_fingerprint"),
        "teacher_fingerprint": teacher_fp,
        "images_dir": str(images_dir),
        "image_bytes": {"files": file_bytes, "uint8_pixels": int(images.numel())},
        **tmeta,
    }
    bpf = st.get("batches_per_forward")
    if bpf is not None and int(bpf) < 1:
        raise ConfigError(f"stage.batches_per_forward must be >= 1 or null (auto), got {bpf}")
    acc = dist.accelerator_of(exp)
    # a child re-launched by Lightning starts inside rank 0's Trainer: rank 0 prepared the store already
    state = dist.decide(
        lambda: labels.prepare(path, spec, meta, overwrite=bool(st.overwrite)), follow="resume", accelerator=acc
    )
    if state == "complete":
        log.info("label store %s is complete for this config; nothing to do", path)
    else:
        log.info("relabel (%s): %s", state, path)
        nw = st.get("num_workers")
        dm = RelabelDataModule(
            path, None if bpf is None else int(bpf), num_workers=num_workers(exp) if nw is None else int(nw)
        )
        module = RelabelModule(teacher, path, images, ds.mean, ds.std, chunk=int(st.chunk))
        module.set_image_source(DistilledImagesSource(str(images_dir), img_man.get("images_fingerprint")))  # spawn
        del images  # the module holds the only copy (moved to the device by the Trainer)
        precision = relabel_settings(exp)["precision"]  # the teacher forward's (part of what the store holds)
        trainer = build_trainer(
            exp, logger=None, use_distributed_sampler=False, inference_mode=True, precision=precision
        )
        trainer.predict(module, datamodule=dm, return_predictions=False)
        # per-rank launchers: every rank returns here; wait for all commits before rank 0 hashes
        dist.barrier()
        if dist.rank() == 0:
            finalize(path)
        dist.barrier()  # nobody opens the store before rank 0 marked it complete
    store = labels.open(path, verify="fast")
    man = store.manifest
    acc_tbl = man["accounting"]
    on_disk = disk_bytes(path)
    if dist.rank() == 0:
        rows = sorted(acc_tbl["components"].items()) + [("npy_headers", acc_tbl["npy_headers"])]
        print(format_table(rows, f"label store {path} ({len(store)} batches)"))
        print(f"bytes on disk (incl. manifest): {on_disk:,d}; disk / accounting = {on_disk / acc_tbl['total']:.4f}")
        if state != "complete":  # a rerun that found the store complete did no work: no W&B run
            log_store(exp, man, len(store), on_disk)
    return {"path": str(path), "batches": len(store), "label_bytes": acc_tbl["total"], "disk_bytes": on_disk}


def log_store(exp: Experiment, manifest: dict[str, Any], batches: int, on_disk: int) -> None:
    """The relabel run in W&B (job_type relabel, in the pipeline's / sweep's group): the store's accounting as the
    run's summary: label bytes, record bytes, batches, bytes on disk and each component."""
    from lpld.stages.common import build_logger, finish_logger, log_summary

    acc = manifest["accounting"]
    total = int(acc["total"])
    values: dict[str, Any] = {
        "relabel/label_bytes": total,
        "relabel/labels_only_bytes": int(acc.get("labels_bytes", total)),
        "relabel/record_bytes": int(acc.get("records_bytes", 0)),
        "relabel/batches": int(batches),
        "relabel/disk_bytes": int(on_disk),
        **{f"relabel/bytes/{k}": int(v) for k, v in sorted(acc["components"].items())},
    }
    logger = build_logger(exp, "relabel")
    try:
        if logger is not None:
            from lpld.stages.common import log_metrics

            log_metrics(logger, values)
            log_summary(logger, values)
    finally:
        finish_logger(logger)
