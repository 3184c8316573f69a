"""The console of a run fits on a screen: Lightning's tips and accelerator lines, known library warnings and wandb's
chatter are filtered (LPLD_DEBUG=1 shows them); in a non-TTY (a SLURM log) a plain progress line every
``LPLD_PROGRESS_EVERY`` seconds replaces rich bars; recover counts iterations, not only classes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from conftest import REPO, tiny_overrides, write_image_tree


def test_a_tiny_stage_in_a_log_file_is_short_and_shows_progress_lines(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=4, per_class=6)
    env = {k: v for k, v in os.environ.items() if k not in ("LPLD_NO_RICH", "WANDB_SILENT", "LPLD_DEBUG")}
    env.update(WANDB_MODE="offline", LPLD_PROGRESS_EVERY="1e-6")  # a line per batch, on any machine
    cmd = [sys.executable, str(REPO / "run.py"), "stage=squeeze", *tiny_overrides(tmp_path, root)]
    cmd += ["stage.epochs=2", "stage.batch_size=8", "logger=wandb", f"logger.dir={tmp_path / 'wb'}"]
    # stdout and stderr to a pipe: not a TTY, as in a SLURM job's log
    r = subprocess.run(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )
    out = r.stdout
    assert r.returncode == 0, out[-3000:]
    lines = out.splitlines()
    assert not [ln for ln in lines if "Tip" in ln or "GPU available" in ln or "TPU available" in ln], out
    assert len([ln for ln in lines if ln.startswith("wandb:")]) <= 2, out
    assert not [ln for ln in lines if "Warning" in ln or "deprecated" in ln], out
    progress = [ln for ln in lines if "squeeze: " in ln and " batches (" in ln]
    assert progress and "ETA" in progress[-1] and "/s" in progress[-1], out
    assert len(lines) <= 25, out
    assert list((tmp_path / "wb").rglob("run-*.wandb"))  # the run was logged, just quietly


def test_the_quiet_filter_hides_only_the_known_chatter():
    from lpld.lit.display import QuietFilter

    f = QuietFilter()

    def rec(msg: str) -> logging.LogRecord:
        return logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1, msg, None, None)

    assert not f.filter(rec("GPU available: False, used: False"))
    assert not f.filter(rec("💡 Tip: For seamless cloud uploads and versioning, try installing litmodels"))
    assert f.filter(rec("Epoch 3: val/top1 0.5"))


def test_recover_progress_counts_iterations_with_rate_and_eta(monkeypatch, caplog):
    from lpld.lit.display import RecoverProgress

    monkeypatch.setenv("LPLD_NO_RICH", "1")
    monkeypatch.setenv("LPLD_PROGRESS_EVERY", "1e-9")
    p = RecoverProgress("lpld", classes=4, iterations=10, batches=2)
    with caplog.at_level(logging.INFO, logger="lpld"):
        for t in range(10):
            p.step(t, 10, loss=1.0 / (t + 1))
        p.classes(2, loss=0.1)
        p.step(4, 10)
    msgs = [r.getMessage() for r in caplog.records if r.name == "lpld"]
    assert "recover lpld: 10/20 iterations (50%)" in msgs[-2] and "classes 2/4" in msgs[-2], msgs
    assert "recover lpld: 15/20 iterations" in msgs[-1] and "ETA" in msgs[-1], msgs
    p.stop()


def test_image_grids_are_bounded_per_run():
    from lpld.lit.display import image_log_batches

    assert image_log_batches(3) == {0, 1, 2}
    picked = image_log_batches(1000)
    assert len(picked) == 8 and {0, 999} <= picked
