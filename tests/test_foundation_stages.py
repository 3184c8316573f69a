"""squeeze -> stats end to end, squeeze resume, stats DDP equality, entry-point errors."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_cfg, tiny_overrides, write_image_tree

from lpld.artifacts import stats as stats_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.core.io import atomic_torch_save, fingerprint_state_dict
from lpld.stages import ConfigError, dispatch, run_stage


def save_random_teacher(cfg) -> str:
    """A randomly initialised teacher with non-trivial BN running stats at squeeze's path."""
    from lpld.stages.common import build_teacher_model

    torch.manual_seed(0)
    model = build_teacher_model(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    state = model.state_dict()
    atomic_torch_save(teacher_artifact.path(cfg), {"state_dict": state, "fingerprint": "x", "val": {}})
    return fingerprint_state_dict(state)


def test_cli_squeeze_then_stats(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=4, per_class=6)
    ov = tiny_overrides(tmp_path, root)
    sq = ["stage.epochs=2", "stage.batch_size=8"]
    env_run = [sys.executable, str(REPO / "run.py")]
    r = subprocess.run(env_run + ["stage=squeeze", *ov, *sq], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = compose_cfg(["stage=stats", *ov])
    blob = torch.load(teacher_artifact.path(cfg), weights_only=True)
    assert blob["epochs"] >= 1 and "val/acc1" in blob["val"]
    r = subprocess.run(env_run + ["stage=stats", *ov], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = torch.load(stats_artifact.path(cfg), weights_only=True)
    assert stats["count"].tolist() == [6, 6, 6, 6]
    assert stats["teacher_fingerprint"] == fingerprint_state_dict(blob["state_dict"])
    assert len(stats["layers"]) == 3 and stats["mean"][0].shape == (4, 8)
    # rerunning reuses the artifacts instead of retraining
    r = subprocess.run(env_run + ["stage=squeeze", *ov, *sq], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "reusing" in r.stderr + r.stdout


def test_squeeze_resumes_after_interruption(tmp_path, monkeypatch):
    import lightning as L

    from lpld.stages import squeeze

    root = write_image_tree(tmp_path / "data", n_classes=4, per_class=6)
    cfg = compose_cfg(["stage=squeeze", *tiny_overrides(tmp_path, root), "stage.epochs=3", "stage.batch_size=8"])

    class Interrupt(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt  # what Ctrl-C does mid-run

    monkeypatch.setattr(squeeze, "extra_callbacks", [Interrupt()])
    with pytest.raises(SystemExit):  # Lightning turns Ctrl-C into a graceful exit(1)
        dispatch(cfg)
    last = teacher_artifact.dir(cfg) / "last.ckpt"
    assert last.exists() and not teacher_artifact.path(cfg).exists()
    assert torch.load(last, weights_only=False)["epoch"] == 0  # epoch 0 finished, epoch 1 interrupted

    class Count(L.Callback):
        epochs: list[int] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.epochs.append(trainer.current_epoch)

    monkeypatch.setattr(squeeze, "extra_callbacks", [Count()])
    dispatch(cfg)
    assert Count.epochs == [1, 2]  # resumed, did not start over
    assert torch.load(teacher_artifact.path(cfg), weights_only=True)["epochs"] == 3


def test_teacher_is_shared_across_run_seeds(tmp_path):
    """`seed` varies the distilled data and students, not the teacher: seed=1 reuses the seed-0 teacher
    (a multi-seed sweep must not trip the teacher fingerprint); teacher_seed=1 trains its own, elsewhere."""
    root = write_image_tree(tmp_path / "data", n_classes=4, per_class=6)
    base = ["stage=squeeze", *tiny_overrides(tmp_path, root), "stage.epochs=1", "stage.batch_size=8"]
    cfg0 = compose_cfg(base)
    dispatch(cfg0)
    w0 = teacher_artifact.path(cfg0)
    before = w0.read_bytes()
    cfg_s1 = compose_cfg(base + ["seed=1"])
    assert teacher_artifact.path(cfg_s1) == w0
    assert run_stage(cfg_s1).get("reused") is True
    assert w0.read_bytes() == before
    cfg_t1 = compose_cfg(base + ["teacher_seed=1"])
    w1 = teacher_artifact.path(cfg_t1)
    assert w1 != w0 and teacher_artifact.teacher_name(cfg_t1).endswith("-s1")
    dispatch(cfg_t1)
    s0 = torch.load(w0, weights_only=True)["state_dict"]
    s1 = torch.load(w1, weights_only=True)["state_dict"]
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if s0[k].is_floating_point())
    assert w0.read_bytes() == before


def test_stats_ddp_two_processes_equal_one(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=5, per_class=7)  # 35 images: uneven shards
    base = ["stage=stats", *tiny_overrides(tmp_path, root, n_classes=5), "stage.batch_size=4"]
    cfg1 = compose_cfg(base + ["paths.artifacts=" + str(tmp_path / "a1")])
    fp = save_random_teacher(cfg1)
    dispatch(cfg1)
    cfg2 = compose_cfg(base + ["trainer=ddp_cpu", "paths.artifacts=" + str(tmp_path / "a2")])
    assert save_random_teacher(cfg2) == fp
    dispatch(cfg2)
    s1 = torch.load(stats_artifact.path(cfg1), weights_only=True)
    s2 = torch.load(stats_artifact.path(cfg2), weights_only=True)
    assert s1["count"].tolist() == s2["count"].tolist() == [7] * 5
    for a, b in zip(s1["mean"] + s1["var"], s2["mean"] + s2["var"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_stats_refuses_missing_teacher_and_unknown_stage(tmp_path):
    root = write_image_tree(tmp_path / "data", n_classes=4, per_class=2)
    cfg = compose_cfg(["stage=stats", *tiny_overrides(tmp_path, root)])
    with pytest.raises(Exception, match="stage=squeeze"):
        dispatch(cfg)
    with pytest.raises(ConfigError, match="Valid stages"):
        dispatch(cfg.with_values({"stage.name": "bogus"}))


def test_official_stats_pass_is_a_function_of_the_teacher_seed(tmp_path):
    """The official (augmented EMA) pass draws each image's crop/flip from (teacher seed, index): the global RNG
    state before the pass and the run seed do not change its bytes (one pass per teacher serves every run seed,
    and the key says so), while another teacher seed gives another pass."""
    root = write_image_tree(tmp_path / "data", n_classes=4, per_class=6)
    base = ["stage=stats", "stage.mode=official", *tiny_overrides(tmp_path, root), "stage.batch_size=8"]

    def run(name: str, *extra: str) -> dict:
        cfg = compose_cfg([*base, f"paths.artifacts={tmp_path / name}", *extra])
        save_random_teacher(cfg)
        torch.manual_seed(12345 + len(name))  # a different global RNG state before each pass
        dispatch(cfg)
        return torch.load(stats_artifact.path(cfg), weights_only=True)

    a, b, c = run("a"), run("bb", "seed=7"), run("ccc", "teacher_seed=3")
    for x, y in zip(a["mean"] + a["var"], b["mean"] + b["var"]):
        assert torch.equal(x, y)
    assert any(not torch.equal(x, y) for x, y in zip(a["mean"], c["mean"]))
    cfg0, cfg7 = (compose_cfg([*base, f"seed={s}"]) for s in (0, 7))
    assert stats_artifact.path(cfg0) == stats_artifact.path(cfg7)
