"""Recover stage: every method end to end on demo, resume, DDP equality, bad inputs, artifact round trip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, compose_cfg

from lpld.artifacts import images as images_artifact
from lpld.artifacts import stats as stats_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.core.bn_hooks import bn_layers
from lpld.core.images import images_fingerprint, list_pngs, load_distilled, read_png
from lpld.core.io import ArtifactError, atomic_torch_save, fingerprint_state_dict
from lpld.stages import ConfigError

METHODS = ["lpld", "lpld_c", "sre2l", "cda", "rded", "random_real"]


def base_overrides(root: Path, *extra: str) -> list[str]:
    return [
        "stage=recover",
        "dataset=demo",
        "model=convnet",
        "model.width=8",
        "logger=none",
        "trainer=cpu",
        f"paths.root={root}",
        "ipc=2",
        *extra,
    ]


def _cfg(root: Path, *extra: str):
    if "recover=rded" in extra:
        knobs: tuple[str, ...] = ("recover.rded.candidates_per_class=8",)
    elif "recover=random_real" in extra:
        knobs = ()
    else:
        knobs = ("recover.iterations=3",)
    return compose_cfg(base_overrides(root, *knobs, *extra))


def make_teacher_and_stats(root: Path, seed: int = 0, stats_teacher_fp: str | None = None) -> str:
    """A random narrow ConvNet teacher (squeeze's teacher.pt format) and a stats artifact for it."""
    from lpld.stages.common import build_teacher_model

    cfg = compose_cfg(base_overrides(root))
    torch.manual_seed(seed)
    m = build_teacher_model(cfg).eval()
    # make BN running stats non-trivial so global and class-wise targets differ
    with torch.no_grad():
        for _, b in bn_layers(m):
            b.running_mean.normal_(0, 0.2)
            b.running_var.uniform_(0.5, 1.5)
    fp = fingerprint_state_dict(m.state_dict())
    atomic_torch_save(teacher_artifact.path(cfg), {"state_dict": m.state_dict(), "fingerprint": fp})
    K = int(cfg.dataset.num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    layers = bn_layers(m)
    atomic_torch_save(
        stats_artifact.path(cfg),
        {
            "layers": [n for n, _ in layers],
            "mean": [torch.randn(K, b.num_features, generator=g) * 0.2 for _, b in layers],
            "var": [torch.rand(K, b.num_features, generator=g) + 0.5 for _, b in layers],
            "count": torch.full((K,), 800, dtype=torch.long),
            "teacher_fingerprint": stats_teacher_fp or fp,
            "mode": "exact",
            "num_classes": K,
            "class_names": [str(i) for i in range(K)],
        },
    )
    return fp


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover_world")
    fp = make_teacher_and_stats(root)
    return root, fp


def run_recover(root: Path, *extra: str) -> dict:
    from lpld.stages.recover import run

    return run(_cfg(root, *extra))


def out_dir(root: Path, *extra: str) -> Path:
    return images_artifact.path(_cfg(root, *extra))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_ipc_x_classes_images(world, method):
    root, fp = world
    extra = (f"recover={method}", "recover.group_classes=5") if method in ("sre2l", "cda") else (f"recover={method}",)
    res = run_recover(root, *extra)
    assert res["complete"] and res["classes_done"] == 10
    images, labels, man = load_distilled(out_dir(root, *extra), expect_teacher_fingerprint=fp)
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert man["method"] == method and man["teacher_fingerprint"] == fp and man["ipc"] == 2
    assert man["images_fingerprint"] == images_fingerprint(out_dir(root, *extra))
    assert set(man["per_class_loss"]) == {str(c) for c in range(10)}
    assert (man["stats_fingerprint"] is not None) == (method == "lpld")
    assert images.float().std() > 0  # not blank
    if method == "random_real":
        from lpld.data import build_dataset

        ds = build_dataset(_cfg(root).dataset, "train")  # demo: decoded uint8 images in memory
        reals = {bytes(ds.images[i].numpy().tobytes()) for i in range(len(ds)) if ds.targets[i] == 0}
        assert all(bytes(images[j].numpy().tobytes()) in reals for j in range(2))
    # second run: nothing to do, same bytes
    again = run_recover(root, *extra)
    assert again["state"] == "done" and again["images_fingerprint"] == man["images_fingerprint"]


def test_png_round_trip_and_teacher_check(world):
    root, fp = world
    run_recover(root)
    d = out_dir(root)
    imgs, labels, man = load_distilled(d)
    first = list_pngs(d)[0][1]
    assert torch.equal(read_png(first), imgs[0])
    with pytest.raises(ArtifactError, match="allow_other_teacher"):
        load_distilled(d, expect_teacher_fingerprint="0" * 16)
    load_distilled(d, expect_teacher_fingerprint="0" * 16, allow_other_teacher=True)


def test_classes_per_batch_does_not_change_images(world):
    root, _ = world
    a = run_recover(root, "recover.classes_per_batch=1", "seed=3")
    imgs_a, _, _ = load_distilled(out_dir(root, "seed=3"))
    shutil.rmtree(out_dir(root, "seed=3"))
    b = run_recover(root, "recover.classes_per_batch=4", "seed=3")
    imgs_b, _, _ = load_distilled(out_dir(root, "seed=3"))
    # same objective per image; only the convolution's summation order may differ -> at most 1 grey level
    assert (imgs_a.int() - imgs_b.int()).abs().max() <= 1
    assert a["complete"] and b["complete"]


def test_resume_after_interruption_gives_same_bytes(tmp_path, monkeypatch):
    make_teacher_and_stats(tmp_path)
    ref = run_recover(tmp_path, "recover.classes_per_batch=2", "seed=5")
    ref_fp = ref["images_fingerprint"]
    shutil.rmtree(out_dir(tmp_path, "seed=5"))

    import lpld.core.recover_methods.optimize as rm  # where the optimize method calls the loop

    real = rm.synthesize
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated interruption")
        return real(*a, **k)

    monkeypatch.setattr(rm, "synthesize", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        run_recover(tmp_path, "recover.classes_per_batch=2", "seed=5")
    d = out_dir(tmp_path, "seed=5")
    man = json.loads((d / "manifest.json").read_text())
    assert not man["complete"]
    with pytest.raises(ArtifactError, match="incomplete"):
        load_distilled(d)
    done_before = {p.parent.name for p in d.glob("*/.recover.json")}
    assert len(done_before) == 4  # two device batches of 2 classes finished before the interruption
    monkeypatch.setattr(rm, "synthesize", real)
    calls["n"] = 0
    res = run_recover(tmp_path, "recover.classes_per_batch=2", "seed=5")
    assert res["state"] == "resume" and res["complete"]
    assert res["images_fingerprint"] == ref_fp


def test_bad_inputs_fail_clearly_and_overwrite_nothing(tmp_path):
    fp = make_teacher_and_stats(tmp_path)
    with pytest.raises(ConfigError, match="ipc"):
        run_recover(tmp_path, "ipc=0")
    with pytest.raises(ConfigError, match="class range"):
        run_recover(tmp_path, "recover.class_end=11")
    with pytest.raises(ConfigError, match="class range"):
        run_recover(tmp_path, "recover.class_start=5", "recover.class_end=5")
    with pytest.raises(ConfigError, match="group boundary"):
        run_recover(tmp_path, "recover=sre2l", "recover.group_classes=4", "recover.class_start=2")
    with pytest.raises(ConfigError, match="unknown recover method"):
        run_recover(tmp_path, "recover.name=nope")
    # a partial class range is resumable and incomplete
    part = run_recover(tmp_path, "recover.class_start=0", "recover.class_end=3")
    assert part["classes_done"] == 3 and not part["complete"]
    d = out_dir(tmp_path)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    # a different lr is another artifact (its key signs every recover knob): another folder
    assert out_dir(tmp_path, "recover.lr=0.3").parent == d.parent and out_dir(tmp_path, "recover.lr=0.3") != d
    # same folder, other inputs (another teacher at the same path) -> refused, nothing touched
    make_teacher_and_stats(tmp_path, seed=5)
    with pytest.raises(ArtifactError, match="overwrite"):
        run_recover(tmp_path, "recover.class_start=3")
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    make_teacher_and_stats(tmp_path)
    # finishing the other classes with the original config completes the folder
    rest = run_recover(tmp_path, "recover.class_start=3")
    assert rest["complete"]
    res = run_recover(tmp_path, "recover.lr=0.3", "recover.overwrite=true")
    assert res["complete"] and res["images_fingerprint"] != rest["images_fingerprint"]
    # missing stats for lpld
    stats = stats_artifact.path(_cfg(tmp_path))
    stats.rename(stats.with_suffix(".bak"))
    with pytest.raises(ArtifactError, match="stage=stats"):
        run_recover(tmp_path, "seed=1")
    assert not out_dir(tmp_path, "seed=1").exists()
    run_recover(tmp_path, "recover=lpld_c", "seed=1")  # lpld_c needs no class-wise stats
    # stats recorded with another teacher
    make_teacher_and_stats(tmp_path, stats_teacher_fp="f" * 16)
    with pytest.raises(ArtifactError, match="another teacher|current teacher"):
        run_recover(tmp_path, "seed=2")
    assert fp  # the teacher existed throughout


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(tmp_path):
    make_teacher_and_stats(tmp_path)
    single = run_recover(tmp_path, "seed=7", "recover.classes_per_batch=2")
    d = out_dir(tmp_path, "seed=7")
    single_bytes = {p.relative_to(d): p.read_bytes() for _, p in list_pngs(d)}
    shutil.rmtree(d)
    ddp = run_recover(tmp_path, "seed=7", "recover.classes_per_batch=2", "trainer=ddp_cpu")
    assert ddp["complete"]
    assert ddp["images_fingerprint"] == single["images_fingerprint"]
    assert {p.relative_to(d): p.read_bytes() for _, p in list_pngs(d)} == single_bytes


@pytest.mark.slow
def test_run_py_end_to_end_demo_ipc10(tmp_path):
    make_teacher_and_stats(tmp_path)
    env = dict(os.environ, WANDB_MODE="disabled", LPLD_NO_RICH="1")
    cmd = [
        sys.executable,
        "run.py",
        "stage=recover",
        "dataset=demo",
        "ipc=10",
        "model.width=8",
        f"paths.root={tmp_path}",
        "recover.iterations=2",
        "recover.classes_per_batch=5",
        "logger=none",
    ]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=300)
    from lpld.artifacts import images as images_artifact

    # the folder the command wrote, found as every consumer finds it: from the same config (its key carries a hash)
    over = ["stage=recover", "dataset=demo", "ipc=10", "model.width=8", f"paths.root={tmp_path}"]
    d = images_artifact.path(compose_cfg([*over, "recover.iterations=2", "recover.classes_per_batch=5"]))
    imgs, labels, man = load_distilled(d)
    assert imgs.shape == (100, 1, 28, 28) and man["complete"]
    assert torch.bincount(labels).tolist() == [10] * 10


@pytest.mark.parametrize("method", METHODS)
def test_every_recover_config_composes(method, tmp_path):
    from lpld.config import recover_settings

    s = recover_settings(compose_cfg([f"recover={method}", "stage=recover", f"paths.root={tmp_path}"]))
    assert s["name"] == method
    if method in ("lpld", "lpld_c", "sre2l", "cda"):
        assert s["iterations"] > 0 and s["betas"] == [0.5, 0.9] and s["first_bn_multiplier"] == 10.0
