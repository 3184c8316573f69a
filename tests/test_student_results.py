"""Results records: required fields, atomic appends from concurrent processes, loading files and dirs."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from lpld.core.io import ArtifactError
from lpld.report.records import REQUIRED_FIELDS, append_record, load_records, results_file


def _record(i: int) -> dict:
    rec = {k: None for k in REQUIRED_FIELDS}
    rec.update(config={"seed": i, "nested": {"a": [1, 2]}}, top1=0.5 + i / 1000, run_key=f"r{i}", seed=i)
    return rec


def _append_many(args: tuple[str, int, int]) -> None:
    path, start, n = args
    for i in range(start, start + n):
        append_record(path, _record(i))


def test_append_and_load_round_trip(tmp_path):
    p = results_file(tmp_path, "sweep")
    assert p.name == "sweep.jsonl"
    append_record(p, _record(0))
    append_record(tmp_path, _record(1))  # a directory means <dir>/results.jsonl
    assert [r["run_key"] for r in load_records(p)] == ["r0"]
    both = load_records(tmp_path)  # every *.jsonl of the directory, sorted by file name
    assert [r["run_key"] for r in both] == ["r1", "r0"]
    assert both[1]["config"] == {"seed": 0, "nested": {"a": [1, 2]}}


def test_missing_fields_and_corrupt_lines_are_refused(tmp_path):
    rec = _record(0)
    del rec["label_bytes"]
    with pytest.raises(ValueError, match="label_bytes"):
        append_record(tmp_path / "x.jsonl", rec)
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{not json\n')
    with pytest.raises(ArtifactError, match="bad.jsonl:2"):
        load_records(p)
    with pytest.raises(FileNotFoundError, match="stage=student"):
        load_records(tmp_path / "nothing")


def test_concurrent_appends_lose_nothing(tmp_path):
    p = str(tmp_path / "r.jsonl")
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        pool.map(_append_many, [(p, 0, 15), (p, 100, 15)])
    keys = sorted(r["run_key"] for r in load_records(p))
    assert keys == sorted([f"r{i}" for i in range(15)] + [f"r{i}" for i in range(100, 115)])
