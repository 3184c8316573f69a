"""`python -m lpld.bench` (and `--device cuda`) exits non-zero when a target is missed (issue 20: "GPU checks that
cannot fail"), and 0 when every target is met. The benchmark bodies are replaced by fixed results, so the test
checks the verdict alone: a ratio above its `<=` target, or below its `>=` target, is a failure."""

from __future__ import annotations

import json
import types

import pytest
import torch


def _fake_module(monkeypatch, name: str, result: dict[str, float]) -> None:
    import sys

    mod = types.ModuleType(f"lpld.bench.{name}")
    mod.run = lambda quick=False: dict(result)
    monkeypatch.setitem(sys.modules, f"lpld.bench.{name}", mod)


@pytest.mark.parametrize(
    "value,code",
    [(1.29, 0), (1.31, 1)],  # stats_over_forward <= 1.3
)
def test_cpu_suite_exit_code_follows_the_target(monkeypatch, tmp_path, capsys, value, code):
    from lpld.bench.__main__ import TARGETS, main

    assert TARGETS["stats_over_forward"] == ("<=", 1.3)
    _fake_module(monkeypatch, "stats", {"stats_over_forward": value})
    out = tmp_path / "r.json"
    assert main(["--only", "stats", "--out", str(out)]) == code
    assert json.loads(out.read_text())["stats_over_forward"] == value  # the result is written either way
    assert ("targets missed: stats_over_forward" in capsys.readouterr().err) is bool(code)


def test_cpu_suite_a_failing_module_fails(monkeypatch, tmp_path):
    import sys

    from lpld.bench.__main__ import main

    mod = types.ModuleType("lpld.bench.stats")

    def boom(quick=False):
        raise RuntimeError("bench body failed")

    mod.run = boom
    monkeypatch.setitem(sys.modules, "lpld.bench.stats", mod)
    assert main(["--only", "stats", "--out", str(tmp_path / "r.json")]) == 1


MET = {
    "recover_speedup_vs_per_class": 3.5,
    "stats_over_forward": 1.1,
    "relabel_over_forward": 1.1,
    "student_over_fwdbwd": 1.1,
}


@pytest.mark.parametrize(
    "change,code",
    [
        ({}, 0),
        ({"relabel_over_forward": 1.21}, 1),  # a <= target missed
        ({"recover_speedup_vs_per_class": 2.9}, 1),  # a >= target missed
        ({"stats_over_forward": 1.2}, 0),  # on the bound: met
    ],
)
def test_cuda_suite_exit_code_follows_the_targets(monkeypatch, tmp_path, capsys, change, code):
    from lpld.bench import _cuda
    from lpld.bench.__main__ import main

    assert set(MET) == set(_cuda.TARGETS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "fake GPU")
    monkeypatch.setattr(_cuda, "run", lambda device, quick=False: {**MET, **change})
    out = tmp_path / "r.json"
    assert main(["--device", "cuda", "--out", str(out)]) == code
    assert json.loads(out.read_text())["device_name"] == "fake GPU"
    err = capsys.readouterr().err
    assert ("targets missed" in err) is bool(code)
    for k in change if code else ():
        assert k in err
