"""Stage ``student``: train a fresh student on distilled images + a label store; append a results record.

Inputs: the distilled images of ``lpld.artifacts.images.path(cfg)`` and the label store of this config
(``stage.store`` overrides its path). With ``metric=random`` the store generated at ``prune`` is
the label pool. With a pruning metric the store generated at ``metric.source_prune`` (1x) is read
and ``label_pool.pool_size(M, prune.ratio)`` of its batches are kept by ``label_pool.select_pool``
on the per-batch scores of ``prune_metrics`` (Table 5 protocol); label bytes are then those of
the kept batches.

Outputs (deterministic paths): checkpoints under
``<artifacts>/<dataset>/<teacher>/students/<images key>/<store key>/<student key>/``
(``last.ckpt`` resumes an interrupted run with the same label-pool draws; ``final.json`` marks a
finished run so a rerun does not append a second record) and one JSON record per finished run in
``lpld.artifacts.results.path(cfg, stage.results_name)`` (``lpld.report.records``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from lpld.artifacts import images as images_artifact
from lpld.artifacts import results as results_artifact
from lpld.artifacts import students as students_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.config import metric_settings, student_settings  # noqa: F401 - resolved in lpld.config (re-exported)
from lpld.config.student_run import store_config, student_model_cfg, world_size  # noqa: F401 - re-exported
from lpld.core import quant
from lpld.core.io import (
    ArtifactError,
    atomic_write_json,
    drop_aside,
    release_lock,
)
from lpld.core.label_pool import pool_size, select_pool
from lpld.core.prune_metrics import batch_score, per_sample_scores
from lpld.stages import ConfigError
from lpld.stages.common import (
    build_logger,
    build_trainer,
    dataset_spec,
    finish_logger,
    log_summary,
    logged_config,
    num_workers,
)

log = logging.getLogger("lpld")

# Tests inject callbacks here (e.g. to simulate an interruption); empty in normal runs.
extra_callbacks: list[Any] = []


def label_store_dir(cfg: DictConfig) -> Path:
    """Directory of the label store this student reads (``stage.store`` overrides; lpld.config.student_run)."""
    if cfg.stage.get("store"):
        return students_artifact.store_dir(cfg)
    return students_artifact.store_dir(cfg, store_config(cfg))


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


def score_store(store: Any, metric: str, image_labels: torch.Tensor) -> np.ndarray:
    """(M,) per-batch scores of a pruning metric: the mean per-sample score of each stored batch."""
    from lpld.lit.student_module import cutmix_share

    man = store.manifest
    mode, c, out = str(man["quant"]["mode"]), int(man["num_classes"]), int(man["aug"]["out_size"])
    gen_t = float(man["quant"].get("temperature", 1.0))
    scores = np.empty(len(store), dtype=np.float64)
    for i in range(len(store)):
        b = store.read(i)
        probs = None if mode == "hard" else quant.decode(b, mode, 1.0, c, gen_temperature=gen_t)
        s = per_sample_scores(
            metric,
            image_labels[b.index],
            probs=probs,
            logits=b.logits.float() if b.logits is not None else None,
            hard=b.hard,
            cut_lambda=cutmix_share(b.aug, out),
        )
        scores[i] = batch_score(s)
    return scores


@dataclass
class Pool:
    rows: np.ndarray  # store rows of the label pool
    label_bytes: int  # accounting total of the pooled batches (labels + augmentation records)
    label_only_bytes: int  # of which soft/hard label arrays
    target_ratio: float
    achieved: dict[str, Any] | None = None  # label_store.achieved_ratio of the pool against the full schedule


def _achieved(cfg: DictConfig, store: Any, kept: int, ratio: float, name: str) -> dict[str, Any]:
    """The pruning the pool really achieves (kept stored batches / batches of the full schedule), checked.

    A ratio the schedule cannot reach within ``RATIO_REFUSE`` is refused (ArtifactError naming the fix);
    within it but off by more than ``RATIO_WARN`` the run goes on with a warning, and the record carries
    the achieved ratio and factor next to the requested ones.
    """
    from lpld.core.label_store import achieved_ratio

    man = store.manifest
    units = int(man["epochs"]) * int(man["batches_per_epoch"])
    what = f"the label schedule ({man['epochs']} epochs x {man['batches_per_epoch']} batches)"
    if ratio <= 0 and kept == units:
        return {"ratio": 0.0, "factor": 1.0, "requested_factor": 1.0, "off": False}
    # the student's pool draws stored batches (the improved label pool): batch units, unless the store is per epoch
    out = achieved_ratio(units, kept, ratio, name, what, str(man["prune"].get("granularity", "batch")))
    if out["off"]:
        log.warning(
            "prune=%s asks for %.1fx but the pool keeps %d of %d stored batches: %.2fx; the record says so "
            "(prune.achieved_factor)",
            name,
            out["requested_factor"],
            kept,
            units,
            out["factor"],
        )
    return out


def build_pool(cfg: DictConfig, store: Any, image_labels: torch.Tensor) -> Pool:
    """The label pool (all stored batches for random; metric-selected batches otherwise)."""
    from lpld.core.label_store import accounting, array_layout

    m = metric_settings(cfg)
    man = store.manifest
    acc = man["accounting"]
    ratio = float(cfg.prune.get("ratio", 0.0)) if cfg.get("prune") is not None else 0.0
    if m["name"] == "random":
        return Pool(
            np.arange(len(store), dtype=np.int64),
            int(acc["total"]),
            int(acc["labels_bytes"]),
            float(man["prune"]["ratio"]),
            _achieved(cfg, store, len(store), float(man["prune"]["ratio"]), str(man["prune"]["name"])),
        )
    src_ratio = float(man["prune"]["ratio"])
    if src_ratio > 0:
        log.warning(
            "metric=%s selects from a store already pruned at %s (metric.source_prune=%s)",
            m["name"],
            man["prune"]["name"],
            m["source_prune"],
        )
    keep = pool_size(len(store), ratio)
    achieved = _achieved(cfg, store, keep, ratio, str(cfg.prune.get("name")))
    log.info("scoring %d stored batches by %s to keep %d (%s order)", len(store), m["name"], keep, m["order"])
    scores = score_store(store, m["name"], image_labels)
    rows = select_pool(scores, keep, m["order"], m["drop_easy"], m["drop_hard"], seed=int(cfg.seed))
    offs = np.asarray(store.arrays["row_offsets"], dtype=np.int64)
    n_rows = int((offs[rows + 1] - offs[rows]).sum())
    kept = accounting(array_layout(store.spec, len(rows), n_rows))
    return Pool(rows, int(kept["total"]), int(kept["labels_bytes"]), ratio, achieved)


def full_store_bytes(store: Any) -> int:
    """Accounting total of the 1x, unquantized store of the same images / schedule / augmentation."""
    import dataclasses

    from lpld.core.quant import QuantConfig
    from lpld.core.storage_accounting import predict_store

    spec = dataclasses.replace(store.spec, prune_name="1x", prune_ratio=0.0, quant=QuantConfig("none"))
    return int(predict_store(spec)["total"])


# ----------------------------------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------------------------------


def training_kwargs(st: dict[str, Any]) -> dict[str, Any]:
    """StudentModule's loss / temperature (DKR) / CA / optimizer arguments from resolved settings."""
    return {
        "loss": {
            "name": st["loss"],
            "gamma": st["gamma"],
            "t2": st["kd_t2"],
            "mse_target": st["mse_target"],
            "smoothing_space": st["smoothing_space"],
        },
        "temp": {
            "t0": st["temperature"],
            "schedule": st["temp_schedule"],
            "step_size": st["temp_step_size"],
            "gamma": st["temp_gamma"],
            "floor": st["temp_floor"],
            "t_min": st["temp_min"],
            "epoch_base": st["temp_epoch_base"],
        },
        "ca": {
            "mode": st["ca"],
            "value": st["ca_value"],
            "lo": st["ca_grid"][0],
            "hi": st["ca_grid"][1],
            "n": int(st["ca_grid"][2]),
        },
        "optim": {
            "name": st["optimizer"],
            "lr": st["lr"],
            "weight_decay": st["weight_decay"],
            "momentum": st["momentum"],
            "warmup_epochs": st["warmup_epochs"],
            "warmup_start": st["warmup_start"],
            "scheduler": st["scheduler"],
            "wd_exclude_bn_bias": st["wd_exclude_bn_bias"],
        },
    }


@dataclass
class StudentInputs:
    """What a student run reads: distilled images, the label store and the resolved settings."""

    spec: Any  # DatasetSpec
    metric: dict[str, Any]  # label-pool selection (metric_settings)
    images_dir: Path
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # (N,) class of each distilled image
    images_manifest: dict[str, Any]
    store_dir: Path
    store: Any  # LabelStore
    settings: dict[str, Any]  # student_settings (the store's schedule filled in)
    model_cfg: dict[str, Any]  # the student architecture

    @property
    def manifest(self) -> dict[str, Any]:
        return self.store.manifest


@dataclass
class RunFiles:
    """Where a student run keeps its state: ``run_dir`` (checkpoints, final.json) and the results file."""

    run_key: str
    run_dir: Path
    results_file: Path

    @property
    def final(self) -> Path:
        return self.run_dir / "final.json"


def load_inputs(cfg: DictConfig) -> StudentInputs:
    """Open the distilled images and the label store of this config and resolve the student settings."""
    from lpld.core.images import load_distilled
    from lpld.core.label_store import LabelStore

    spec = dataset_spec(cfg)
    metric = metric_settings(cfg)
    images_dir = images_artifact.path(cfg)
    teacher_fp = teacher_artifact.fingerprint(cfg)
    images_artifact.require(cfg)
    images, labels, img_man = load_distilled(
        images_dir,
        expect_teacher_fingerprint=teacher_fp,
        allow_other_teacher=bool(cfg.stage.get("allow_other_teacher", False)),
    )
    store_dir = label_store_dir(cfg)
    if not cfg.stage.get("store") and not (store_dir / "manifest.json").is_file():
        from lpld.artifacts import labels as labels_artifact
        from lpld.artifacts.catalog import missing_hint

        raise ArtifactError(
            f"no label store at {store_dir}; run `python run.py stage=relabel` with the same overrides first"
            + missing_hint(cfg, "labels", labels_artifact.spec(store_config(cfg)))
        )
    store = LabelStore.open(store_dir, verify=str(cfg.stage.get("verify", "fast")))
    st = student_settings(cfg, store.manifest)
    check_store(store, img_man, images, spec, st, store_dir)
    return StudentInputs(
        spec, metric, images_dir, images, labels, img_man, store_dir, store, st, student_model_cfg(cfg)
    )


def run_files(cfg: DictConfig, inp: StudentInputs) -> RunFiles:
    """The run's key and folders (lpld.artifacts.students) and this command's results file."""
    from lpld.lit.perf import resolve_precision

    # what makes two runs train differently: knobs, pool, architecture, seed, store, images, world size
    # (the global batch and step count are the recipe's at any world size, but BatchNorm normalises each
    # rank's rows on their own) and the precision the student actually trains in
    run_spec = students_artifact.spec(
        cfg,
        inp.store_dir,
        model=inp.model_cfg,
        settings=inp.settings,
        metric=inp.metric,
        images_fingerprint=inp.images_manifest.get("images_fingerprint"),
        world=world_size(cfg),
        precision=resolve_precision(cfg.trainer, "student"),
    )
    results = results_artifact.path(cfg, str(cfg.stage.get("results_name", "results")))
    return RunFiles(run_spec.key(), students_artifact.path(cfg, run_spec), results)


def finished_run(cfg: DictConfig, files: RunFiles) -> dict[str, Any] | None:
    """The finished run's summary (reused: its record is written to this command's results file if missing), or
    None to train / resume. Rank 0 decides and moves folders; every rank takes the same branch."""
    from lpld import dist

    overwrite = bool(cfg.stage.get("overwrite", False))

    def decide() -> dict[str, Any] | None:
        done = students_artifact.prepare(files.run_dir, files.final, overwrite)
        if done is not None:
            # records are a function of the finished run: write it where this command asks, if missing
            _ensure_record(files.results_file, done, cfg)
        return done

    # every rank reads last.ckpt only after rank 0's decision (and any move)
    return dist.decide(decide, follow=None, accelerator=dist.accelerator_of(cfg))


def build_module(cfg: DictConfig, inp: StudentInputs) -> Any:
    """A fresh StudentModule seeded by ``seed`` (its initialisation is the first draw after seeding)."""
    import lightning as L

    from lpld.lit.student_module import StudentModule

    st, man, spec = inp.settings, inp.manifest, inp.spec
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = StudentModule(
        model_cfg=inp.model_cfg,
        num_classes=spec.num_classes,
        in_chans=spec.channels,
        img_size=spec.image_size,
        quant_mode=str(man["quant"]["mode"]),
        quant_gen_temperature=float(man["quant"].get("temperature", 1.0)),
        **training_kwargs(st),
        epochs=st["epochs"],
        steps_per_epoch=_steps_per_epoch(cfg, int(man["batches_per_epoch"])),
        mean=spec.mean,
        std=spec.std,
        label_smoothing=st["label_smoothing"],
        accumulate=int(st["accumulate"]),
        ema_decay=st["ema_decay"],
    )
    module.set_images(inp.images, inp.labels)
    return module


def build_data(cfg: DictConfig, inp: StudentInputs, pool: Pool) -> Any:
    """The StudentData of the label pool (stored batches replayed per epoch) and the real val set."""
    from lpld.data import build_dataset
    from lpld.data.transforms import eval_transform
    from lpld.lit.student_module import StudentData

    val = build_dataset(cfg.dataset, "val", transform=eval_transform(cfg.dataset))
    nw = cfg.stage.get("num_workers")
    return StudentData(
        inp.store,
        pool.rows,
        int(inp.manifest["batches_per_epoch"]),
        inp.settings["granularity"],
        int(cfg.seed),
        accumulate=int(inp.settings["accumulate"]),
        val_dataset=val,
        val_batch_size=int(cfg.stage.get("val_batch_size", 256)),
        num_workers=num_workers(cfg) if nw is None else int(nw),
        val_num_workers=num_workers(cfg),
        draw=inp.settings["draw"],
        swap_last=inp.settings["swap_last"],
    )


def train(cfg: DictConfig, inp: StudentInputs, module: Any, data: Any, files: RunFiles) -> tuple[Any, dict, float]:
    """Fit (resuming from ``run_dir/last.ckpt``), then validate once; returns (trainer, val metrics, fit seconds)."""
    from lpld.lit.fit import fit_with_resume, resumable_checkpoint

    st, run_dir = inp.settings, files.run_dir
    ckpt = resumable_checkpoint(run_dir, int(cfg.stage.get("ckpt_every", 1)), save_on_train_epoch_end=True)
    val_every = int(cfg.stage.get("val_every", 10))
    logger = build_logger(cfg, "student", store_manifest=inp.manifest)  # name: common.run_name
    t0 = time.perf_counter()
    try:
        trainer = build_trainer(
            cfg,
            logger=logger,
            callbacks=[ckpt, *extra_callbacks],
            max_epochs=st["epochs"],
            accumulate_grad_batches=int(st["accumulate"]),
            reload_dataloaders_every_n_epochs=1,
            use_distributed_sampler=False,
            check_val_every_n_epoch=val_every if val_every > 0 else st["epochs"] + 1,
        )
        fit_with_resume(
            trainer,
            module,
            run_dir,
            datamodule=data,
            what="student",
            check_resume=lambda last: _check_checkpoint(last, run_dir),
            on_error=lambda e: _raise_if_disk_full(e, run_dir),
        )
        fit_s = time.perf_counter() - t0
        evaluator = build_trainer(cfg, logger=False, use_distributed_sampler=False, enable_progress_bar=False)
        res = evaluator.validate(module, datamodule=data, verbose=False)[0]
        # the final evaluation is the record's accuracy: the run's summary holds the same floats (also when
        # epochs < val_every, where the fit logged no validation at all)
        final = {k: float(res[k]) for k in ("val/top1", "val/top5") if k in res}
        log_summary(logger, {**final, **{k.split("/")[1]: v for k, v in final.items()}, "run_key": files.run_key})
    finally:
        finish_logger(logger)
    return trainer, res, fit_s


def _check_checkpoint(last: Path, run_dir: Path) -> None:
    if not checkpoint_readable(last):
        raise ArtifactError(
            f"student checkpoint {last} is truncated or corrupt (an interrupted write or a full disk); rerun the "
            "same command with stage.overwrite=true to retrain this student from scratch (the old run folder is "
            f"kept as {run_dir.name}.replaced until the new run finishes)"
        )
    from lpld.models.checkpoint import check_plain_tensor_file  # never torch's "retry with weights_only=False"

    check_plain_tensor_file(last, "delete it, or rerun with stage.overwrite=true to retrain this student from scratch")


def _raise_if_disk_full(e: BaseException, run_dir: Path) -> None:
    if _disk_full(e):
        removed = remove_partial_checkpoints(run_dir)
        raise ArtifactError(
            f"the disk holding {run_dir} filled up while training the student (removed "
            f"{len(removed)} partial checkpoint file(s); complete checkpoints are kept); free some space or "
            "point paths.artifacts at a larger volume, then rerun the same command to resume"
        ) from e


def build_record(
    cfg: DictConfig, inp: StudentInputs, pool: Pool, files: RunFiles, res: dict[str, Any], fit_s: float, trainer: Any
) -> dict[str, Any]:
    """The results record of a finished run (``lpld.report.records``): accuracy, storage, pool and config."""
    from lpld.core.images import image_file_bytes
    from lpld.core.storage_accounting import image_bytes as raw_image_bytes

    man, images = inp.manifest, inp.images
    return {
        "config": logged_config(cfg, man),  # the resolved experiment: what stage=show prints and W&B logs
        "method": str(cfg.recover.name),
        "dataset": inp.spec.name,
        "teacher": teacher_artifact.teacher_name(cfg),
        "ipc": int(cfg.ipc),
        "seed": int(cfg.seed),
        "prune": {
            "name": str(cfg.prune.get("name")),
            "ratio": pool.target_ratio,
            # what the pool really keeps of the full schedule (a short schedule cannot reach every ratio)
            "achieved_ratio": float((pool.achieved or {}).get("ratio", pool.target_ratio)),
            "achieved_factor": float((pool.achieved or {}).get("factor", 1.0 / (1.0 - pool.target_ratio))),
            "granularity": str(man["prune"]["granularity"]),
            "store_prune": man["prune"],
        },
        "quant": dict(man["quant"]),
        "metric": inp.metric,
        "student_model": inp.model_cfg["name"],
        "student": inp.settings,
        # issue 20: the images' storage is the bytes stored (JPEG by default, as the official files); raw uint8 aside
        "image_bytes": image_file_bytes(inp.images_dir),
        "image_file_bytes": image_file_bytes(inp.images_dir),
        "image_pixel_bytes": raw_image_bytes(images.shape[0], images.shape[1], images.shape[2]),
        # a hard-label student (loss ce) reads no stored label, only the augmentation records it replays:
        # 0 label bytes, its records still counted (issue 19: the hard row showed the soft store's bytes)
        "labels": "hard" if inp.settings["loss"] == "ce" else "soft",
        "label_bytes": pool.label_bytes - (pool.label_only_bytes if inp.settings["loss"] == "ce" else 0),
        "label_only_bytes": 0 if inp.settings["loss"] == "ce" else pool.label_only_bytes,
        "label_bytes_1x": full_store_bytes(inp.store),
        "compression_vs_1x": full_store_bytes(inp.store) / max(1, pool.label_bytes),
        "top1": float(res["val/top1"]),
        "top5": float(res["val/top5"]),
        "epochs": int(inp.settings["epochs"]),
        "wall_time_s": float(fit_s),
        "run_key": files.run_key,
        "store_dir": str(inp.store_dir),
        "pool_batches": int(len(pool.rows)),
        # the recipe at this world size: ranks split each stored batch, so the global batch is the store's
        "world_size": world_size(cfg),
        "global_batch": int(man["batch_size"]),
        **_epoch_accounting(trainer),
    }


def finish_run(files: RunFiles, record: dict[str, Any]) -> None:
    """Rank 0: the record (replacing an overwritten run's), final.json, then drop the replaced run and the lock."""
    put_record(files.results_file, record)  # replaces this run_key's record if an overwritten run left one
    final = {
        "top1": record["top1"],
        "top5": record["top5"],
        "results_file": str(files.results_file),
        "run_key": files.run_key,
        "record": record,
    }
    atomic_write_json(files.final, final)
    drop_aside(files.run_dir)  # stage.overwrite=true: the replaced run goes only now
    release_lock(files.run_dir)
    log.info("student %s: top1 %.4f top5 %.4f -> %s", files.run_key, record["top1"], record["top5"], files.results_file)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume, or reuse) the student of this config and record its accuracy; returns top-1 / top-5."""
    from lpld import dist

    # per-rank launches (torchrun / srun): form the process group now and export RANK, so every rank-0-only
    # step below (locks, moving a run aside, writing the record) knows its rank
    dist.ensure_group(dist.accelerator_of(cfg))
    inp = load_inputs(cfg)
    files = run_files(cfg, inp)
    done = finished_run(cfg, files)
    if done is not None:
        log.info("student %s already finished (top1 %.4f); stage.overwrite=true retrains", files.run_key, done["top1"])
        return {"top1": done["top1"], "top5": done["top5"], "reused": True}
    pool = build_pool(cfg, inp.store, inp.labels)
    module = build_module(cfg, inp)
    data = build_data(cfg, inp, pool)
    trainer, res, fit_s = train(cfg, inp, module, data, files)
    record = build_record(cfg, inp, pool, files, res, fit_s, trainer)
    if trainer.is_global_zero:
        finish_run(files, record)
    dist.barrier()  # per-rank launches: no rank moves on (e.g. to stage=report) before the record exists
    return {"top1": record["top1"], "top5": record["top5"]}


def _steps_per_epoch(cfg: DictConfig, batches_per_epoch: int) -> int:
    """Optimizer steps per epoch: one per stored batch at any world size (ranks split each batch's rows)."""
    return int(batches_per_epoch)


def _epoch_accounting(trainer: Any) -> dict[str, Any]:
    """Rows trained (all ranks) and optimizer steps in the last epoch, from the logged epoch sums."""
    m = trainer.callback_metrics
    rows, steps = m.get("train/rows"), m.get("train/steps")
    if rows is None or steps is None:
        return {}
    rows, steps = float(rows), float(steps)
    return {
        "last_epoch_rows": int(round(rows)),
        "last_epoch_steps": int(round(steps)),
        "rows_per_step": rows / max(1.0, steps),
        "last_epoch_train_loss": float(m["train/loss"]) if m.get("train/loss") is not None else None,
    }


def _teacher_fingerprint(cfg: DictConfig) -> str | None:
    """The current teacher's fingerprint (images made by another teacher are refused), None if unknown."""
    return teacher_artifact.fingerprint(cfg)


def _ensure_record(out: Path, done: dict[str, Any], cfg: DictConfig) -> None:
    """A finished run's record in the requested results file: written from final.json when missing there."""
    from lpld.report.records import load_records

    run_key = done.get("run_key")
    if out.exists() and any(r.get("run_key") == run_key for r in load_records(out)):
        return
    record = done.get("record")
    if record is None:
        log.warning(
            "student %s finished before records were kept in final.json, so its record cannot be written to %s; "
            "rerun with stage.overwrite=true to retrain it and record it",
            run_key,
            out,
        )
        return
    from lpld.core.io import read_json

    man_file = Path(str(record.get("store_dir", ""))) / "manifest.json"
    man = read_json(man_file) if man_file.is_file() else None
    record = dict(record, config=logged_config(cfg, man))  # same run (same run_key); this command's experiment
    put_record(out, record)
    log.info("student %s: wrote its record to %s", run_key, out)


def put_record(path: Path, record: dict[str, Any]) -> None:
    """Add ``record`` to a results file, replacing any record of the same ``run_key`` (a retrained run never
    leaves two records; ``lpld.report.records.replace_record``)."""
    from lpld.report.records import replace_record

    replace_record(path, record)


def checkpoint_readable(path: Path) -> bool:
    """A complete checkpoint file: torch.save's zip container with every member's CRC intact (nothing unpickled)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Delete the checkpoint files of ``run_dir`` that are incomplete (a write cut by a full disk) and temp files."""
    removed = []
    for f in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        partial = f.suffix == ".ckpt" and not checkpoint_readable(f)
        if f.is_file() and (partial or ".tmp" in f.name or f.name.startswith(".")):
            f.unlink()
            removed.append(f)
    return removed


def _disk_full(e: BaseException | None) -> bool:
    """An exception (or its cause) that is a full disk: OSError ENOSPC/EDQUOT, or torch's stream writer saying so."""
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        if isinstance(e, RuntimeError) and ("No space left" in str(e) or "file write failed" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False
