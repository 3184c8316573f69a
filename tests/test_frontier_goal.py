"""lpld/report/goal.py: issue 21's goal read off frontier rows, checked on hand-built rows."""

from __future__ import annotations

import pytest

from lpld.report.goal import goal, goal_markdown, is_lpqld, shipped


def _row(prune, quant, acc, labels, records, model=0, mode="none", recipe="soft", record_mode="explicit"):
    return dict(
        method="lpld",
        ipc="10",
        prune=prune,
        quant=quant,
        quant_mode=mode,
        label_recipe=recipe,
        record_mode=record_mode,
        labels=labels,
        records=records,
        model=model,
        images=5000,
        top1=acc,
    )


ROWS = [
    _row("1x", "none", 0.80, 32000, 8000),  # the 1x store: 40 kB -> 1/40 = 1000 B
    _row("40x", "none", 0.60, 800, 200),  # LPQLD at 1000 B (1/40)
    _row("40x", "mr2", 0.55, 320, 200, mode="mr"),  # LPQLD at 520 B
    _row("100x", "mr2", 0.40, 128, 80, mode="mr"),  # LPQLD at 208 B
    _row("10x", "mr5q4r", 0.70, 960, 40, mode="mrq", record_mode="seed"),  # lpld at 1000 B
    _row("40x", "mr5q4r", 0.62, 240, 10, mode="mrq", record_mode="seed"),  # lpld at 250 B
    _row("10x", "mr5q4r", 0.75, 960, 40, mode="mrq", recipe="soft hald", record_mode="seed"),  # not LPQLD: hald
    _row("1x", "none", 0.50, 0, 0, model=30000, recipe="online"),  # outside the budget
]


def test_families_and_bytes():
    assert shipped(ROWS[0]) == 40000 and shipped(ROWS[-1]) == 30000
    assert [is_lpqld(r) for r in ROWS] == [True, True, True, True, False, False, False, False]


def test_budgets_by_hand():
    (res,) = goal(ROWS)
    assert res.store_1x == 40000
    # budgets: 1/40 = 1000 B, then the LPQLD rows below it: 520 B and 208 B
    assert [b.bytes for b in res.budgets] == [1000, 520, 208]
    b1000, b520, b208 = res.budgets
    assert (b1000.lpld, b1000.lpqld) == (0.75, 0.60)  # hald row (1000 B) vs fp16 40x
    assert (b520.lpld, b520.lpqld) == (0.62, 0.55)  # lpld 40x (250 B) vs mr2 40x
    # within 208 B lpld's best is LPQLD's own row (lpld ships that codec too): margin 0, so the goal fails
    assert (b208.lpld, b208.lpqld, b208.margin) == (0.40, 0.40, 0.0) and res.beats_everywhere is False
    # LPQLD-x40 = its best at 1/40 (fp16 40x, 0.60 at 1000 B): lpld 40x has 0.62 with 250 B <= 1000 / 4
    assert res.x40_acc == 0.60 and res.match_x40 == "40x mr5q4r soft seed-records"
    md = goal_markdown([res])
    assert "| 1.00 | 1/40 | 75.0 |" in md and "+15.0" in md and "**no**" in md
    # an lpld row within 208 B at 0.42 (+2 points) makes every margin >= 1 point
    (res,) = goal([*ROWS, _row("100x", "mr5q4r", 0.42, 96, 4, mode="mrq", record_mode="seed")])
    assert [round(b.margin, 6) for b in res.budgets] == [0.15, 0.07, 0.02] and res.beats_everywhere is True
    assert "**yes**" in goal_markdown([res])


def test_goal_fails_when_a_margin_is_short():
    rows = [dict(r) for r in ROWS] + [_row("100x", "mr5q4r", 0.42, 96, 4, mode="mrq", record_mode="seed")]
    rows[5]["top1"] = 0.5601  # lpld 40x now +1.01 points over mr2 40x at 520 B: still holds
    assert goal(rows)[0].beats_everywhere is True
    rows[5]["top1"] = 0.559  # +0.9 point: fails, and 0.559 < x40's 0.60: no match with 1/4 of its bytes
    (res,) = goal(rows)
    assert res.beats_everywhere is False and res.match_x40 is None


def test_no_1x_store_no_goal():
    assert goal([r for r in ROWS if r["prune"] != "1x" or r["label_recipe"] != "soft"]) == []
    assert goal_markdown([]) == ""
    assert goal([ROWS[0]]) == []  # a 1x store alone (random real images): nothing of LPQLD's to compare with


@pytest.mark.parametrize("mode", ["mrq", "msq"])
def test_lowbit_codecs_are_not_lpqld(mode):
    assert not is_lpqld(_row("10x", "q", 0.5, 1, 1, mode=mode))


def test_a_store_slightly_over_the_budget_by_its_overhead_counts():
    """The 40x store weighs 1/40 of the 1x plus its fixed headers: it is LPQLD's point at the 1/40 budget."""
    rows = [dict(r) for r in ROWS]
    rows[1]["records"] = 210  # fp16 40x: 1010 B, 1 % over 1000
    (res,) = goal(rows)
    assert res.budgets[0].lpqld == 0.60 and res.x40_acc == 0.60
    rows[1]["records"] = 230  # 3 % over: outside
    (res,) = goal(rows)
    assert res.budgets[0].lpqld == 0.55
