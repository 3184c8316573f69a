"""Accuracy versus total storage with the Pareto front: LPLD Fig. 1 / Table 3's trade-off.

Storage is byte-honest (issue 21, ``lpld.report.accounting``): images as stored + label arrays + augmentation
records + any model the student runs at train time; x is log scale.

Each plotted point is one run configuration with its seeds averaged. Colour = method, marker = label
format (soft: full logits; quant: top-k mr/ms; hard: argmax only); the text beside a point names what
else distinguishes it (IPC, pruning factor, quantization). Labels are placed so they do not overlap each
other, and every label of one method is distinct (points that would share one get the differing
identity field appended).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lpld.report.table import ReportError, _identity, display, get_field, quant_kind

# label format -> matplotlib marker
KIND_MARKERS = {"soft": "o", "quant": "^", "hard": "X", "online": "*", "generator": "P"}
# candidate label offsets (points) around a marker, tried in order, then again further out
_OFFSETS = ((4, 4), (4, -10), (-4, 4), (-4, -10), (0, 9), (0, -15), (8, -3), (-8, -3))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated under (smaller x, larger y), sorted by x.

    A point is dominated if another point has x <= its x and y >= its y with at least one strict.

    Args:
        points: (storage, accuracy) pairs.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


@dataclass
class ParetoPoint:
    """One configuration (seeds averaged) on the storage / accuracy plane; ``kind`` its label format."""

    group: str
    label: str
    storage: float
    value: float
    kind: str = "soft"


def label_kind(quant: Any) -> str:
    """``soft`` (full logits), ``hard`` (argmax only) or ``quant`` (top-k) from a record's quant field."""
    return quant_kind(quant)


def _disambiguate(labels: dict[tuple, str], groups: dict[tuple, str], idents: dict[tuple, dict[str, str]]) -> None:
    """Append the identity fields that differ to labels shared by two configurations of one method."""
    seen: dict[tuple[str, str], list[tuple]] = {}
    for key, lab in labels.items():
        seen.setdefault((groups[key], lab), []).append(key)
    for keys in seen.values():
        if len(keys) < 2:
            continue
        # the differing leaves (student.loss=gift, not the whole student mapping): a label stays a few words
        flat = {k: _leaves({f: _json_value(v) for f, v in idents[k].items()}) for k in keys}
        fields = sorted({f for k in keys for f in flat[k]})
        # fields every configuration sets (a knob only one of them has, e.g. generator_width, is named by its family)
        shared = [f for f in fields if all(flat[k].get(f) is not None for k in keys)]
        differing = [f for f in shared if len({json.dumps(flat[k].get(f), sort_keys=True) for k in keys}) > 1]
        for k in keys:
            extra = " ".join(f"{f.rsplit('.', 1)[-1]}={display(flat[k].get(f))}" for f in differing)
            labels[k] = f"{labels[k]} {extra}".strip()


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted path: leaf value} (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _json_value(canonical: str | None) -> Any:
    return None if canonical is None else json.loads(canonical)


def pareto_points(
    records: Iterable[Mapping[str, Any]],
    value: str = "top1",
    storage: str = "bytes_total",
    group: str = "method",
    label_fields: Sequence[str] = ("ipc", "prune", "quant"),
) -> list[ParetoPoint]:
    """Average ``value`` and ``storage`` over seeds of each run configuration (identity fields)."""
    acc: dict[tuple, list[tuple[float, float]]] = {}
    groups: dict[tuple, str] = {}
    labels: dict[tuple, str] = {}
    kinds: dict[tuple, str] = {}
    idents: dict[tuple, dict[str, str]] = {}
    for rec in records:
        ident = _identity(rec)
        key = tuple(sorted(ident.items()))
        try:
            x, y = float(get_field(rec, storage)), float(get_field(rec, value))
        except KeyError as e:
            raise ReportError(f"a results record lacks '{e.args[0]}' needed for the Pareto plot") from None
        acc.setdefault(key, []).append((x, y))
        parts = [(f, display(get_field(rec, f))) for f in label_fields if get_field(rec, f, None) is not None]
        # "IPC10 40x mr" -- a default ("none" quantization) is left out to keep the annotations short
        labels[key] = " ".join(f"IPC{v}" if f == "ipc" else v for f, v in parts if v != "none")
        from lpld.report.frontier import label_recipe

        recipe = label_recipe(rec)  # "online", "hard", "soft hald", ...: the label family, before any field diff
        if recipe != "soft":
            labels[key] += f" {recipe}"
        if get_field(rec, "relabel.record_mode", "explicit") == "seed":
            labels[key] += " seed-rec"
        groups[key] = display(get_field(rec, group, "?"))
        # a hard-label student of a soft store is a hard point, whatever the store's codec
        # an online teacher / a label generator is its own family (no store; the model's bytes are counted)
        if rec.get("labels") in ("hard", "online", "generator"):
            kinds[key] = str(rec["labels"])
        else:
            kinds[key] = label_kind(get_field(rec, "quant", None))
        idents[key] = ident
    _disambiguate(labels, groups, idents)
    pts = []
    for key, xy in acc.items():
        a = np.asarray(xy, dtype=np.float64)
        pts.append(ParetoPoint(groups[key], labels[key], float(a[:, 0].mean()), float(a[:, 1].mean()), kinds[key]))
    pts.sort(key=lambda p: (p.group, p.storage, p.value, p.label))
    return pts


def _overlaps(box: Any, placed: list[Any]) -> bool:
    return any(box.overlaps(b) for b in placed)


def place_labels(ax: Any, renderer: Any, points: Sequence[ParetoPoint], scale: float) -> list[Any]:
    """Annotate every point with its label at the first offset where it overlaps no label placed so far.

    Points are labelled left to right; each tries ``_OFFSETS``, then the same directions 2x and 3x further.

    Returns:
        The annotations, in the order of ``points``.
    """
    placed: list[Any] = []
    anns: list[Any] = [None] * len(points)
    for i in sorted(range(len(points)), key=lambda i: (points[i].storage, points[i].value)):
        p = points[i]
        for r in (1, 2, 3):
            for dx, dy in _OFFSETS:
                ann = ax.annotate(
                    p.label,
                    (p.storage, p.value * scale),
                    fontsize=6,
                    xytext=(dx * r, dy * r),
                    textcoords="offset points",
                    ha="right" if dx < 0 else "center" if dx == 0 else "left",
                )
                box = ann.get_window_extent(renderer).expanded(1.02, 1.05)
                if not _overlaps(box, placed):
                    break
                ann.remove()
            else:
                continue
            break
        else:  # crowded beyond every candidate: keep the first placement rather than drop the label
            ann = ax.annotate(
                p.label, (p.storage, p.value * scale), fontsize=6, xytext=_OFFSETS[0], textcoords="offset points"
            )
            box = ann.get_window_extent(renderer)
        placed.append(box)
        anns[i] = ann
    return anns


def pareto_figure(
    points: Sequence[ParetoPoint], value: str = "top1", scale: float = 1.0, title: str = ""
) -> tuple[Any, Any, list[Any]]:
    """The Pareto figure: (matplotlib Figure, its Agg canvas, the point annotations in ``points`` order)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not points:
        raise ReportError("no points to plot")
    fig = Figure(figsize=(7, 4.5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    groups = sorted({p.group for p in points})
    colours = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    for p in points:
        ax.scatter([p.storage], [p.value * scale], s=30, c=colours[p.group], marker=KIND_MARKERS.get(p.kind, "o"))
    front = pareto_front([(p.storage, p.value) for p in points])
    fx = [points[i].storage for i in front]
    fy = [points[i].value * scale for i in front]
    ax.step(fx, fy, where="post", color="k", lw=1, alpha=0.6)
    if min(p.storage for p in points) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("total bytes: images as stored + labels + augmentation records + train-time model")
    ax.set_ylabel(value)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    # one legend: a colour per method, a marker per label format present, the front
    handles = [Line2D([], [], ls="", marker="o", color=colours[g], label=g) for g in groups]
    kinds = [k for k in KIND_MARKERS if any(p.kind == k for p in points)]
    handles += [Line2D([], [], ls="", marker=KIND_MARKERS[k], color="0.4", label=f"{k} labels") for k in kinds]
    handles.append(Line2D([], [], color="k", lw=1, alpha=0.6, label="Pareto front"))
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    canvas.draw()
    anns = place_labels(ax, canvas.get_renderer(), points, scale)
    return fig, canvas, anns


def pareto_plot(
    points: Sequence[ParetoPoint], value: str = "top1", scale: float = 1.0, title: str = ""
) -> tuple[bytes, np.ndarray]:
    """Scatter of value vs total storage (log x), colour per method, marker per label format, with the front.

    Returns:
        (PNG bytes, (H, W, 3) uint8 RGB array of the same figure, e.g. for W&B).
    """
    fig, canvas, _ = pareto_figure(points, value, scale, title)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
    buf = io.BytesIO()
    # no timestamp / version metadata, so the same records give the same bytes
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue(), rgb
