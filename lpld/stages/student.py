"""Stage ``student``: train a fresh student on distilled images + a label store; append a results record.

Inputs: the distilled images of ``lpld.artifacts.images.path(exp)`` and the label store of this config
(``stage.store`` overrides its path). With ``metric=random`` the store generated at ``prune`` is
the label pool. With a pruning metric the store generated at ``metric.source_prune`` (1x) is read
and ``label_pool.pool_size(M, prune.ratio)`` of its batches are kept by ``label_pool.select_pool``
on the per-batch scores of ``prune_metrics`` (Table 5 protocol); label bytes are then those of
the kept batches. With ``student.labels=online`` (or ``generator``) no store is read: the teacher (or a label
generator trained from it) labels every batch of the 1x schedule at train time (``lpld.core.online_labels``) and
the record counts its fp16 bytes as ``model_bytes`` (docs/frontier.md sections 6 and 8).

Outputs (deterministic paths): checkpoints under
``<artifacts>/<dataset>/<teacher>/students/<images key>/<store key>/<student key>/``
(``last.ckpt`` resumes an interrupted run with the same label-pool draws; ``final.json`` marks a
finished run so a rerun does not append a second record) and one JSON record per finished run in
``lpld.artifacts.results.path(exp, stage.results_name)`` (``lpld.report.records``).

The stage is split by job; :func:`run` calls each once, in this order:

    student_store   the inputs: images, label store (located, opened, checked), every value the jobs use
    student_record  the run's key and folders, a finished run reused; at the end the results record
    student_pool    the label pool (a pruning metric's selection) and its bytes
    student_train   the StudentModule and its data, the fit (resumed), the final evaluation
"""

from __future__ import annotations

import logging
from typing import Any

from lpld.config import metric_settings, student_settings  # noqa: F401 - re-exported (lpld.config)
from lpld.config.frozen import Experiment
from lpld.config.student_run import student_model_cfg  # noqa: F401 - re-exported
from lpld.stages.common import logged_config
from lpld.stages.student_pool import Pool, build_pool, full_store_bytes, score_store  # noqa: F401 - re-exported
from lpld.stages.student_record import RunFiles, build_record, finish_run, finished_run, put_record, run_files
from lpld.stages.student_store import (  # noqa: F401 - re-exported
    StudentInputs,
    check_store,
    label_store_dir,
    load_inputs,
    students_dir,
)
from lpld.stages.student_train import (  # noqa: F401 - re-exported
    build_data,
    build_module,
    checkpoint_readable,
    remove_partial_checkpoints,
    train,
    training_kwargs,
)

log = logging.getLogger("lpld")

# Tests inject callbacks here (e.g. to simulate an interruption); empty in normal runs.
extra_callbacks: list[Any] = []


def run(exp: Experiment) -> dict[str, Any]:
    """Train (or resume, or reuse) the student of this experiment and record its accuracy; returns top-1 / top-5."""
    from lpld import dist

    # per-rank launches (torchrun / srun): form the process group now and export RANK, so every rank-0-only
    # step below (locks, moving a run aside, writing the record) knows its rank
    accelerator = dist.accelerator_of(exp)
    dist.ensure_group(accelerator)
    inp = load_inputs(exp)
    files = run_files(exp, inp)
    done = finished_run(exp, files, accelerator)
    if done is not None:
        log.info("student %s already finished (top1 %.4f); stage.overwrite=true retrains", files.run_key, done["top1"])
        return {"top1": done["top1"], "top5": done["top5"], "reused": True}
    pool = build_pool(inp.store, inp.labels, inp.metric, inp.prune, inp.seed)
    module = build_module(inp)
    data = build_data(inp, pool)
    trainer, res, fit_s = train(exp, inp, module, data, files, extra_callbacks)
    record = build_record(logged_config(exp, inp.manifest), inp, pool, files, res, fit_s, trainer)
    if trainer.is_global_zero:
        finish_run(files, record)
    dist.barrier()  # per-rank launches: no rank moves on (e.g. to stage=report) before the record exists
    return {"top1": record["top1"], "top5": record["top5"]}


__all__ = ["Pool", "RunFiles", "put_record", "run"]
