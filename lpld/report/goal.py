"""Issue 21's goal, read off the frontier rows: does lpld beat LPQLD at every byte budget <= 1/40 of the 1x store?

The budget counts what a student needs *besides the images* (they are the same distilled images for every
contender of one (method, ipc)): label arrays + augmentation records + any model run at train time
(``lpld.report.accounting``). The 1x store is the fp16 store of the whole schedule with explicit records
(LPLD's 1x, ``quant=none``, ``prune=1x``, ``relabel.record_mode=explicit``), per ipc.

Contenders, among the rows of one ipc on the same distilled images (``method``):

* **LPQLD**: what LPQLD's public code can ship: stored labels with explicit records, codec ``none`` (fp16 logits)
  or LPQLD's ``mr`` / ``ms`` (top-k fp16 + uint16 indices), plain KD (no other loss or label schedule), any
  pruning ratio;
* **lpld**: every row on those images (any codec, seed-replayed records, generator, online teacher, hard labels,
  HALD / GIFT).

At a budget b the best of a family is the highest mean accuracy among its rows with bytes <= b (up to
``BUDGET_SLACK``: a store's fixed overhead). The budgets
checked are 1/40 of the 1x store and every LPQLD row's own bytes below it (where LPQLD's best changes). The goal
holds when lpld's best beats LPQLD's by >= ``margin`` (1 point) at each budget where LPQLD has a row, and some
lpld row reaches LPQLD-x40's accuracy (LPQLD's best at the 1/40 budget) with <= 1/4 of that row's bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LPQLD_CODECS = ("none", "mr", "ms")
# A store carries fixed bytes besides its per-crop arrays (.npy headers, the batch index, per-batch CRCs), so the 40x
# store of a schedule weighs slightly more than 1/40 of the 1x store (CIFAR-10 IPC10: 8.30 vs 8.28 kB). A row is
# within a budget up to this factor, the tolerance of the store accounting itself (disk / accounting <= 1.02).
BUDGET_SLACK = 1.02


def shipped(row: Mapping[str, Any]) -> float:
    """Bytes a student needs besides the images: labels + records + model (a frontier row's mean parts)."""
    return float(row["labels"]) + float(row["records"]) + float(row["model"])


def _codec(row: Mapping[str, Any]) -> str:
    """The codec name of a row's ``quant`` cell (``none``, ``mr10``, ``mr5q4r`` -> none, mr, mrq)."""
    q = str(row.get("quant_mode") or row.get("quant") or "none")
    return q


def is_lpqld(row: Mapping[str, Any]) -> bool:
    """A row LPQLD's public code can produce: stored soft labels, explicit records, fp16 / MR / MS codec, plain KD."""
    return (
        row.get("label_recipe") == "soft"
        and row.get("record_mode", "explicit") == "explicit"
        and _codec(row) in LPQLD_CODECS
    )


def is_store_1x(row: Mapping[str, Any]) -> bool:
    """The reference 1x store: fp16 labels of the whole schedule with explicit records, plain KD."""
    return is_lpqld(row) and _codec(row) == "none" and str(row.get("prune")) == "1x"


@dataclass
class Budget:
    """One budget's comparison (accuracies as fractions; None where the family has no row within it)."""

    bytes: float
    fraction: float  # of the 1x store
    lpld: float | None
    lpld_row: str | None
    lpqld: float | None
    lpqld_row: str | None

    @property
    def margin(self) -> float | None:
        return None if self.lpld is None or self.lpqld is None else self.lpld - self.lpqld


@dataclass
class GoalResult:
    """The goal at one (method, ipc): the budgets compared and the two conditions (None: not measurable)."""

    method: str
    ipc: str
    store_1x: float
    budgets: list[Budget] = field(default_factory=list)
    beats_everywhere: bool | None = None
    match_x40: str | None = None  # the lpld row that matches LPQLD-x40 with <= 1/4 of its bytes, if any
    x40: str | None = None  # LPQLD's best row at the 1/40 budget
    x40_acc: float | None = None
    x40_bytes: float | None = None


def _label(row: Mapping[str, Any]) -> str:
    return f"{row['prune']} {row['quant']} {row['label_recipe']}" + (
        " seed-records" if row.get("record_mode") == "seed" else ""
    )


def _best(rows: Sequence[Mapping[str, Any]], budget: float, value: str) -> Mapping[str, Any] | None:
    within = [r for r in rows if shipped(r) <= budget * BUDGET_SLACK]
    return max(within, key=lambda r: r[value]) if within else None


def goal(rows: Sequence[Mapping[str, Any]], value: str = "top1", margin: float = 0.01) -> list[GoalResult]:
    """The goal per (method, ipc) that has a 1x store row and an LPQLD row within 1/40 of it (module docstring)."""
    out: list[GoalResult] = []
    keys = sorted({(str(r["method"]), str(r["ipc"])) for r in rows})
    for method, ipc in keys:
        group = [r for r in rows if str(r["method"]) == method and str(r["ipc"]) == ipc]
        ref = [r for r in group if is_store_1x(r)]
        if not ref:
            continue
        b1 = shipped(ref[0])
        cap = b1 / 40
        lpqld = [r for r in group if is_lpqld(r)]
        if not any(shipped(r) <= cap * BUDGET_SLACK for r in lpqld):
            continue  # nothing of LPQLD's within 1/40 on these images (e.g. random real images at 1x only)
        res = GoalResult(method, ipc, b1)
        budgets = sorted({cap, *(shipped(r) for r in lpqld if shipped(r) <= cap)}, reverse=True)
        for b in budgets:
            ours, theirs = _best(group, b, value), _best(lpqld, b, value)
            res.budgets.append(
                Budget(
                    b,
                    b / b1,
                    None if ours is None else float(ours[value]),
                    None if ours is None else _label(ours),
                    None if theirs is None else float(theirs[value]),
                    None if theirs is None else _label(theirs),
                )
            )
        margins = [x.margin for x in res.budgets if x.margin is not None]
        res.beats_everywhere = all(m >= margin for m in margins) if margins else None
        x40 = _best(lpqld, cap, value)
        if x40 is not None:
            res.x40, res.x40_acc, res.x40_bytes = _label(x40), float(x40[value]), shipped(x40)
            match = [r for r in group if r[value] >= x40[value] and shipped(r) <= shipped(x40) / 4 * BUDGET_SLACK]
            if match:
                res.match_x40 = _label(min(match, key=shipped))
        out.append(res)
    return out


def goal_markdown(results: Sequence[GoalResult], value: str = "top1") -> str:
    """The budgets table and the verdict of each (method, ipc); accuracies in %, bytes in kB (1000 B)."""
    if not results:
        return ""
    lines = [
        "### Goal: lpld vs LPQLD at every budget <= 1/40 of the 1x store",
        "",
        "Bytes besides the images (labels + records + model). LPQLD = stored fp16 / MR / MS labels with explicit "
        "records and plain KD; lpld = every row on the same images (lpld/report/goal.py).",
        "",
    ]
    for res in results:
        lines += [
            f"**{res.method}, ipc {res.ipc}** (1x store {res.store_1x / 1e3:.1f} kB)",
            "",
            f"| budget kB | of 1x | lpld best {value} % | lpld row | LPQLD best {value} % | LPQLD row | "
            "margin (points) |",
            "|---|---|---|---|---|---|---|",
        ]
        for b in res.budgets:
            pct = "" if b.margin is None else f"{100 * b.margin:+.1f}"
            lines.append(
                f"| {b.bytes / 1e3:.2f} | 1/{1 / b.fraction:.0f} | "
                f"{'' if b.lpld is None else f'{100 * b.lpld:.1f}'} | {b.lpld_row or ''} | "
                f"{'' if b.lpqld is None else f'{100 * b.lpqld:.1f}'} | {b.lpqld_row or ''} | {pct} |"
            )
        verdict = {True: "yes", False: "no", None: "not measurable"}[res.beats_everywhere]
        lines += ["", f"- beats LPQLD by >= 1 point at every budget: **{verdict}**"]
        if res.x40 is not None:
            m = res.match_x40 or "none"
            lines.append(
                f"- LPQLD-x40 (its best at 1/40: {res.x40}, {100 * res.x40_acc:.1f} %, {res.x40_bytes / 1e3:.2f} kB) "
                f"matched with <= 1/4 of its bytes by: **{m}**"
            )
        lines.append("")
    return "\n".join(lines) + "\n"
