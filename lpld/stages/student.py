"""Stage ``student``: train a fresh student on distilled images + a label store; append a results record.

Inputs: the distilled images of ``paths.images_dir(cfg)`` and the label store of this config
(``stage.store`` overrides its path). With ``metric=random`` the store generated at ``prune`` is
the label pool. With a pruning metric the store generated at ``metric.source_prune`` (1x) is read
and ``label_pool.pool_size(M, prune.ratio)`` of its batches are kept by ``label_pool.select_pool``
on the per-batch scores of ``prune_metrics`` (Table 5 protocol); label bytes are then those of
the kept batches.

Outputs (deterministic paths): checkpoints under
``<artifacts>/<dataset>/<teacher>/students/<images key>/<store key>/<student key>/``
(``last.ckpt`` resumes an interrupted run with the same label-pool draws; ``final.json`` marks a
finished run so a rerun does not append a second record) and one JSON record per finished run in
``<paths.results_dir>/<stage.results_name>.jsonl`` (``lpld.core.results``).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lpld import paths
from lpld.core import quant
from lpld.core.io import (
    ArtifactError,
    acquire_lock,
    atomic_write_json,
    drop_aside,
    fingerprint_obj,
    move_aside,
    read_json,
    release_lock,
)
from lpld.core.label_pool import GRANULARITIES, ORDERS, pool_size, select_pool
from lpld.core.prune_metrics import METRICS, batch_score, per_sample_scores
from lpld.core.results import results_file
from lpld.core.temperature import CA_MODES, SCHEDULES
from lpld.stages import ConfigError
from lpld.stages.common import build_logger, build_trainer, dataset_spec, finish_logger, num_workers, to_container

log = logging.getLogger("lpld")

# Tests inject callbacks here (e.g. to simulate an interruption); empty in normal runs.
extra_callbacks: list[Any] = []

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


# ----------------------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------------------


def _recipe(cfg: DictConfig) -> dict[str, Any]:
    from lpld.data.recipe import recipe

    return recipe(cfg.dataset, "student", int(cfg.ipc))


def student_settings(cfg: DictConfig, store_manifest: dict[str, Any]) -> dict[str, Any]:
    """Resolved student knobs: ``cfg.student.<key>``, else ``dataset.recipe.student.<key>``, else a default."""
    s, rec = cfg.student, _recipe(cfg)

    def pick(key: str, default: Any = None, rkey: str | None = None) -> Any:
        v = s.get(key)
        if v is None:
            v = rec.get(rkey or key)
        return default if v is None else v

    out = {
        "epochs": int(pick("epochs", store_manifest["epochs"])),
        "optimizer": str(pick("optimizer", "adamw")),
        "lr": float(pick("lr", 1e-3)),
        "weight_decay": float(pick("weight_decay", 0.01)),
        # official students decay only weight matrices / kernels (utils.get_parameters); false = decay all
        "wd_exclude_bn_bias": bool(pick("wd_exclude_bn_bias", True)),
        "momentum": float(pick("momentum", 0.9)),
        "warmup_epochs": float(pick("warmup_epochs", 0)),
        "warmup_start": float(s.get("warmup_start", 0.01)),
        "scheduler": str(pick("scheduler", "cosine")),
        "label_smoothing": float(pick("label_smoothing", 0.0)),
        "loss": str(s.get("loss", "kl")),
        "gamma": float(s.get("gamma", 0.1)),
        "mse_target": str(pick("mse_target", "logits")),  # mse_gt: G-VBSM's raw logits (official) | probs
        "smoothing_space": str(pick("smoothing_space", "probs")),  # label smoothing on probs | logits (in21k)
        "kd_t2": bool(pick("kd_t2", False)),
        "temperature": float(pick("temperature", 4.0)),
        "temp_schedule": str(s.get("temp_schedule", "none")),
        "temp_step_size": int(s.get("temp_step_size", 30)),
        "temp_gamma": float(s.get("temp_gamma", 0.7)),
        "temp_floor": float(s.get("temp_floor", 2.0)),
        "temp_min": float(s.get("temp_min", 1.0)),
        "temp_epoch_base": int(s.get("temp_epoch_base", 1)),  # DKR: 1-based epochs as the public LPQLD code
        "ca": str(s.get("ca", "none")),
        "ca_value": float(s.get("ca_value", 1.0)),
        "ca_grid": [float(v) for v in (s.get("ca_grid") or [0.01, 1.0, 100])],
        "granularity": str(s.get("granularity") or store_manifest.get("granularity") or "batch"),
        "accumulate": int(s.get("accumulate", 1)),
        "ema_decay": float(s.get("ema_decay", 0.0)),
        "batch_size": s.get("batch_size"),
    }
    _validate_settings(out)
    qmode = str((store_manifest.get("quant") or {}).get("mode", "none"))
    if out["loss"] == "mse_gt" and out["mse_target"] == "logits" and qmode != "none":
        raise ConfigError(
            f"student.loss=mse_gt matches the teacher's full logits (G-VBSM), but this label store is quant={qmode}; "
            "relabel with quant=none, or set student.mse_target=probs (MSE between distributions)"
        )
    return out


def _validate_settings(st: dict[str, Any]) -> None:
    from lpld.core.kd_loss import LOSSES

    checks = [
        ("loss", st["loss"], LOSSES),
        ("temp_schedule", st["temp_schedule"], SCHEDULES),
        ("ca", st["ca"], CA_MODES),
        ("granularity", st["granularity"], GRANULARITIES),
    ]
    for key, val, valid in checks:
        if val not in valid:
            raise ConfigError(f"unknown student.{key}={val!r}; valid: {', '.join(valid)}")
    if st["epochs"] < 1:
        raise ConfigError(f"student.epochs must be >= 1, got {st['epochs']}")
    if st["accumulate"] < 1:
        raise ConfigError(f"student.accumulate must be >= 1, got {st['accumulate']}")
    from lpld.core.kd_loss import MSE_TARGETS, SMOOTHING_SPACES

    for key, valid in (("mse_target", MSE_TARGETS), ("smoothing_space", SMOOTHING_SPACES)):
        if st[key] not in valid:
            raise ConfigError(f"unknown student.{key}={st[key]!r}; valid: {', '.join(valid)}")
    if len(st["ca_grid"]) != 3:
        raise ConfigError(f"student.ca_grid must be [lo, hi, n], got {st['ca_grid']}")


def metric_settings(cfg: DictConfig) -> dict[str, Any]:
    m = cfg.get("metric") or {"name": "random"}
    out = {
        "name": str(m.get("name", "random")),
        "order": str(m.get("order", "random")),
        "drop_easy": float(m.get("drop_easy", 0.0)),
        "drop_hard": float(m.get("drop_hard", 0.0)),
        "source_prune": str(m.get("source_prune", "1x")),
    }
    if out["name"] not in METRICS:
        raise ConfigError(f"unknown metric={out['name']!r}; valid: {', '.join(METRICS)}")
    if out["name"] != "random" and out["order"] not in ORDERS:
        raise ConfigError(f"unknown metric.order={out['order']!r}; valid: {', '.join(ORDERS)}")
    return out


def student_model_cfg(cfg: DictConfig) -> dict[str, Any]:
    """Student architecture: ``student.arch`` (+ ``arch_knobs``), or the teacher's architecture.

    Never inherits the teacher's weights (pretrained/checkpoint/tag are dropped): a fresh student.
    """
    teacher = to_container(cfg.model)
    arch = cfg.student.get("arch")
    knobs = dict(to_container(cfg.student.get("arch_knobs") or {}))
    if arch is None or str(arch) == str(teacher["name"]):
        base = {k: v for k, v in teacher.items() if k not in ("pretrained", "checkpoint", "tag")}
    else:
        base = {"name": str(arch)}
        f = CONF_DIR / "model" / f"{arch}.yaml"
        if f.exists():  # the architecture's default knobs from its model config
            base = {
                k: v
                for k, v in OmegaConf.to_container(OmegaConf.load(f)).items()
                if k not in ("pretrained", "checkpoint", "tag")
            }
    base.update(knobs)
    base["pretrained"] = False
    return base


# ----------------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------------


def _with_prune(cfg: DictConfig, prune_name: str) -> DictConfig:
    """A copy of cfg whose ``prune`` group is conf/prune/<prune_name>.yaml."""
    f = CONF_DIR / "prune" / f"{prune_name}.yaml"
    if not f.exists():
        raise ConfigError(f"metric.source_prune={prune_name!r}: no {f}; use a name from conf/prune/")
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.prune = OmegaConf.load(f)
    return out


def label_store_dir(cfg: DictConfig) -> Path:
    """Directory of the label store this student reads (``stage.store`` overrides)."""
    explicit = cfg.stage.get("store")
    if explicit:
        return Path(str(explicit)).expanduser().resolve()
    m = metric_settings(cfg)
    src = _with_prune(cfg, m["source_prune"]) if m["name"] != "random" else cfg
    from lpld.stages import relabel

    return Path(relabel.store_path(src))


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
    out = achieved_ratio(units, kept, ratio, name, what)
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


def run(cfg: DictConfig) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lpld import dist
    from lpld.core.images import load_distilled
    from lpld.core.label_store import LabelStore
    from lpld.core.storage_accounting import image_bytes as raw_image_bytes
    from lpld.data import build_dataset
    from lpld.data.transforms import eval_transform
    from lpld.lit.perf import resolve_precision
    from lpld.lit.student_module import StudentData, StudentModule

    # per-rank launches (torchrun / srun): form the process group now and export RANK, so every rank-0-only
    # step below (locks, moving a run aside, writing the record) knows its rank
    dist.ensure_group(dist.accelerator_of(cfg))
    spec = dataset_spec(cfg)
    metric = metric_settings(cfg)
    images_dir = paths.images_dir(cfg)
    teacher_fp = _teacher_fingerprint(cfg)
    images, labels, img_man = load_distilled(
        images_dir,
        expect_teacher_fingerprint=teacher_fp,
        allow_other_teacher=bool(cfg.stage.get("allow_other_teacher", False)),
    )
    store_dir = label_store_dir(cfg)
    store = LabelStore.open(store_dir, verify=str(cfg.stage.get("verify", "fast")))
    st = student_settings(cfg, store.manifest)
    check_store(store, img_man, images, spec, st, store_dir)
    model_cfg = student_model_cfg(cfg)

    # what makes two runs train differently: knobs, pool, architecture, seed, store, images, world size
    # (the global batch and step count are the recipe's at any world size, but BatchNorm normalises each
    # rank's rows on their own) and the precision the student actually trains in
    run_key_obj = {
        "student": st,
        "metric": metric,
        "model": model_cfg,
        "seed": int(cfg.seed),
        "store": store_dir.name,
        "images": img_man.get("images_fingerprint"),
        "world": _world_size(cfg),
        "precision": resolve_precision(cfg.trainer, "student"),
    }
    run_key = f"{model_cfg['name']}-{fingerprint_obj(run_key_obj)}"
    run_dir = students_dir(store_dir) / run_key
    final_path = run_dir / "final.json"
    results_out = results_file(paths.results_dir(cfg), str(cfg.stage.get("results_name", "results")))
    overwrite = bool(cfg.stage.get("overwrite", False))

    def decide() -> dict[str, Any] | None:
        """Rank 0: the finished run's summary (reuse), or None (train / resume) after any overwrite move."""
        acquire_lock(run_dir, "student run")  # one writer per run folder (released when it finishes, or at exit)
        if final_path.exists() and not overwrite:
            done = read_json(final_path)
            # records are a function of the finished run: write it where this command asks, if missing
            _ensure_record(results_out, done, cfg)
            release_lock(run_dir)
            return done
        if overwrite and run_dir.exists():
            # retrain from scratch: no resume from its last.ckpt; the old run stays at <run>.replaced until this
            # one has written its record, and its record is then replaced (never duplicated)
            move_aside(run_dir)
        return None

    # rank 0 decides and moves things; every rank takes the same branch and reads last.ckpt only afterwards
    done = dist.decide(decide, follow=None, accelerator=dist.accelerator_of(cfg))
    if done is not None:
        log.info("student %s already finished (top1 %.4f); stage.overwrite=true retrains", run_key, done["top1"])
        return {"top1": done["top1"], "top5": done["top5"], "reused": True}

    pool = build_pool(cfg, store, labels)
    man = store.manifest
    accumulate = int(st["accumulate"])
    bpe = int(man["batches_per_epoch"])
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    module = StudentModule(
        model_cfg=model_cfg,
        num_classes=spec.num_classes,
        in_chans=spec.channels,
        img_size=spec.image_size,
        quant_mode=str(man["quant"]["mode"]),
        quant_gen_temperature=float(man["quant"].get("temperature", 1.0)),
        **training_kwargs(st),
        epochs=st["epochs"],
        steps_per_epoch=_steps_per_epoch(cfg, bpe),
        mean=spec.mean,
        std=spec.std,
        label_smoothing=st["label_smoothing"],
        accumulate=accumulate,
        ema_decay=st["ema_decay"],
    )
    module.set_images(images, labels)
    val = build_dataset(cfg.dataset, "val", transform=eval_transform(cfg.dataset))
    data = StudentData(
        store,
        pool.rows,
        bpe,
        st["granularity"],
        int(cfg.seed),
        accumulate=accumulate,
        val_dataset=val,
        val_batch_size=int(cfg.stage.get("val_batch_size", 256)),
        num_workers=num_workers(cfg) if cfg.stage.get("num_workers") is None else int(cfg.stage.num_workers),
        val_num_workers=num_workers(cfg),
    )
    # save_top_k=1 without a monitor keeps the newest epoch file; Lightning >= 2.6 writes last.ckpt only
    # in a step that also saved a top-k checkpoint, so save_top_k=0 would never write it.
    ckpt = ModelCheckpoint(
        dirpath=str(run_dir),
        filename="epoch{epoch}",
        save_last=True,
        save_top_k=1,
        every_n_epochs=max(1, int(cfg.stage.get("ckpt_every", 1))),
        auto_insert_metric_name=False,
        save_on_train_epoch_end=True,
    )
    last = run_dir / "last.ckpt"
    resume = str(last) if last.exists() else None
    if resume and not checkpoint_readable(last):
        raise ArtifactError(
            f"student checkpoint {last} is truncated or corrupt (an interrupted write or a full disk); rerun the "
            "same command with stage.overwrite=true to retrain this student from scratch (the old run folder is "
            f"kept as {run_dir.name}.replaced until the new run finishes)"
        )
    if resume:
        log.info("resuming student training from %s", last)
    val_every = int(cfg.stage.get("val_every", 10))
    logger = build_logger(cfg, "student", name=f"student-{spec.name}-{cfg.recover.name}-ipc{cfg.ipc}-{run_key}")
    t0 = time.perf_counter()
    try:
        trainer = build_trainer(
            cfg,
            logger=logger,
            callbacks=[ckpt, *extra_callbacks],
            max_epochs=st["epochs"],
            accumulate_grad_batches=accumulate,
            reload_dataloaders_every_n_epochs=1,
            use_distributed_sampler=False,
            check_val_every_n_epoch=val_every if val_every > 0 else st["epochs"] + 1,
        )
        try:
            trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
        except (OSError, RuntimeError) as e:
            if _disk_full(e):
                removed = remove_partial_checkpoints(run_dir)
                raise ArtifactError(
                    f"the disk holding {run_dir} filled up while training the student (removed "
                    f"{len(removed)} partial checkpoint file(s); complete checkpoints are kept); free some space or "
                    "point paths.artifacts at a larger volume, then rerun the same command to resume"
                ) from e
            raise
        if trainer.interrupted:
            raise RuntimeError(f"student training was interrupted; rerun the same command to resume from {last}")
        fit_s = time.perf_counter() - t0
        evaluator = build_trainer(cfg, logger=False, use_distributed_sampler=False, enable_progress_bar=False)
        res = evaluator.validate(module, datamodule=data, verbose=False)[0]
    finally:
        finish_logger(logger)
    top1, top5 = float(res["val/top1"]), float(res["val/top5"])
    record = {
        "config": to_container(cfg),
        "method": str(cfg.recover.name),
        "dataset": spec.name,
        "teacher": paths.teacher_key(cfg),
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
        "metric": metric,
        "student_model": model_cfg["name"],
        "student": st,
        "image_bytes": raw_image_bytes(images.shape[0], images.shape[1], images.shape[2]),
        "image_file_bytes": int(sum(p.stat().st_size for p in Path(images_dir).rglob("*.png"))),
        "label_bytes": pool.label_bytes,
        "label_only_bytes": pool.label_only_bytes,
        "label_bytes_1x": full_store_bytes(store),
        "compression_vs_1x": full_store_bytes(store) / max(1, pool.label_bytes),
        "top1": top1,
        "top5": top5,
        "epochs": int(st["epochs"]),
        "wall_time_s": float(fit_s),
        "run_key": run_key,
        "store_dir": str(store_dir),
        "pool_batches": int(len(pool.rows)),
        # the recipe at this world size: ranks split each stored batch, so the global batch is the store's
        "world_size": _world_size(cfg),
        "global_batch": int(man["batch_size"]),
        **_epoch_accounting(trainer),
    }
    if trainer.is_global_zero:
        out = results_out
        put_record(out, record)  # replaces this run_key's record if an overwritten run left one
        final = {"top1": top1, "top5": top5, "results_file": str(out), "run_key": run_key, "record": record}
        atomic_write_json(final_path, final)
        drop_aside(run_dir)  # stage.overwrite=true: the replaced run goes only now
        release_lock(run_dir)
        log.info("student %s: top1 %.4f top5 %.4f -> %s", run_key, top1, top5, out)
    dist.barrier()  # per-rank launches: no rank moves on (e.g. to stage=report) before the record exists
    return {"top1": top1, "top5": top5}


def _world_size(cfg: DictConfig) -> int:
    """Processes the trainer preset will run (devices x nodes; devices=-1 means every visible GPU)."""
    from lpld.dist import planned_world_size

    return planned_world_size(cfg)


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
    from lpld.stages.common import read_teacher_file

    if cfg.model.get("checkpoint") or cfg.model.get("pretrained"):
        from lpld.stages.common import load_teacher

        return load_teacher(cfg)[1]
    p = paths.teacher_weights_path(cfg)
    if not p.exists():
        return None
    return read_teacher_file(p).get("fingerprint")


def _ensure_record(out: Path, done: dict[str, Any], cfg: DictConfig) -> None:
    """A finished run's record in the requested results file: written from final.json when missing there."""
    from lpld.core.results import load_records

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
    record = dict(record, config=to_container(cfg))  # same run (same run_key); this command's config
    put_record(out, record)
    log.info("student %s: wrote its record to %s", run_key, out)


def put_record(path: Path, record: dict[str, Any]) -> None:
    """Add ``record`` to a results file, replacing any record of the same ``run_key`` (under the file's lock).

    A retrained run (``stage.overwrite=true``) thus never leaves two records; other lines are kept byte for byte.
    """
    import fcntl
    import json

    from lpld.core.io import atomic_write_bytes
    from lpld.core.results import append_record

    if not path.exists():
        append_record(path, record)
        return
    with open(path.with_name(path.name + ".lock"), "a+") as lock:  # the lock append_record takes
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            kept = []
            for raw in path.read_bytes().splitlines():
                try:
                    same = json.loads(raw).get("run_key") == record["run_key"]
                except (json.JSONDecodeError, AttributeError):
                    same = False
                if not same and raw.strip():
                    kept.append(raw + b"\n")
            atomic_write_bytes(path, b"".join(kept))
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    append_record(path, record)


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
