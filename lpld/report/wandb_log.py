"""The report in W&B: a numeric ``wandb.Table`` of the grid and a native chart of top-1 vs label bytes.

``log_report(logger, table, records)`` (the report stage, after writing report.md): ``report/table`` holds one
row per cell -- the row and column fields (their labels), then ``<value>_mean``, ``<value>_std`` and ``n`` as
numbers (not the "77.2 ± 0.3" strings of report.md); ``report/points`` one row per run configuration (mean over
seeds): method, quant, prune, label_bytes, the value; ``report/<value>_vs_label_bytes`` a line chart of the value
against label bytes with one series per method x quant (W&B draws it natively: zoom, hover, export).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lpld.report.table import PivotTable, cell_stats, display, get_field

SERIES_FIELDS = ("method", "quant")


def table_rows(table: PivotTable, scale: float = 1.0, ddof: int = 1) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows) of the grid in long form: the row / column labels, then mean, std (floats) and n (int)."""
    v = table.value
    columns = [*table.rows, *table.cols, f"{v}_mean", f"{v}_std", "n"]
    data: list[list[Any]] = []
    for rk in table.row_keys:
        for ck in table.col_keys:
            vals = table.cells.get((rk, ck))
            if vals:
                m, s, n = cell_stats([x * scale for x in vals], ddof)
                data.append([*rk, *ck, float(m), float(s), int(n)])
    return columns, data


def _is_hard(rec: Mapping[str, Any]) -> bool:
    return get_field(rec, "student.loss", None) == "ce"


def series_name(rec: Mapping[str, Any], fields: Sequence[str] = SERIES_FIELDS) -> str:
    """``<method> <quant>`` (``hard`` for a hard-label student): one chart series."""
    parts = [display(get_field(rec, f, "?")) for f in fields]
    if _is_hard(rec):
        parts.append("hard-label student")
    return " ".join(parts)


def points(records: Iterable[Mapping[str, Any]], value: str = "top1", scale: float = 1.0) -> list[dict[str, Any]]:
    """One point per (series, prune, label bytes): the value averaged over seeds, sorted by label bytes."""
    acc: dict[tuple[str, str, float], list[float]] = {}
    meta: dict[tuple[str, str, float], dict[str, Any]] = {}
    for rec in records:
        try:
            y = float(get_field(rec, value)) * scale
            x = float(get_field(rec, "label_bytes"))
        except (KeyError, TypeError, ValueError):
            continue
        key = (series_name(rec), display(get_field(rec, "prune", "?")), x)
        acc.setdefault(key, []).append(y)
        meta[key] = {
            "method": display(get_field(rec, "method", "?")),
            "quant": display(get_field(rec, "quant", "none")),
            "prune": key[1],
        }
    out = [
        {"series": k[0], **meta[k], "label_bytes": k[2], value: float(np.mean(v)), "n": len(v)} for k, v in acc.items()
    ]
    out.sort(key=lambda p: (p["series"], p["label_bytes"]))
    return out


def log_report(
    logger: Any,
    table: PivotTable,
    records: Sequence[Mapping[str, Any]],
    scale: float = 1.0,
    ddof: int = 1,
    key: str = "report",
) -> dict[str, Any]:
    """Log the numeric table, the points table and the chart to a WandbLogger (other loggers: nothing).

    Returns what was (or would be) logged: {"columns", "data", "points"} (tests and other loggers read it).
    """
    columns, data = table_rows(table, scale, ddof)
    pts = points(records, table.value, scale)
    out = {"columns": columns, "data": data, "points": pts}
    if logger is None:
        return out
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return out
    import wandb

    run = logger.experiment
    value = table.value
    pcols = ["series", "method", "quant", "prune", "label_bytes", value, "n"]
    point_table = wandb.Table(columns=pcols, data=[[p[c] for c in pcols] for p in pts])
    logs: dict[str, Any] = {
        f"{key}/table": wandb.Table(columns=columns, data=data),
        f"{key}/points": point_table,
    }
    series = list(dict.fromkeys(p["series"] for p in pts))
    if series:
        xs = [[p["label_bytes"] for p in pts if p["series"] == s] for s in series]
        ys = [[p[value] for p in pts if p["series"] == s] for s in series]
        logs[f"{key}/{value}_vs_label_bytes"] = wandb.plot.line_series(
            xs=xs, ys=ys, keys=series, title=f"{value} vs label bytes (by method x quant)", xname="label bytes"
        )
        logs[f"{key}/{value}_vs_label_bytes_scatter"] = wandb.plot.scatter(
            point_table, "label_bytes", value, title=f"{value} vs label bytes (all runs)"
        )
    run.log(logs)
    return out
