"""Results records -> the paper's table shape (rows x columns, mean +- std over seeds).

A record is one finished student run (written by ``lpld.report.records.append_record``): a flat dict with
method, dataset, ipc, seed, prune, quant, metric, student_model, image_bytes, label_bytes,
compression_vs_1x, top1, top5, epochs, wall_time_s, run_key and the full ``config``. A field is looked up
flat first, then as a dotted path (``student.model``), then inside ``record["config"]`` -- so any config
value can be a row or column.

Table 3 of the LPLD paper, for instance, is ``rows=["ipc"], cols=["prune", "method"], value="top1"``.
Runs that differ only in ``seed`` share a cell, which shows "mean ± std" (std with ddof=1, the spread of
independent runs; one run shows just the mean). Runs that differ in any other identity field
(:data:`IDENTITY_FIELDS`, compared by full value: ``prune`` is a mapping with name, ratio and granularity)
but land in one cell are an error: the message names the varying field and how to split it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# fields that identify *what* was run; seeds are averaged over, these must not be
IDENTITY_FIELDS = (
    "dataset",
    "teacher",
    "method",
    "ipc",
    "prune",
    "quant",
    "metric",
    "student_model",
    "student",
    "epochs",
    "relabel.record_mode",  # seed-replayed records: the same labels, other bytes (issue 21)
)
_MISSING = object()


class ReportError(ValueError):
    """Records that cannot be put into the requested table; the message names the fix."""


def get_field(record: Mapping[str, Any], name: str, default: Any = _MISSING) -> Any:
    """Value of ``name`` in a record: flat key, dotted path, or dotted path inside ``record['config']``.

    Derived fields when not stored: ``total_bytes`` = image_bytes + label_bytes; ``bytes_images`` /
    ``bytes_labels`` / ``bytes_records`` / ``bytes_model`` / ``bytes_total`` (``lpld.report.accounting``).

    Raises:
        KeyError: if absent and no default is given.
    """
    if name in record:
        return record[name]
    for root in (record, record.get("config")):
        node: Any = root
        for part in name.split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            else:
                node = _MISSING
                break
        if node is not _MISSING:
            return node
    if name == "total_bytes" and "image_bytes" in record and "label_bytes" in record:
        return float(record["image_bytes"]) + float(record["label_bytes"])
    if name.startswith("bytes_"):
        from lpld.report.accounting import derived_field

        try:
            return derived_field(record, name)
        except KeyError:
            pass
    if default is _MISSING:
        raise KeyError(name)
    return default


def display(value: Any) -> str:
    """Short label for a field value: a config mapping shows its ``name``; floats drop a trailing .0."""
    if isinstance(value, Mapping):
        if "name" in value:
            return str(value["name"])
        if "mode" in value:  # a quant record {mode, k, temperature}: its codec's label ("none", "hard", "mr10")
            q = quant_config(value)
            return q.label if q is not None else str(value["mode"])
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quant_config(value: Mapping[str, Any]) -> Any:
    """The QuantConfig of a record's quant field, or None when its codec is not registered in this process."""
    from lpld.core.quant import QuantConfig, list_label_codecs

    if value.get("mode") not in list_label_codecs():
        return None
    try:
        return QuantConfig(**{k: value[k] for k in ("mode", "k", "temperature", "params") if k in value})
    except (TypeError, ValueError):
        return None


def quant_kind(value: Any) -> str:
    """How a plot marks a record's label format: ``soft`` (full logits), ``quant`` or ``hard`` (the codec says)."""
    q = quant_config(value) if isinstance(value, Mapping) else None
    if q is not None:
        return q.codec.report_kind
    name = display(value) if value is not None else "none"
    return "soft" if name == "none" else "hard" if name == "hard" else "quant"


def canonical(value: Any) -> str:
    """Full-value identity of a field (a mapping compares by all its keys, not just its display name)."""
    return json.dumps(value, sort_keys=True, default=str)


def _identity(record: Mapping[str, Any]) -> dict[str, str]:
    return {f: canonical(get_field(record, f)) for f in IDENTITY_FIELDS if get_field(record, f, None) is not None}


def _first_difference(a: str, b: str) -> str:
    """Dotted key of the first sub-value where two canonical JSON values differ ("" if they are scalars)."""
    va, vb = json.loads(a), json.loads(b)
    path = []
    while isinstance(va, dict) and isinstance(vb, dict):
        diff = sorted(k for k in set(va) | set(vb) if va.get(k) != vb.get(k))
        if not diff:
            break
        path.append(diff[0])
        va, vb = va.get(diff[0]), vb.get(diff[0])
    return ".".join(path)


def natural_key(label: str) -> tuple:
    """Sort key that orders "2x" < "10x" < "100x" and "ipc10" < "ipc50" (numbers compared numerically)."""
    parts = re.split(r"(-?\d+(?:\.\d+)?)", label)
    return tuple((0, float(p)) if re.fullmatch(r"-?\d+(?:\.\d+)?", p) else (1, p) for p in parts if p != "")


@dataclass
class PivotTable:
    """Cells of a rows x columns table; ``cells[(row_key, col_key)]`` = values of the runs (one per seed)."""

    rows: list[str]
    cols: list[str]
    value: str
    row_keys: list[tuple[str, ...]]
    col_keys: list[tuple[str, ...]]
    cells: dict[tuple[tuple[str, ...], tuple[str, ...]], list[float]]
    dropped_duplicates: int = 0
    notes: list[str] = field(default_factory=list)


def _key(record: Mapping[str, Any], names: Sequence[str]) -> tuple[str, ...]:
    out = []
    for n in names:
        try:
            out.append(display(get_field(record, n)))
        except KeyError:
            raise ReportError(
                f"a results record has no field '{n}' (record keys: {sorted(record)}); "
                "choose rows/cols among those keys or config paths such as 'student.model'"
            ) from None
    return tuple(out)


def filter_records(records: Iterable[Mapping[str, Any]], where: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """Records whose fields display equal to every ``where`` value (all records if where is empty)."""
    if not where:
        return list(records)
    return [r for r in records if all(display(get_field(r, k, None)) == display(v) for k, v in where.items())]


def pivot(
    records: Iterable[Mapping[str, Any]],
    rows: Sequence[str],
    cols: Sequence[str],
    value: str = "top1",
    where: Mapping[str, Any] | None = None,
    seed_field: str = "seed",
) -> PivotTable:
    """Group records into a rows x cols table of ``value`` lists (one entry per seed).

    Args:
        records: results records (dicts), in append order (a later record of the same run -- same run_key, or
            same identity fields without one -- and seed replaces the earlier).
        rows: fields whose values index the table rows (e.g. ["ipc"]).
        cols: fields whose values index the columns (e.g. ["prune"] or ["prune", "method"]).
        value: the numeric field in the cells (top1, top5, ...).
        where: keep only records whose field display values equal these (e.g. {"method": "lpld"}).
        seed_field: the field that distinguishes repeated runs.

    Returns:
        :class:`PivotTable` with naturally sorted row and column keys.

    Raises:
        ReportError: unknown field, non-numeric value, or two different runs (not only seeds) in one cell.
    """
    if not rows or not cols:
        raise ReportError("rows and cols must each name at least one field (e.g. stage.rows=[ipc] stage.cols=[prune])")
    by_run: dict[tuple, tuple[tuple, tuple, float, dict]] = {}
    dropped = 0
    for rec in filter_records(records, where):
        rk, ck = _key(rec, rows), _key(rec, cols)
        ident = _identity(rec)
        seed = display(get_field(rec, seed_field, None))
        try:
            v = float(get_field(rec, value))
        except KeyError:
            raise ReportError(f"a results record has no value field '{value}'; set stage.value to top1/top5") from None
        except (TypeError, ValueError):
            raise ReportError(
                f"field '{value}' is not numeric in a record; set stage.value to a numeric field"
            ) from None
        # the same run recorded twice (a rerun appends again): the later record wins
        rkey = get_field(rec, "run_key", None)
        run = (rk, ck, ("run_key", str(rkey)) if rkey is not None else tuple(sorted(ident.items())), seed)
        if run in by_run:
            dropped += 1
        by_run[run] = (rk, ck, v, ident)
    cells: dict[tuple, list[float]] = {}
    idents: dict[tuple, dict[str, str]] = {}
    # every identity field must agree within a cell (only the seed may vary), whether or not it is a row/col:
    # two prune mappings that both display as "10x" but differ in granularity must not be averaged
    for (rk, ck, _, _), (_, _, v, ident) in by_run.items():
        cell = (rk, ck)
        if cell in idents:
            for f in sorted(set(ident) | set(idents[cell])):
                if ident.get(f) != idents[cell].get(f):
                    sub = _first_difference(ident.get(f, "null"), idents[cell].get(f, "null"))
                    name = f"{f}.{sub}" if sub else f
                    raise ReportError(
                        f"cell rows={rk} cols={ck} mixes runs with different '{name}'; add '{name}' to "
                        f"stage.rows/stage.cols or keep one value with stage.where.{name}=<value>"
                    )
        else:
            idents[cell] = ident
        cells.setdefault(cell, []).append(v)
    if not cells:
        raise ReportError("no results records match (check stage.results and stage.where)")
    row_keys = sorted({k[0] for k in cells}, key=lambda t: tuple(natural_key(s) for s in t))
    col_keys = sorted({k[1] for k in cells}, key=lambda t: tuple(natural_key(s) for s in t))
    return PivotTable(list(rows), list(cols), value, row_keys, col_keys, cells, dropped_duplicates=dropped)


def cell_stats(values: Sequence[float], ddof: int = 1) -> tuple[float, float, int]:
    """(mean, std, n) of a cell; std is 0 for a single run (and uses ``ddof`` otherwise)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan, 0
    std = float(a.std(ddof=ddof)) if a.size > ddof else 0.0
    return float(a.mean()), std, int(a.size)


def format_cell(values: Sequence[float] | None, digits: int = 1, scale: float = 1.0, ddof: int = 1) -> str:
    """ "mean ± std" of the runs in a cell ("48.8 ± 0.4"); one run -> "48.8"; no runs -> "" ."""
    if not values:
        return ""
    mean, std, n = cell_stats([v * scale for v in values], ddof=ddof)
    if n == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def col_label(key: tuple[str, ...]) -> str:
    return " / ".join(key)


def table_strings(table: PivotTable, digits: int = 1, scale: float = 1.0, ddof: int = 1) -> list[list[str]]:
    """The table as strings: a header row (row field names, then column labels) and one row per row key."""
    header = [*table.rows, *(col_label(c) for c in table.col_keys)]
    body = [
        [*rk, *(format_cell(table.cells.get((rk, ck)), digits, scale, ddof) for ck in table.col_keys)]
        for rk in table.row_keys
    ]
    return [header, *body]


def to_markdown(table: PivotTable, digits: int = 1, scale: float = 1.0, ddof: int = 1, title: str = "") -> str:
    """GitHub markdown table with a caption line naming value, rows and columns."""
    grid = table_strings(table, digits, scale, ddof)
    ns = sorted({len(v) for v in table.cells.values()})
    runs = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    caption = (
        f"{table.value} (mean ± std over {runs} run(s) per cell); rows: {', '.join(table.rows)}; "
        f"columns: {' / '.join(table.cols)}"
    )
    lines = [f"### {title}", ""] if title else []
    lines += [caption, "", "| " + " | ".join(grid[0]) + " |", "|" + "---|" * len(grid[0])]
    lines += ["| " + " | ".join(r) + " |" for r in grid[1:]]
    return "\n".join(lines) + "\n"


def to_csv(table: PivotTable, digits: int = 1, scale: float = 1.0, ddof: int = 1) -> str:
    """The same wide table as :func:`to_markdown` (cells are "mean ± std" strings), as CSV."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(table_strings(table, digits, scale, ddof))
    return buf.getvalue()


def to_long_csv(table: PivotTable, scale: float = 1.0, ddof: int = 1) -> str:
    """One line per cell with numeric mean, std and n (for further processing)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*table.rows, *table.cols, f"{table.value}_mean", f"{table.value}_std", "n"])
    for rk in table.row_keys:
        for ck in table.col_keys:
            vals = table.cells.get((rk, ck))
            if vals:
                m, s, n = cell_stats([v * scale for v in vals], ddof)
                w.writerow([*rk, *ck, repr(m), repr(s), n])
    return buf.getvalue()
