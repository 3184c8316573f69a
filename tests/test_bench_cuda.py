"""`python -m lpld.bench --device cuda`: fails fast without CUDA; the suite runs on the CPU (slow tier)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

KEYS = {
    "recover_img_per_s_ipc10",
    "recover_img_per_s_ipc50",
    "recover_speedup_vs_per_class",
    "recover_speedup_vs_per_class_ipc50",
    "stats_over_forward",  # the stage's official-mode pass with data loading (issue 20)
    "stats_img_per_s",
    "stats_mode_official",
    "stats_exact_over_forward",
    "stats_official_over_forward",
    "stats_official_over_lpld",
    "relabel_img_per_s",
    "relabel_over_forward",
    "student_over_fwdbwd",
    "recover_peak_mem_gib_ipc10",
    "stats_peak_mem_gib",
    "relabel_peak_mem_gib",
    "student_peak_mem_gib",
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no CUDA device exists")
def test_cuda_bench_without_cuda_exits_at_once(tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "lpld.bench", "--device", "cuda", "--out", str(tmp_path / "r.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "python -m lpld.bench" in r.stderr
    assert not (tmp_path / "r.json").exists() and time.perf_counter() - t0 < 60


@pytest.mark.slow
def test_cuda_suite_code_paths_on_cpu():
    """The GPU suite at toy sizes on the CPU: every key is produced and finite (numbers meaningless here)."""
    from lpld.bench import _cuda

    r = _cuda.run("cpu", tiny=True)
    assert KEYS <= set(r), KEYS - set(r)
    assert all(v == v and v >= 0 for v in r.values())
    assert r["stats_mode_official"] == 1.0  # the preset's mode (in1k: official) was the one timed
