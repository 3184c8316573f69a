"""Report tables from hand-written results records (exact cell strings, errors, Pareto front) and image grids."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lpld.report.grids import class_rows_grid, make_grid_uint8, per_class_grids, read_png_uint8, save_grid_png
from lpld.report.pareto import pareto_figure, pareto_front, pareto_plot, pareto_points
from lpld.report.table import ReportError, format_cell, get_field, natural_key, pivot, to_csv, to_long_csv, to_markdown


def rec(ipc, prune, seed, top1, method="lpld", **kw):
    r = {
        "method": method,
        "dataset": "demo",
        "ipc": ipc,
        "prune": prune,
        "quant": "none",
        "metric": "random",
        "student_model": "convnet",
        "seed": seed,
        "top1": top1,
        "top5": 99.0,
        "epochs": 10,
        "image_bytes": 1000 * ipc,
        "label_bytes": 100000 // int(prune[:-1]),
        "config": {"student": {"model": "convnet"}, "recover": {"name": method}},
    }
    r.update(kw)
    return r


RECORDS = [
    rec(10, "1x", 0, 34.0),
    rec(10, "1x", 1, 35.0),
    rec(10, "1x", 2, 36.0),
    rec(10, "10x", 0, 32.7),
    rec(50, "1x", 0, 55.0),
    rec(50, "1x", 1, 55.6),
    rec(10, "100x", 0, 9.6),
    rec(50, "100x", 0, 33.7),
    rec(50, "100x", 1, 33.7),
]


def test_expected_table_cells():
    t = pivot(RECORDS, rows=["ipc"], cols=["prune"], value="top1")
    md = to_markdown(t)
    lines = md.strip().splitlines()
    assert lines[0] == "top1 (mean ± std over 1-3 run(s) per cell); rows: ipc; columns: prune"
    assert lines[2] == "| ipc | 1x | 10x | 100x |"
    assert lines[3] == "|---|---|---|---|"
    # ipc10 1x: mean 35.0, sample std 1.0; 10x one run; ipc50 1x: 55.3 +- 0.424 (ddof=1); 10x missing
    assert lines[4] == "| 10 | 35.0 ± 1.0 | 32.7 | 9.6 |"
    assert lines[5] == "| 50 | 55.3 ± 0.4 |  | 33.7 ± 0.0 |"
    csv_lines = to_csv(t).strip().splitlines()
    assert csv_lines == ["ipc,1x,10x,100x", "10,35.0 ± 1.0,32.7,9.6", "50,55.3 ± 0.4,,33.7 ± 0.0"]
    long = to_long_csv(t).strip().splitlines()
    assert long[0] == "ipc,prune,top1_mean,top1_std,n"
    assert long[1].startswith("10,1x,35.0,1.0,3")


def test_multi_field_columns_and_where():
    recs = RECORDS + [rec(10, "1x", 0, 20.1, method="sre2l"), rec(10, "10x", 0, 18.9, method="sre2l")]
    t = pivot(recs, rows=["ipc"], cols=["prune", "method"])
    grid_md = to_markdown(t, digits=2)
    assert "| ipc | 1x / lpld | 1x / sre2l | 10x / lpld | 10x / sre2l | 100x / lpld |" in grid_md
    assert "| 10 | 35.00 ± 1.00 | 20.10 | 32.70 | 18.90 | 9.60 |" in grid_md
    only = pivot(recs, rows=["ipc"], cols=["prune"], where={"method": "sre2l"})
    assert only.row_keys == [("10",)] and only.col_keys == [("1x",), ("10x",)]


def test_mixed_runs_in_one_cell_are_an_error():
    recs = RECORDS + [rec(10, "1x", 0, 20.1, method="sre2l")]
    with pytest.raises(ReportError, match="'method'"):
        pivot(recs, rows=["ipc"], cols=["prune"])


def test_same_display_name_different_config_is_split_not_averaged():
    # student records store prune as a mapping; "10x" epoch-level and "10x" batch-level (ILP) are different runs
    recs = [rec(50, "10x", 0, 53.2), rec(50, "10x", 0, 54.4)]
    recs[0]["prune"] = {"name": "10x", "ratio": 0.9, "granularity": "epoch"}
    recs[1]["prune"] = {"name": "10x", "ratio": 0.9, "granularity": "batch"}
    with pytest.raises(ReportError, match="'prune.granularity'"):
        pivot(recs, rows=["ipc"], cols=["prune"])
    t = pivot(recs, rows=["prune.granularity"], cols=["prune"])
    assert to_csv(t).splitlines() == ["prune.granularity,10x", "batch,54.4", "epoch,53.2"]


def test_duplicate_run_later_record_wins():
    recs = [rec(10, "1x", 0, 30.0, run_key="a"), rec(10, "1x", 0, 31.0, run_key="a"), rec(10, "1x", 1, 33.0)]
    t = pivot(recs, rows=["ipc"], cols=["prune"])
    assert sorted(t.cells[(("10",), ("1x",))]) == [31.0, 33.0]
    assert t.dropped_duplicates == 1


def test_nested_config_fields_and_scale():
    r = rec(10, "1x", 0, 0.345)
    assert get_field(r, "student.model") == "convnet"  # looked up inside record["config"]
    assert get_field(r, "total_bytes") == 10000 + 100000
    t = pivot([r], rows=["recover.name"], cols=["student.model"])
    assert "| lpld | 34.5 |" in to_markdown(t, scale=100)
    with pytest.raises(ReportError, match="no field 'nope'"):
        pivot([r], rows=["nope"], cols=["prune"])


def test_format_cell_and_natural_sort():
    assert format_cell([]) == ""
    assert format_cell([1.0, 2.0, 3.0], digits=2) == "2.00 ± 1.00"
    assert format_cell([1.0, 2.0, 3.0], digits=2, ddof=0) == "2.00 ± 0.82"
    labels = ["100x", "1x", "20x", "10x", "2x"]
    assert sorted(labels, key=natural_key) == ["1x", "2x", "10x", "20x", "100x"]


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(100):
        pts = [(rng.choice([1, 2, 3, 4, 5]), rng.choice([10, 20, 30, 40])) for _ in range(rng.randint(1, 9))]
        front = pareto_front(pts)
        brute = {p for p in pts if not any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in pts)}
        # every non-dominated point appears exactly once (duplicates collapse to one index), sorted by storage
        assert [pts[i] for i in front] == sorted(brute)


def test_pareto_points_and_plot():
    pts = pareto_points(RECORDS, value="top1")
    ipc10_1x = [p for p in pts if p.label == "IPC10 1x"][0]
    assert ipc10_1x.value == pytest.approx(35.0)
    assert ipc10_1x.storage == pytest.approx(10 * 1000 + 100000)
    png, rgb = pareto_plot(pts, title="demo")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    png2, _ = pareto_plot(pts, title="demo")
    assert png == png2  # same records -> same bytes


def test_pareto_labels_name_method_and_label_format_distinctly_without_overlap():
    """Crowded points of three methods and three label formats: every point is labelled, labels of one method
    are distinct (configurations differing only outside the label fields get the differing field appended),
    the legend names each method and label format, and no two labels overlap."""
    recs = []
    for method in ("lpld", "sre2l", "rded"):
        for quant in ("none", "hard", {"mode": "mr", "k": 10}):
            for prune in ("1x", "10x"):
                recs.append(rec(10, prune, 0, 30.0 + len(recs) * 0.1, method=method, quant=quant))
    recs.append(rec(10, "1x", 0, 31.0, method="lpld", metric="diff"))  # same label fields as a point above
    pts = pareto_points(recs)
    assert len(pts) == len(recs)
    labels = {(p.group, p.label) for p in pts}
    assert len(labels) == len(pts)  # distinct within each method
    assert {p.kind for p in pts} == {"soft", "hard", "quant"}
    assert any("metric=diff" in p.label for p in pts)
    fig, canvas, anns = pareto_figure(pts)
    assert [a.get_text() for a in anns] == [p.label for p in pts]  # every point carries its own label
    legend = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert {"lpld", "sre2l", "rded", "soft labels", "hard labels", "quant labels", "Pareto front"} <= legend
    r = canvas.get_renderer()
    boxes = [a.get_window_extent(r) for a in anns]
    overlapping = [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    assert not overlapping, [(anns[i].get_text(), anns[j].get_text()) for i, j in overlapping]


# ---- image grids (lpld.report.grids) ----


def _numbered(n, c=3, h=4, w=5):
    # image k is filled with value k + 1 (never the pad value 0 used below)
    return torch.stack([torch.full((c, h, w), k + 1, dtype=torch.uint8) for k in range(n)])


def test_grid_shape_and_pixel_placement():
    imgs = _numbered(7)
    pad = 2
    g = make_grid_uint8(imgs, ncol=3, padding=pad, pad_value=0)
    assert g.shape == (3, 3 * (4 + pad) + pad, 3 * (5 + pad) + pad)
    for k in range(7):
        r, c = divmod(k, 3)
        y0, x0 = pad + r * (4 + pad), pad + c * (5 + pad)
        assert torch.equal(g[:, y0 : y0 + 4, x0 : x0 + 5], imgs[k])
    # everything not covered by an image is padding (7 images * 20 px * 3 ch are non-zero)
    assert int((g != 0).sum()) == 7 * 4 * 5 * 3
    # an image's real content survives (not just a constant): a gradient image round-trips
    grad = torch.arange(2 * 1 * 3 * 3, dtype=torch.uint8).reshape(2, 1, 3, 3)
    g2 = make_grid_uint8(grad, ncol=2, padding=1, pad_value=255)
    assert torch.equal(g2[:, 1:4, 5:8], grad[1])


def test_class_rows_grid_fig2_layout():
    imgs = _numbered(6, c=1, h=2, w=2)
    labels = torch.tensor([2, 0, 2, 1, 2, 0])
    g = class_rows_grid(imgs, labels, classes=[2, 0], per_class=3, padding=1, pad_value=0)
    assert g.shape == (1, 2 * 3 + 1, 3 * 3 + 1)
    # row 0 = class 2: images 0, 2, 4 (values 1, 3, 5); row 1 = class 0: images 1, 5 then a blank cell
    assert [int(g[0, 1, 1 + 3 * j]) for j in range(3)] == [1, 3, 5]
    assert [int(g[0, 4, 1 + 3 * j]) for j in range(3)] == [2, 6, 0]


def test_per_class_grids_and_png_roundtrip(tmp_path):
    imgs = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    grids = per_class_grids(imgs, labels, ncol=2, padding=1)
    assert sorted(grids) == [0, 1]
    assert grids[0].shape == (3, 2 * 5 + 1, 2 * 5 + 1)
    assert torch.equal(grids[1][:, 1:5, 6:10], imgs[3])
    save_grid_png(grids[1], tmp_path / "g.png")
    assert torch.equal(read_png_uint8(tmp_path / "g.png"), grids[1])
    gray = make_grid_uint8(imgs[:, :1], ncol=3)
    save_grid_png(gray, tmp_path / "gray.png")
    assert torch.equal(read_png_uint8(tmp_path / "gray.png"), gray)
    with pytest.raises(ValueError):
        make_grid_uint8(imgs.float(), ncol=2)


def test_report_stage_writes_files(tmp_path, capsys):
    from conftest import compose_cfg, frozen
    from omegaconf import OmegaConf

    from lpld.report.records import append_record
    from lpld.stages import report

    res = tmp_path / "art" / "demo" / "results" / "prune_grid.jsonl"
    for r in RECORDS:
        # the student stage stores accuracies as fractions; report.yaml's scale 100 shows percent
        full = dict(r, top1=r["top1"] / 100, compression_vs_1x=1.0, wall_time_s=1.0, run_key=f"{r['ipc']}-{r['prune']}")
        append_record(res, full)
    cfg = OmegaConf.create(
        {
            "dataset": {"name": "demo"},
            "stage": compose_cfg(["stage=report"], raw=True).stage,  # report.yaml over its schema defaults
            "logger": {"name": "none", "log_images": False},
            "paths": {"artifacts": str(tmp_path / "art")},
        }
    )
    out = report.run(frozen(cfg))  # default: every *.jsonl under paths.results_dir -> reports/all
    d = tmp_path / "art" / "demo" / "results" / "reports" / "all"
    assert out["out_dir"] == str(d)
    md = (d / "report.md").read_text()
    assert "| 10 | 35.0 ± 1.0 | 32.7 | 9.6 |" in md and md in capsys.readouterr().out
    assert (d / "report.csv").read_text().splitlines()[0] == "ipc,1x,10x,100x"
    assert (d / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    cfg.stage.results = str(res)
    cfg.stage.cols = ["prune", "method"]
    cfg.stage.where = {"ipc": 50, "config": {"recover": {"name": "lpld"}}}  # nested, as +stage.where.a.b=v makes
    out2 = report.run(frozen(cfg))
    assert out2["out_dir"] == str(res.parent / "reports" / "prune_grid")
    assert "| 50 | 55.3 ± 0.4 | 33.7 ± 0.0 |" in (res.parent / "reports" / "prune_grid" / "report.md").read_text()


def test_replace_record_replaces_the_same_run_and_keeps_other_lines_byte_for_byte(tmp_path):
    from lpld.report.records import REQUIRED_FIELDS, append_record, load_records, replace_record

    def full(run_key, top1):
        return {**{k: 0 for k in REQUIRED_FIELDS}, "run_key": run_key, "top1": top1}

    path = tmp_path / "results.jsonl"
    replace_record(path, full("a", 0.1))  # a new file
    append_record(path, full("b", 0.2))
    path.write_bytes(path.read_bytes() + b"\n")  # a blank line (dropped) and lines written by others (kept as is)
    line_b = path.read_bytes().splitlines()[1]
    replace_record(path, full("a", 0.3))
    recs = load_records(path)
    assert [(r["run_key"], r["top1"]) for r in recs] == [("b", 0.2), ("a", 0.3)]
    assert path.read_bytes().splitlines()[0] == line_b
