"""A killed job never reports success, and nothing silently wrong is stored (issue 22, items 4-7 and the weak
messages): SIGTERM exits 143 with one line; epochs=0, non-finite normalisation / losses / weights / statistics are
refused with the cause; stage.overwrite=true keeps the finished artifact until the new run has started; a multirun
finishes its other jobs; a read-only folder fails up front; stale epoch checkpoints go; a directory given as
model.checkpoint is named as such."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from lpld.artifacts import stats as stats_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.errors import ArtifactError, ConfigError
from lpld.stages import SIGTERM_EXIT, run_stage, user_errors

from .helpers import compose_cfg, stage_overrides

MESSAGE = "was interrupted (SIGTERM"


def digest(d: Path) -> dict[str, str]:
    files = [d] if d.is_file() else sorted(f for f in d.rglob("*") if f.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def squeeze_ov(root: Path, *extra: str) -> list[str]:
    return ["stage=squeeze", *stage_overrides(root), "stage.epochs=1", "stage.batch_size=8", *extra]


@pytest.fixture(scope="module")
def teacher_root(tmp_path_factory) -> Path:
    """A tiny trained teacher (1 epoch) and its stats, shared by the overwrite tests (which leave them unchanged)."""
    root = tmp_path_factory.mktemp("teacher")
    run_stage(compose_cfg(squeeze_ov(root)))
    run_stage(compose_cfg(["stage=stats", *stage_overrides(root)]))
    return root


# ---------------------------------------------------------------------------------------------------------------
# 4. SIGTERM: exit status 143 and one line naming the stage and the resume
# ---------------------------------------------------------------------------------------------------------------


def test_lightning_sigterm_exception_exits_143_with_one_line(capsys):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    cfg = compose_cfg(["stage=stats"])
    with pytest.raises(SystemExit) as ex, user_errors(cfg):
        raise SIGTERMException
    assert ex.value.code == SIGTERM_EXIT == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage stats" in err[0] and MESSAGE in err[0] and "rerun the same command" in err[0]


def test_a_real_sigterm_inside_the_stage_exits_143(capsys):
    cfg = compose_cfg(["stage=student"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as ex, user_errors(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once
        pytest.fail("SIGTERM did not stop the stage")
    assert ex.value.code == 143
    assert "stage student" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def _sigterm_cli(root: Path, args: list[str], started) -> subprocess.CompletedProcess:
    env = {**os.environ, "LPLD_NO_RICH": "1", "WANDB_MODE": "disabled"}
    env.pop("LPLD_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.monotonic()
    while p.poll() is None and not started() and time.monotonic() - t0 < 240:
        time.sleep(0.1)
    assert p.poll() is None, "the stage ended before it could be interrupted"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.slow
def test_sigterm_during_squeeze_exits_143_and_keeps_the_checkpoint(tmp_path):
    ov = [*stage_overrides(tmp_path), "stage=squeeze", "stage.epochs=5000", "stage.batch_size=8"]
    cfg = compose_cfg(ov)
    out_dir = teacher_artifact.path(cfg).parent
    r = _sigterm_cli(tmp_path, ov, lambda: (out_dir / "last.ckpt").exists())
    assert r.returncode == 143, r.stderr[-2000:]
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("lpld error")]
    assert len(lines) == 1 and "stage squeeze" in lines[0] and MESSAGE in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert (out_dir / "last.ckpt").exists() and not (out_dir / "teacher.pt").exists()


@pytest.mark.slow
def test_sigterm_during_student_exits_143(tmp_path):
    from .helpers import student_cfg

    long = ("dataset.recipe.student.epochs=40",)  # the store holds the schedule: relabel it for 40 epochs
    cfg = student_cfg(tmp_path, long)
    ov = [*stage_overrides(tmp_path, long), "stage=student"]
    students = teacher_artifact.path(cfg).parents[1] / "students"
    r = _sigterm_cli(tmp_path, ov, lambda: any(students.rglob("last.ckpt")))
    assert r.returncode == 143, r.stderr[-2000:]
    assert "stage student" in r.stderr and MESSAGE in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# 5-6. silently wrong: refused with the cause
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arg", ["stage.epochs=0", "dataset.recipe.squeeze.epochs=0"])
def test_squeeze_with_no_epochs_is_refused_up_front(tmp_path, arg):
    ov = [a for a in squeeze_ov(tmp_path) if not a.startswith("stage.epochs")]
    cfg = compose_cfg([*ov, arg])
    with pytest.raises(ConfigError, match=r"stage\.epochs=0 \(or dataset\.recipe\.squeeze\.epochs\)"):
        run_stage(cfg)
    assert not teacher_artifact.path(cfg).parent.exists()


@pytest.mark.parametrize(
    "arg, key", [("dataset.mean=[nan,0.5,0.5]", "dataset.mean"), ("dataset.std=[0.2,0,0.2]", "dataset.std")]
)
def test_non_finite_or_zero_normalisation_is_refused_naming_the_key(tmp_path, arg, key):
    cfg = compose_cfg([*squeeze_ov(tmp_path), arg])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_stage(cfg)


def test_a_non_finite_training_loss_stops_squeeze_with_the_cause(tmp_path):
    cfg = compose_cfg(squeeze_ov(tmp_path, "stage.lr=1e30", "stage.epochs=2"))
    with pytest.raises(ConfigError, match=r"stage squeeze: .*not finite.* epoch 0.*learning rate") as e:
        run_stage(cfg)
    assert "stage.lr" in str(e.value)
    out_dir = teacher_artifact.path(cfg).parent
    assert not (out_dir / "teacher.pt").exists() and not list(out_dir.glob("*.ckpt"))


def test_non_finite_teacher_weights_are_not_saved():
    from lpld.lit.classifier import check_finite_weights

    check_finite_weights({"w": torch.ones(2), "n": torch.tensor(3)}, "squeeze", "teacher")
    with pytest.raises(ConfigError, match=r"stage squeeze: .*non-finite weights.*first b"):
        check_finite_weights({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, "squeeze", "teacher")


def test_non_finite_stats_are_refused_naming_the_class_and_layer(tmp_path):
    cfg = compose_cfg(["stage=stats", *stage_overrides(tmp_path)])
    from lpld.stages.common import build_teacher_model

    state = build_teacher_model(cfg).state_dict()
    key = next(k for k, v in state.items() if k.endswith("weight") and v.dim() == 4)
    state[key] = torch.full_like(state[key], float("nan"))
    from lpld.core.io import atomic_torch_save, fingerprint_state_dict

    atomic_torch_save(
        teacher_artifact.path(cfg), {"state_dict": state, "fingerprint": fingerprint_state_dict(state), "val": {}}
    )
    with pytest.raises(ConfigError, match=r"stage stats: .*class 0 \(class00\) at layer \S+ are not finite"):
        run_stage(cfg)
    assert not list(teacher_artifact.path(cfg).parents[1].rglob("stats/*.pt"))


def test_unseen_classes_stay_nan_without_an_error():
    from lpld.lit.stats_module import check_finite_stats

    nan = float("nan")
    out = {
        "layers": ["bn1"],
        "mean": [torch.tensor([[0.0, 1.0], [nan, nan]])],
        "var": [torch.tensor([[1.0, 1.0], [nan, nan]])],
        "count": torch.tensor([3, 0]),
        "class_names": ["a", "b"],
    }
    check_finite_stats(out)  # class b was never seen: NaN on purpose
    out["count"] = torch.tensor([3, 2])
    with pytest.raises(ConfigError, match=r"class 1 \(b\) at layer bn1"):
        check_finite_stats(out)


# ---------------------------------------------------------------------------------------------------------------
# 7. stage.overwrite=true keeps the finished artifact until the new run has started
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["trainer=gpu", "stage.optimizer=bogus"])
def test_overwrite_of_the_teacher_with_a_settings_error_keeps_it(teacher_root, bad):
    cfg = compose_cfg(squeeze_ov(teacher_root, "stage.overwrite=true", bad))
    out_dir = teacher_artifact.path(cfg).parent
    before = digest(out_dir)
    with pytest.raises(Exception):  # noqa: B017 - any failure: the point is what is left on disk
        run_stage(cfg)
    assert digest(out_dir) == before
    assert not (out_dir.parent / "teacher.replaced").exists()


def test_overwrite_of_the_stats_with_a_settings_error_keeps_them(teacher_root):
    cfg = compose_cfg(["stage=stats", *stage_overrides(teacher_root), "stage.overwrite=true", "trainer=gpu"])

    out = stats_artifact.path(cfg)
    before = digest(out)
    with pytest.raises(Exception):  # noqa: B017
        run_stage(cfg)
    assert digest(out) == before and not Path(f"{out}.replaced").exists()


def test_overwrite_of_a_student_with_a_settings_error_keeps_it(tmp_path):
    from .helpers import student_cfg

    cfg = student_cfg(tmp_path)
    run_stage(cfg)
    runs = [p for p in (teacher_artifact.path(cfg).parents[1] / "students").rglob("final.json")]
    assert len(runs) == 1
    run_dir = runs[0].parent
    before = digest(run_dir)
    bad = compose_cfg(["stage=student", *stage_overrides(tmp_path), "stage.overwrite=true", "trainer=gpu"])
    with pytest.raises(Exception):  # noqa: B017
        run_stage(bad)
    assert digest(run_dir) == before and not Path(f"{run_dir}.replaced").exists()


# ---------------------------------------------------------------------------------------------------------------
# weak messages: multirun, read-only folder, stale epoch checkpoints, a directory as model.checkpoint
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_multirun_finishes_the_other_jobs_and_lists_the_failures(tmp_path):
    env = {**os.environ, "LPLD_NO_RICH": "1", "WANDB_MODE": "disabled"}
    env.pop("LPLD_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)
    ov = [a for a in squeeze_ov(tmp_path) if not a.startswith("stage.epochs")]
    r = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "-m", *ov, "stage.epochs=0,1", f"hydra.sweep.dir={tmp_path}/mr"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "1 multirun job(s) failed" in r.stderr and "job 0 (" in r.stderr and "stage.epochs=0" in r.stderr
    assert teacher_artifact.path(compose_cfg(squeeze_ov(tmp_path))).exists()  # job 1 ran after job 0 failed


def test_squeeze_into_a_read_only_folder_fails_before_training(tmp_path, monkeypatch):
    import tempfile

    cfg = compose_cfg(squeeze_ov(tmp_path))

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", k.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ArtifactError, match="stage squeeze cannot write to .*Read-only.*paths.artifacts="):
        run_stage(cfg)
    assert not list(teacher_artifact.path(cfg).parent.glob("*.ckpt"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_squeeze_into_a_really_read_only_folder_fails_before_training(tmp_path):
    cfg = compose_cfg(squeeze_ov(tmp_path))
    art = teacher_artifact.path(cfg).parents[3]
    art.mkdir(parents=True, exist_ok=True)
    art.chmod(0o555)
    try:
        with pytest.raises(ArtifactError, match="cannot write to"):
            run_stage(cfg)
    finally:
        art.chmod(0o755)


def test_stale_epoch_checkpoints_are_removed(tmp_path):
    from lpld.lit.fit import remove_stale_epoch_checkpoints

    for name in ("epoch0.ckpt", "epoch3.ckpt", "epoch12.ckpt", "last.ckpt", "epochs.json"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_epoch_checkpoints(tmp_path)
    assert sorted(p.name for p in removed) == ["epoch0.ckpt", "epoch3.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch12.ckpt", "epochs.json", "last.ckpt"]


def test_a_resumed_run_leaves_no_stale_epoch_checkpoint(tmp_path):
    cfg = compose_cfg(squeeze_ov(tmp_path))
    out_dir = teacher_artifact.path(cfg).parent
    out_dir.mkdir(parents=True)
    (out_dir / "epoch0.ckpt").write_bytes(b"left by a run cut by a full disk")
    cfg = compose_cfg(squeeze_ov(tmp_path, "stage.epochs=2"))
    run_stage(cfg)
    assert sorted(p.name for p in out_dir.glob("epoch*.ckpt")) == ["epoch1.ckpt"]


def test_a_directory_as_model_checkpoint_is_named_a_directory(tmp_path):
    cfg = compose_cfg(["stage=stats", *stage_overrides(tmp_path), f"model.checkpoint={tmp_path}"])
    with pytest.raises(ArtifactError, match="is a directory, expected a teacher file"):
        run_stage(cfg)


def test_a_user_error_in_a_multirun_job_fails_only_that_job(monkeypatch, capsys):
    import lpld.stages as stages

    monkeypatch.setattr(stages, "_MULTIRUN_FAILURES", [])
    monkeypatch.setattr(stages, "_multirun_job", lambda: (2, ["prune=10x"]))
    with pytest.raises(stages.MultirunFailed) as ex, user_errors(compose_cfg(["stage=student"])):
        raise ConfigError("prune.ratio=abc is not a number")
    assert not isinstance(ex.value, SystemExit)  # Hydra records the job as failed and runs the next one
    assert "lpld error: prune.ratio=abc" in capsys.readouterr().err
    assert "1 multirun job(s) failed" in str(ex.value) and "job 2 (prune=10x): prune.ratio=abc" in str(ex.value)


def test_the_loss_guard_reads_its_flag_only_at_checks():
    from types import SimpleNamespace

    from lpld.lit.fit import FiniteLossGuard

    guard = FiniteLossGuard("student", "student")
    trainer = SimpleNamespace(current_epoch=4, global_step=17, training=True)
    for loss in (torch.tensor(1.0), {"loss": torch.tensor(2.0)}, None):
        guard.on_train_batch_end(trainer, None, loss, None, 0)
    guard.on_save_checkpoint(trainer, None, {})  # finite so far
    guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(float("nan"))}, None, 1)
    guard.on_train_batch_end(trainer, None, torch.tensor(0.5), None, 2)  # a later finite loss does not clear it
    with pytest.raises(ConfigError, match=r"stage student: the student's training loss is not finite .* epoch 4"):
        guard.on_save_checkpoint(trainer, None, {})
