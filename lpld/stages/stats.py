"""Stage ``stats``: class-wise BatchNorm statistics of the teacher (StatsModule)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lpld.artifacts import overwrite as overwrite_artifact
from lpld.artifacts import stats as stats_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.config.frozen import Experiment
from lpld.core.io import drop_aside, release_lock
from lpld.lit.stats_module import StatsJob, StatsModule, check_stats_batch
from lpld.stages.common import build_logger, build_trainer, finish_logger, log_metrics, to_container
from lpld.stages.squeeze import check_writable

log = logging.getLogger("lpld")


def stats_job(exp: Experiment, out: Path) -> StatsJob:
    """The resolved settings of the stats pass writing ``out``."""
    from lpld.config import stats_settings

    st = stats_settings(exp)
    limit = exp.stage.get("max_images")
    return StatsJob(
        dataset=to_container(exp.dataset),
        model_name=str(exp.model.name),
        mode=st["mode"],
        momentum=st["momentum"],
        batch_size=st["batch_size"],
        augment=st["augment"],
        seed=stats_artifact.stats_seed(exp),
        max_images=int(limit) if limit else None,
        num_workers=int(exp.trainer["num_workers"]),
        out_path=str(out),
    )


def run(exp: Experiment) -> dict[str, Any]:
    from lpld import dist

    out = stats_artifact.path(exp)
    job = stats_job(exp, out)
    # the batch is global (each EMA update sees all of it, at any world size): refuse a world that does not divide it
    check_stats_batch(job.batch_size, dist.planned_world_size(exp))
    teacher, teacher_fp = teacher_artifact.load(exp)  # fails early with the fix if there is no teacher

    def decide() -> str:
        """Rank 0: "reuse" the finished stats, or "compute" (after moving an overwritten file aside)."""
        return stats_artifact.prepare(out, teacher_fp, stats_artifact.spec(exp).mode, bool(exp.stage.overwrite))

    # rank 0 decides; a child re-launched by Lightning starts inside rank 0's Trainer (it computes)
    if dist.decide(decide, follow="compute", accelerator=dist.accelerator_of(exp)) == "reuse":
        log.info("class-wise stats exist at %s for this teacher; reusing them", out)
        return {"reused": True}
    if dist.rank() == 0:
        check_writable(out.parent, "stage stats")  # a read-only folder fails now, not after the pass
    module = StatsModule(teacher, teacher_fp, job)
    logger = build_logger(exp, "stats")
    try:
        trainer = build_trainer(exp, logger=logger, use_distributed_sampler=False, inference_mode=True)
        # stage.overwrite=true: the old stats move aside only now that the pass starts; back if it fails
        overwrite_artifact.begin(out)
        try:
            trainer.test(module, verbose=False)
            dist.barrier()  # rank 0 wrote the stats in on_test_epoch_end; per-rank launches read them next
            if not out.exists():
                raise RuntimeError("stats pass did not finish; rerun the same command")
        except BaseException:
            overwrite_artifact.restore(out)
            raise
        res = torch.load(out, map_location="cpu", weights_only=True)
        if res["missing"]:
            log.warning(
                "classes never seen in the train set (their stats are NaN, recover will refuse them): %s",
                ", ".join(res["missing_names"]),
            )
        n = int(res["count"].sum())
        log_metrics(
            logger,
            {"stats/images": n, "stats/layers": len(res["layers"]), "stats/missing_classes": len(res["missing"])},
        )
    finally:
        finish_logger(logger)
    if dist.rank() == 0:
        overwrite_artifact.finished(out)
        drop_aside(out)
        release_lock(out)
    log.info("class-wise BN stats over %d images, %d layers -> %s", n, len(res["layers"]), out)
    return {"images": n, "layers": len(res["layers"]), "missing": res["missing_names"]}
