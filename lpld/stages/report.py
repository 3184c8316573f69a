"""stage=report: results records -> the paper's table shape + a Pareto plot (top-1 vs total storage).

Reads records written by the student stage (``lpld.report.records.load_records``), pivots them with
``lpld.report`` and writes ``report.md``, ``report.csv``, ``report_long.csv``, ``frontier.md`` and ``bytes.png``
(bytes by part, DD-Ranking scores: ``lpld.report.frontier``) and ``pareto.png``
to ``stage.out_dir`` (default ``<results folder>/reports/<file stem or "all">``). The reports are views of
the records, so rewriting them on a rerun is intended (logged). With a logger the table goes to W&B as a
``wandb.Table`` and the plot as a uint8 image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lpld.artifacts import results as results_artifact
from lpld.config.frozen import Experiment, to_plain
from lpld.core.io import atomic_write_bytes
from lpld.errors import ArtifactError, ConfigError
from lpld.lit.display import log_images_uint8
from lpld.report.frontier import write_frontier
from lpld.report.pareto import pareto_plot, pareto_points
from lpld.report.records import REQUIRED_FIELDS, load_records
from lpld.report.table import ReportError, filter_records, pivot, to_csv, to_long_csv, to_markdown
from lpld.stages.common import build_logger, finish_logger

log = logging.getLogger("lpld")


def _as_list(v: Any, what: str) -> list[str]:
    if v is None:
        raise ConfigError(f"stage.{what} must name at least one record field, e.g. stage.{what}=[ipc]")
    if isinstance(v, str):
        return [v]
    out = [str(x) for x in v]
    if not out:
        raise ConfigError(f"stage.{what} must name at least one record field, e.g. stage.{what}=[ipc]")
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"metric": {"name": "x"}} -> {"metric.name": "x"}: `+stage.where.metric.name=x` nests on the command line."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolve_inputs(exp: Experiment) -> tuple[Path, Path]:
    """(results file or folder, output folder) for this report."""
    st = exp.stage
    if st.get("results"):
        src = Path(str(st.results)).expanduser().resolve()
    elif st.get("results_name"):  # the same spec the producer (student / pipeline) wrote
        src = results_artifact.path(exp, str(st.results_name))
    else:
        src = results_artifact.dir(exp)
    if st.get("out_dir"):
        return src, Path(str(st.out_dir)).expanduser().resolve()
    if src.is_dir():
        return src, src / "reports" / "all"
    return src, src.parent / "reports" / src.stem


def checked_records(src: Path) -> list[dict[str, Any]]:
    """The records at ``src``, refusing an empty source and lines that are not results records of lpld.

    Raises:
        ArtifactError: naming ``src`` (and the line) and the fix.
    """
    records = load_records(src)
    if not records:
        where = f"no *.jsonl file in {src}" if src.is_dir() else f"{src} is empty"
        raise ArtifactError(
            f"no results records to report: {where}; run stage=student first (it writes the records), or set "
            "stage.results to a results .jsonl file that holds some"
        )
    for i, rec in enumerate(records, start=1):
        if not any(k in rec for k in REQUIRED_FIELDS):
            raise ArtifactError(
                f"record {i} of {src} is not a results record (keys {sorted(rec)[:5]}; stage=student writes "
                f"{', '.join(REQUIRED_FIELDS[:6])}, ...); remove it, or set stage.results to a file stage=student wrote"
            )
    return records


def run(exp: Experiment) -> dict[str, Any]:
    st = exp.stage
    rows, cols = _as_list(st.get("rows"), "rows"), _as_list(st.get("cols"), "cols")
    value = str(st["value"])
    where = _flatten(to_plain(st.where)) if st.get("where") else None
    digits, scale, ddof = int(st["digits"]), float(st["scale"]), int(st["ddof"])
    src, out = resolve_inputs(exp)
    records = checked_records(src)
    log.info("report: %d records from %s", len(records), src)
    title = str(st.get("title") or (f"{src.stem} results" if src.is_file() else "results"))
    try:  # issue 21: bytes by part and DD-Ranking's scores; one row per run configuration, whatever the pivot's shape
        write_frontier(filter_records(records, where), out, value, title, st.get("real_hard_top1"))
    except ReportError as e:
        log.warning("report: no frontier.md: %s", e)
    try:
        table = pivot(records, rows=rows, cols=cols, value=value, where=where)
    except ReportError as e:
        raise ConfigError(f"{e} (records from {src})") from e
    if table.dropped_duplicates:
        log.warning("report: %d duplicate record(s) of one run and seed; kept the latest", table.dropped_duplicates)
    md = to_markdown(table, digits=digits, scale=scale, ddof=ddof, title=title)
    if (out / "report.md").exists():
        log.info("report: replacing the earlier report in %s", out)
    atomic_write_bytes(out / "report.md", md.encode())
    atomic_write_bytes(out / "report.csv", to_csv(table, digits, scale, ddof).encode())
    atomic_write_bytes(out / "report_long.csv", to_long_csv(table, scale, ddof).encode())
    print(md)
    rgb = None
    if bool(st["pareto"]):
        try:
            group = str(st["pareto_group"])
            pts = pareto_points(filter_records(records, where), value=value, group=group)
            png, rgb = pareto_plot(pts, value=value, scale=scale, title=title)
        except ReportError as e:
            raise ConfigError(f"{e} (records from {src}); or set stage.pareto=false") from e
        atomic_write_bytes(out / "pareto.png", png)
    logger = build_logger(exp, "report")
    try:
        if logger is not None:
            from lpld.report.wandb_log import log_report

            log_report(logger, table, filter_records(records, where), scale, ddof)  # numeric table + W&B chart
            if rgb is not None and bool(exp.logger["log_images"]):
                pareto = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()
                # a caption is always passed: WandbLogger.log_image fails on caption=None (lightning 2.x)
                log_images_uint8(logger, "report/pareto", pareto, caption=f"{value} vs total storage")
    finally:
        finish_logger(logger)
    log.info("report: wrote %s", out)
    return {"out_dir": str(out), "markdown": md, "records": len(records)}
