"""Student stage, records: where a run keeps its state (its key, folder and this command's results file), a
finished run reused, and the results record of a finished run (accuracy, every byte it needed, the experiment)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpld.artifacts import results as results_artifact
from lpld.artifacts import students as students_artifact
from lpld.config.frozen import Experiment
from lpld.core.io import atomic_write_json, drop_aside, release_lock
from lpld.stages.common import logged_config
from lpld.stages.student_pool import Pool, full_store_bytes
from lpld.stages.student_store import StudentInputs

log = logging.getLogger("lpld")


@dataclass
class RunFiles:
    """Where a student run keeps its state: ``run_dir`` (checkpoints, final.json) and the results file."""

    run_key: str
    run_dir: Path
    results_file: Path

    @property
    def final(self) -> Path:
        return self.run_dir / "final.json"


def run_files(exp: Experiment, inp: StudentInputs) -> RunFiles:
    """The run's key and folders (lpld.artifacts.students) and this command's results file."""
    from lpld.lit.perf import resolve_precision

    # what makes two runs train differently: knobs, pool, architecture, seed, store, images, world size
    # (the global batch and step count are the recipe's at any world size, but BatchNorm normalises each
    # rank's rows on their own) and the precision the student actually trains in
    run_spec = students_artifact.spec(
        exp,
        inp.store_dir,
        model=inp.model_cfg,
        settings=inp.settings,
        metric=inp.metric,
        images_fingerprint=inp.images_manifest.get("images_fingerprint"),
        world=inp.world,
        precision=resolve_precision(exp.trainer, "student"),
    )
    results = results_artifact.path(exp, str(inp.stage["results_name"]))
    return RunFiles(run_spec.key(), students_artifact.path(exp, run_spec), results)


def finished_run(exp: Experiment, files: RunFiles, accelerator: Any) -> dict[str, Any] | None:
    """The finished run's summary (reused: its record is written to this command's results file if missing), or
    None to train / resume. Rank 0 decides and moves folders; every rank takes the same branch."""
    from lpld import dist

    overwrite = bool(exp.stage["overwrite"])

    def decide() -> dict[str, Any] | None:
        done = students_artifact.prepare(files.run_dir, files.final, overwrite)
        if done is not None:
            # records are a function of the finished run: write it where this command asks, if missing
            _ensure_record(files.results_file, done, exp)
        return done

    # every rank reads last.ckpt only after rank 0's decision (and any move)
    return dist.decide(decide, follow=None, accelerator=accelerator)


def build_record(
    config: dict[str, Any],
    inp: StudentInputs,
    pool: Pool,
    files: RunFiles,
    res: dict[str, Any],
    fit_s: float,
    trainer: Any,
) -> dict[str, Any]:
    """The results record of a finished run (``lpld.report.records``): accuracy, storage, pool and ``config`` (the
    resolved experiment: what stage=show prints and W&B log)."""
    from lpld.core.images import image_file_bytes
    from lpld.core.storage_accounting import image_bytes as raw_image_bytes

    man, images = inp.manifest, inp.images
    return {
        "config": config,
        "method": inp.method,
        "dataset": inp.spec.name,
        "teacher": inp.teacher_name,
        "ipc": int(config["ipc"]),
        "seed": inp.seed,
        "prune": {
            "name": str(inp.prune.get("name")),
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
        "labels": inp.label_source if inp.online else "hard" if inp.settings["loss"] == "ce" else "soft",
        "label_bytes": pool.label_bytes - (pool.label_only_bytes if inp.settings["loss"] == "ce" else 0),
        "label_only_bytes": 0 if inp.settings["loss"] == "ce" else pool.label_only_bytes,
        # a network the student runs at train time (lpld.report.accounting "model"): the online teacher, its
        # parameters and buffers in fp16 (storage_accounting.model_bytes); 0 bytes of labels and records then
        **({"model_bytes": inp.teacher_bytes, "model_bytes_of": _model_of[inp.label_source]} if inp.online else {}),
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
        "world_size": inp.world,
        "global_batch": int(man["batch_size"]),
        **_epoch_accounting(trainer),
    }


# what the "model" bytes of a record with no label store are (lpld.report.accounting)
_model_of = {"online": "teacher fp16", "generator": "label generator fp16"}


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


def _ensure_record(out: Path, done: dict[str, Any], exp: Experiment) -> None:
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
    record = dict(record, config=logged_config(exp, man))  # same run (same run_key); this command's experiment
    put_record(out, record)
    log.info("student %s: wrote its record to %s", run_key, out)


def put_record(path: Path, record: dict[str, Any]) -> None:
    """Add ``record`` to a results file, replacing any record of the same ``run_key`` (a retrained run never
    leaves two records; ``lpld.report.records.replace_record``)."""
    from lpld.report.records import replace_record

    replace_record(path, record)
