"""Hydra callbacks (registered in conf/config.yaml under ``hydra.callbacks``).

:class:`SweepReport`: every sweep ends with its table. Each job that writes results records (``stage=student``,
``stage=pipeline``) notes its results file in ``<sweep dir>/.lpld_results/<job num>.json`` (``on_job_end``, in
the job's own process: the note survives launchers that run jobs elsewhere, e.g. SLURM arrays); when the sweep
ends (``on_multirun_end``) the report stage runs once per results file the jobs wrote, in the sweep's W&B group
(with ``logger=wandb``: the numeric table and the top-1 vs label bytes chart), next to the records as always
(``<results folder>/reports/<file stem>``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("lpld")

NOTES = ".lpld_results"
# the sweep's table: rows and columns that keep apart what sweeps usually vary (a report error names any other
# varying field, which is then added to the rows: see :func:`report_results`)
ROWS = ["method", "quant", "student.loss", "ipc"]
COLS = ["prune"]


def _sweep_dir(config: DictConfig | None) -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(str(HydraConfig.get().sweep.dir))
    except (ImportError, ValueError):
        pass
    try:
        return Path(str(config.hydra.sweep.dir)) if config is not None else None
    except Exception:  # noqa: BLE001 - no sweep dir: nothing to note
        return None


def results_file(cfg: DictConfig) -> Path | None:
    """The results file a job of this config writes (student, pipeline), else None."""
    from lpld.artifacts import results
    from lpld.config.experiment import freeze

    stage = str(cfg.stage.get("name")) if cfg.get("stage") is not None else ""
    if stage not in ("student", "pipeline"):
        return None
    exp = freeze(cfg)  # the artifact modules read the frozen experiment, as in the job itself
    if stage == "student":
        return results.path(exp)
    if not bool(exp.stage["report"]):  # a reporting pipeline made its table
        return results.path(exp, results.pipeline_name(exp))
    return None


def _job_overrides() -> list[str]:
    """The job's overrides minus the stage's own (a report composes its own ``stage``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []
    return [o for o in task if not o.lstrip("+~").split("=")[0].split(".")[0] == "stage"]


def note_job(config: DictConfig, num: Any) -> Path | None:
    """Write this job's note (results file, W&B group, overrides) under the sweep dir; returns its path."""
    from lpld.stages.common import run_group

    try:
        res = results_file(config)
    except Exception:  # noqa: BLE001 - a job whose config cannot say where it wrote has nothing to report
        return None
    sweep = _sweep_dir(config)
    if res is None or sweep is None or not res.exists():
        return None
    note = {"results": str(res), "group": run_group(config), "overrides": _job_overrides()}
    d = sweep / NOTES
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{num}.json"
    f.write_text(json.dumps(note))
    return f


def read_notes(sweep: Path) -> list[dict[str, Any]]:
    """The distinct results files of a sweep's notes (first note of each), in job order."""
    out: dict[str, dict[str, Any]] = {}
    d = sweep / NOTES
    files = sorted(d.glob("*.json"), key=lambda p: (len(p.stem), p.stem)) if d.is_dir() else []
    for f in files:
        try:
            note = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        out.setdefault(str(note.get("results")), note)
    return list(out.values())


def report_results(note: dict[str, Any], tries: int = 4) -> dict[str, Any]:
    """Run ``stage=report`` on one results file of the sweep (in its W&B group); a field that varies within a cell
    is added to the rows (the report's error names it) up to ``tries`` times."""
    from lpld.config.compose import compose
    from lpld.errors import ConfigError
    from lpld.stages import run_stage

    rows = list(ROWS)
    base = [o for o in note.get("overrides", []) if not o.lstrip("+~").startswith(("logger.group", "show"))]
    for _ in range(tries):
        over = [
            *base,
            "stage=report",
            f"stage.results={note['results']}",
            f"stage.rows=[{','.join(rows)}]",
            f"stage.cols=[{','.join(COLS)}]",
        ]
        if note.get("group"):
            over.append(f"logger.group={note['group']}")
        try:
            return run_stage(compose(over))
        except ConfigError as e:
            m = re.search(r"mixes runs with different '([^']+)'", str(e))
            if not m or m.group(1) in rows:
                raise
            rows.append(m.group(1))
    raise ConfigError(f"the sweep's report of {note['results']} needs more rows than {rows}")


class SweepReport(Callback):
    """Ends every Hydra multirun with its table (see the module docstring)."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        try:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            hc = HydraConfig.get()
            if hc.mode != RunMode.MULTIRUN:
                return
            note_job(job_return.cfg if getattr(job_return, "cfg", None) is not None else config, hc.job.num)
        except Exception as e:  # noqa: BLE001 - a note that cannot be written never fails the job
            log.debug("sweep report: no note for this job (%s)", e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = _sweep_dir(config)
        notes = read_notes(sweep) if sweep is not None else []
        if not notes:
            return
        for note in notes:
            log.info("sweep report: %s", note["results"])
            try:
                out = report_results(note)
                log.info("sweep report: table in %s", out.get("out_dir"))
            except Exception as e:  # noqa: BLE001 - the jobs' results stay; say why the table is missing
                log.warning("sweep report of %s failed: %s", note["results"], str(e).splitlines()[0] if str(e) else e)
