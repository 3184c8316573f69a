"""Student stage, training: the StudentModule and its data from the inputs, the fit (resumed from the last
checkpoint), the final evaluation, and what a full disk or a corrupt checkpoint becomes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lpld.config.frozen import Experiment
from lpld.core.io import ArtifactError
from lpld.stages.common import build_logger, build_trainer, finish_logger, log_summary
from lpld.stages.student_pool import Pool
from lpld.stages.student_record import RunFiles
from lpld.stages.student_store import StudentInputs


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
        # the hard / soft epochs (lpld.core.label_schedule); none: every epoch soft
        "label_schedule": {
            "name": st.get("label_schedule", "none"),
            "hard_epochs": st.get("hard_epochs"),
            "smoothing": st.get("hard_smoothing", 0.0),
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


def build_module(inp: StudentInputs) -> Any:
    """A fresh StudentModule seeded by ``seed`` (its initialisation is the first draw after seeding)."""
    import lightning as L

    from lpld.lit.spawn_images import DistilledImagesSource
    from lpld.lit.student_module import StudentModule

    st, man, spec = inp.settings, inp.manifest, inp.spec
    L.seed_everything(inp.seed, workers=True, verbose=False)
    module = StudentModule(
        model_cfg=inp.model_cfg,
        num_classes=spec.num_classes,
        in_chans=spec.channels,
        img_size=spec.image_size,
        quant_mode=str(man["quant"]["mode"]),
        quant_gen_temperature=float(man["quant"].get("temperature", 1.0)),
        **training_kwargs(st),
        epochs=st["epochs"],
        # one optimizer step per stored batch at any world size (ranks split each batch's rows)
        steps_per_epoch=int(man["batches_per_epoch"]),
        mean=spec.mean,
        std=spec.std,
        label_smoothing=st["label_smoothing"],
        accumulate=int(st["accumulate"]),
        ema_decay=st["ema_decay"],
        teacher=inp.teacher,  # student.labels=online: labels each replayed batch (None: the store's labels)
        # the student's BatchNorm grouping (student.bn_rows / sync_bn; lpld.core.ghost_bn), applied in setup
        bn={
            "rows": st.get("bn_rows", 0),
            "running": st.get("bn_running", "first"),
            "sync": st.get("sync_bn", False),
            "batch": int(man["batch_size"]),
        },
    )
    module.set_images(inp.images, inp.labels)
    module.set_image_source(DistilledImagesSource(str(inp.images_dir), inp.images_manifest.get("images_fingerprint")))
    return module


def build_data(inp: StudentInputs, pool: Pool) -> Any:
    """The StudentData of the label pool (stored batches replayed per epoch) and the real val set."""
    from lpld.data import build_dataset
    from lpld.data.transforms import eval_transform
    from lpld.lit.student_module import StudentData

    val = build_dataset(inp.dataset, "val", transform=eval_transform(inp.dataset))
    nw = inp.stage.get("num_workers")
    return StudentData(
        inp.store,
        pool.rows,
        int(inp.manifest["batches_per_epoch"]),
        inp.settings["granularity"],
        inp.seed,
        accumulate=int(inp.settings["accumulate"]),
        val_dataset=val,
        val_batch_size=int(inp.stage["val_batch_size"]),
        num_workers=inp.workers if nw is None else int(nw),
        val_num_workers=inp.workers,
        draw=inp.settings["draw"],
        swap_last=inp.settings["swap_last"],
    )


def train(
    exp: Experiment, inp: StudentInputs, module: Any, data: Any, files: RunFiles, callbacks: list[Any]
) -> tuple[Any, dict, float]:
    """Fit (resuming from ``run_dir/last.ckpt``), then validate once; returns (trainer, val metrics, fit seconds).

    ``exp`` builds the logger and the trainers (its config is what W&B logs); ``callbacks`` are added to the fit."""
    from lpld.lit.fit import fit_with_resume, resumable_checkpoint

    st, run_dir = inp.settings, files.run_dir
    ckpt = resumable_checkpoint(run_dir, int(inp.stage["ckpt_every"]), save_on_train_epoch_end=True)
    val_every = int(inp.stage["val_every"])
    logger = build_logger(exp, "student", store_manifest=inp.manifest)  # name: common.run_name
    t0 = time.perf_counter()
    try:
        trainer = build_trainer(
            exp,
            logger=logger,
            callbacks=[ckpt, *callbacks],
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
        evaluator = build_trainer(exp, logger=False, use_distributed_sampler=False, enable_progress_bar=False)
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
