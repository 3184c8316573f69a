"""The accuracy-per-byte table (issue 21): one row per run configuration, seeds averaged, with every byte part
(``lpld.report.accounting``) and DD-Ranking's IOR / HLR / LRS (``lpld.report.ddranking``) where the rows they
need exist."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from lpld.report.accounting import PARTS, byte_parts, label_kind, seed_record_bytes
from lpld.report.ddranking import DEFAULT_W, scores_from_records
from lpld.report.table import ReportError, _identity, display, get_field, natural_key


def label_recipe(record: Mapping[str, Any]) -> str:
    """The table's ``labels`` cell: the label kind (``accounting.label_kind``), plus a student loss other than the
    default KL (``gift``, ``mse_gt``) and a label schedule (``hald``), which use the same bytes differently."""
    kind = label_kind(record)
    student = get_field(record, "student", None) or {}
    extra = [str(student[k]) for k in ("loss", "label_schedule") if student.get(k) not in (None, "kl", "ce", "none")]
    return " ".join([kind, *extra])


def frontier_rows(
    records: Iterable[Mapping[str, Any]],
    value: str = "top1",
    real_hard: float | None = None,
    w: float = DEFAULT_W,
) -> list[dict[str, Any]]:
    """One dict per run configuration (identity fields; seeds averaged), sorted by total bytes.

    Each holds method, ipc, prune, quant, label_kind (soft / hard / online / generator), the mean bytes of each
    part (images, labels, records, model) and ``total``, ``records_seed`` (the records with
    ``relabel.record_mode=seed``, or None),
    ``<value>`` mean and std (ddof 1) over ``n`` seeds, and ``ior`` / ``hlr`` / ``lrs`` (None where a reference
    row is missing). Accuracies are fractions, as the records store them.
    """
    recs = list(records)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in recs:
        key = tuple(sorted(_identity(r).items())) + (("labels", label_kind(r)),)
        groups.setdefault(key, []).append(r)
    out = []
    for rows in groups.values():
        try:
            parts = [byte_parts(r) for r in rows]
            acc = np.asarray([float(get_field(r, value)) for r in rows], dtype=np.float64)
        except KeyError as e:
            raise ReportError(f"a results record lacks '{e.args[0]}' needed for the byte table") from None
        first = rows[0]
        s = scores_from_records(recs, first, value=value, real_hard=real_hard, w=w)
        seeded = [seed_record_bytes(r) for r in rows]
        row: dict[str, Any] = {
            "method": display(get_field(first, "method", "?")),
            "ipc": display(get_field(first, "ipc", "?")),
            "prune": display(get_field(first, "prune", "?")),
            "quant": display(get_field(first, "quant", "none")),
            "quant_mode": str(get_field(first, "quant.mode", "none")),  # the codec (lpld.report.goal)
            "record_mode": str(get_field(first, "relabel.record_mode", "explicit")),
            "label_kind": label_kind(first),  # soft | hard | online | generator
            "label_recipe": label_recipe(first),  # the kind, plus a non-default loss / label schedule
            **{p: float(np.mean([b[p] for b in parts])) for p in (*PARTS, "total")},
            value: float(acc.mean()),
            f"{value}_std": float(acc.std(ddof=1)) if acc.size > 1 else 0.0,
            "n": int(acc.size),
            # records if seed-replayed (None: store or pool size unknown)
            "records_seed": float(np.mean(seeded)) if all(v is not None for v in seeded) else None,
            "ior": s.ior,
            "hlr": s.hlr,
            "lrs": s.lrs,
        }
        out.append(row)
    out.sort(key=lambda r: (r["total"], natural_key(r["method"]), -r[value]))
    return out


def _kb(v: float) -> str:
    return f"{v / 1e3:.1f}"


def _pts(v: float | None) -> str:
    return "" if v is None else f"{100 * v:+.1f}"


def frontier_markdown(rows: list[dict[str, Any]], value: str = "top1", title: str = "") -> str:
    """Markdown: bytes by part (kB = 1000 B) and total, accuracy in % (mean ± std), IOR / HLR in points, LRS %."""
    head = (
        f"| method | ipc | prune | quant | labels | images kB | labels kB | records kB | model kB | total kB | "
        f"records kB if seed-replayed | {value} % | IOR | HLR | LRS % |"
    )
    lines = [f"### {title}", ""] if title else []
    lines += [
        "Bytes: images as stored + label arrays + augmentation records + any model run at train time (records if "
        "seed-replayed: one seed per batch, bit-exact replay); "
        f"{value} mean ± std over n seeds; IOR / HLR in accuracy points, LRS = (e^a - e^-1)/(e - e^-1), "
        "a = 0.5 IOR - 0.5 HLR on fractions (DD-Ranking); blank where a reference row is missing.",
        "",
        head,
        "|---" * 15 + "|",
    ]
    for r in rows:
        acc = f"{100 * r[value]:.1f}" + (f" ± {100 * r[f'{value}_std']:.1f}" if r["n"] > 1 else "")
        lrs = "" if r["lrs"] is None else f"{100 * r['lrs']:.1f}"
        lines.append(
            f"| {r['method']} | {r['ipc']} | {r['prune']} | {r['quant']} | {r['label_recipe']} | {_kb(r['images'])} | "
            f"{_kb(r['labels'])} | {_kb(r['records'])} | {_kb(r['model'])} | {_kb(r['total'])} | "
            f"{'' if r['records_seed'] is None else _kb(r['records_seed'])} | {acc} | "
            f"{_pts(r['ior'])} | {_pts(r['hlr'])} | {lrs} |"
        )
    return "\n".join(lines) + "\n"


def bytes_figure(rows: list[dict[str, Any]], title: str = "") -> tuple[Any, Any]:
    """Horizontal stacked bars of each configuration's bytes by part (kB), smallest total at the top.

    Returns:
        (matplotlib Figure, its Agg canvas).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ReportError("no rows to plot")
    fig = Figure(figsize=(7, 0.9 + 0.28 * len(rows)), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = [f"{r['method']} ipc{r['ipc']} {r['prune']} {r['quant']} {r['label_recipe']}" for r in rows]
    y = np.arange(len(rows))[::-1]
    left = np.zeros(len(rows))
    for i, part in enumerate(PARTS):
        kb = np.asarray([r[part] / 1e3 for r in rows])
        ax.barh(y, kb, left=left, color=f"C{i}", label=part, height=0.7)
        left += kb
    ax.set_yticks(y, names, fontsize=6)
    ax.set_xlabel("kB (1000 B): images as stored + label arrays + augmentation records + train-time model")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig, canvas


def write_frontier(
    records: Iterable[Mapping[str, Any]],
    out_dir: Any,
    value: str = "top1",
    title: str = "",
    real_hard: float | None = None,
) -> list[dict[str, Any]]:
    """Write ``frontier.md`` (the byte table with DD-Ranking scores) and ``bytes.png`` (parts per row) to out_dir."""
    import io
    from pathlib import Path

    from lpld.core.io import atomic_write_bytes
    from lpld.report.goal import goal, goal_markdown

    rows = frontier_rows(records, value, real_hard=real_hard)
    out = Path(out_dir)
    text = frontier_markdown(rows, value, title) + "\n" + goal_markdown(goal(rows, value), value)
    atomic_write_bytes(out / "frontier.md", text.encode())
    fig, _ = bytes_figure(rows, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no timestamp: same records, same bytes
    atomic_write_bytes(out / "bytes.png", buf.getvalue())
    return rows
