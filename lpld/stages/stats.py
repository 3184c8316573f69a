"""Stage ``stats``: class-wise BatchNorm statistics of the teacher (StatsModule)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from lpld import paths
from lpld.core.io import ArtifactError, acquire_lock, drop_aside, move_aside, release_lock
from lpld.stages.common import build_logger, build_trainer, finish_logger, load_teacher, log_metrics, to_container

log = logging.getLogger("lpld")


def run(cfg: DictConfig) -> dict[str, Any]:
    from lpld import dist
    from lpld.lit.stats_module import StatsModule

    out = paths.stats_path(cfg)
    _, teacher_fp = load_teacher(cfg)  # fails early with the fix if there is no teacher

    def decide() -> str:
        """Rank 0: "reuse" the finished stats, or "compute" (after moving an overwritten file aside)."""
        acquire_lock(out, "class-wise stats")  # one writer per stats file (released below, or at exit)
        if out.exists() and not cfg.stage.overwrite:
            try:
                old = torch.load(out, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise ArtifactError(
                    f"{out} is corrupt ({e}); rerun `python run.py stage=stats stage.overwrite=true` to recompute it"
                ) from e
            same = isinstance(old, dict) and old.get("teacher_fingerprint") == teacher_fp
            if same and old.get("mode") == paths.stats_mode(cfg):  # stage.mode null = the recipe's mode
                release_lock(out)
                return "reuse"
            raise ArtifactError(
                f"{out} holds stats for another teacher or stage.mode; rerun with stage.overwrite=true to replace them "
                f"(the old file is kept as {out.name}.replaced until the new one is written)"
            )
        if out.exists():
            move_aside(out)  # stage.overwrite=true: kept until the new stats are written
        return "compute"

    # rank 0 decides; a child re-launched by Lightning starts inside rank 0's Trainer (it computes)
    if dist.decide(decide, follow="compute", accelerator=dist.accelerator_of(cfg)) == "reuse":
        log.info("class-wise stats exist at %s for this teacher; reusing them", out)
        return {"reused": True}
    module = StatsModule(to_container(cfg), str(out))
    logger = build_logger(cfg, "stats")
    try:
        trainer = build_trainer(cfg, logger=logger, use_distributed_sampler=False, inference_mode=True)
        trainer.test(module, verbose=False)
        dist.barrier()  # rank 0 wrote the stats in on_test_epoch_end; per-rank launches read them next
        if not out.exists():
            raise RuntimeError("stats pass did not finish; rerun the same command")
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
        drop_aside(out)
        release_lock(out)
    log.info("class-wise BN stats over %d images, %d layers -> %s", n, len(res["layers"]), out)
    return {"images": n, "layers": len(res["layers"]), "missing": res["missing_names"]}
