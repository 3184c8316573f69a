"""GPU tier (``make test-gpu`` = ``pytest -m gpu``): every stage on CUDA on tiny data, compared with the CPU.

Skipped as a whole without a CUDA device. Stages share one tiny imagefolder tree and one artifact root
(module-scoped), in pipeline order: squeeze -> stats -> recover -> relabel -> student; then the reduced
demo pipeline with ``trainer=gpu``. Tolerances (stated here, README "GPU"):

* stats: GPU (``32-true``, TF32 off) vs CPU class-wise mean/var within rtol 1e-4, atol 1e-5 (fp32 kernels
  in a different summation order; the sums themselves are float64);
* recover: the first iteration's per-class losses within rtol 1e-4 (same forward in fp32), and after
  5 Adam steps 99.9% of pixels within 1e-3 (Adam's first steps are ~lr * sign(grad), so a gradient
  near 0 may flip sign between devices: a few pixels may move by up to 2 * lr);
* relabel: the teacher on the GPU reproduces the stored fp16 logits from the replayed augmentation
  within fp16 rounding (rtol 2e-3, atol 2e-3) for both record modes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# LPLD_GPU_TIER_DEVICE=cpu dry-runs this tier's logic on the CPU (trainer=cpu), to check it without a GPU
DEV = os.environ.get("LPLD_GPU_TIER_DEVICE", "cuda")
PRESET = "trainer=gpu" if DEV == "cuda" else "trainer=cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu on a GPU machine)"
    ),
]

N_CLASSES, IPC, SIZE = 4, 3, 16


@pytest.fixture(scope="module")
def gpu_root(tmp_path_factory):
    from conftest import tiny_overrides, write_image_tree

    tmp = tmp_path_factory.mktemp("gpu")
    data = write_image_tree(tmp / "data", n_classes=N_CLASSES, per_class=8, size=SIZE)
    base = [
        *tiny_overrides(tmp, data, n_classes=N_CLASSES, size=SIZE),
        f"ipc={IPC}",
        "dataset.recipe.squeeze.epochs=1",
        "dataset.recipe.recover.iterations=6",
        "dataset.recipe.student.epochs=3",
        "dataset.recipe.student.batch_size=4",
    ]
    return tmp, base


def _cfg(base, *extra):
    from conftest import compose_cfg

    return compose_cfg([*base, PRESET, "trainer.num_workers=0", *extra])


def test_1_squeeze_one_epoch(gpu_root):
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.stages import dispatch

    _, base = gpu_root
    cfg = _cfg(base, "stage=squeeze")
    dispatch(cfg)
    blob = torch.load(teacher_artifact.path(cfg), map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in blob["state_dict"].values() if v.is_floating_point())


def test_2_stats_equal_cpu(gpu_root):
    from lpld.artifacts import stats as stats_artifact
    from lpld.stages import dispatch

    _, base = gpu_root
    cpu = _cfg(base, "stage=stats", "trainer=cpu")
    dispatch(cpu)
    ref = torch.load(stats_artifact.path(cpu), map_location="cpu", weights_only=True)
    gpu = _cfg(base, "stage=stats", "stage.overwrite=true", "trainer.perf.tf32=false", "stage.batch_size=7")
    dispatch(gpu)
    got = torch.load(stats_artifact.path(gpu), map_location="cpu", weights_only=True)
    for key in ("mean", "var"):
        assert len(got[key]) == len(ref[key])
        for a, b in zip(got[key], ref[key], strict=True):
            assert a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_2b_official_stats_equal_cpu(gpu_root):
    """The presets' own mode (in1k / tiny / in21k: ``official``, the augmented EMA) on the GPU equals the CPU pass:
    the crops and the order are keyed by the teacher seed, so only fp32 rounding differs; same global batch."""
    from lpld.artifacts import stats as stats_artifact
    from lpld.stages import dispatch

    _, base = gpu_root
    off = ("stage=stats", "stage.mode=official", "stage.batch_size=8")
    cpu = _cfg(base, *off, "trainer=cpu")
    dispatch(cpu)
    ref = torch.load(stats_artifact.path(cpu), map_location="cpu", weights_only=True)
    gpu = _cfg(base, *off, "stage.overwrite=true", "trainer.perf.tf32=false")
    dispatch(gpu)
    got = torch.load(stats_artifact.path(gpu), map_location="cpu", weights_only=True)
    assert got["mode"] == ref["mode"] == "official" and got["global_batch"] == ref["global_batch"] == 8
    assert torch.equal(got["count"], ref["count"]) and int(got["count"].sum()) == N_CLASSES * 8
    for key in ("mean", "var"):
        for a, b in zip(got[key], ref[key], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_3_recover_matches_cpu_and_stage_runs(gpu_root):
    from lpld.artifacts import images as images_artifact
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.core.bn_hooks import bn_layers
    from lpld.core.recover_loss import LossWeights
    from lpld.core.synthesis import SynthesisConfig, plan_units, synthesize
    from lpld.stages import dispatch

    _, base = gpu_root
    cfg = _cfg(base, "stage=recover")
    teacher, _ = teacher_artifact.load(cfg)
    g = torch.Generator().manual_seed(0)
    mean = [torch.randn(N_CLASSES, m.num_features, generator=g) * 0.1 for _, m in bn_layers(teacher)]
    var = [torch.rand(N_CLASSES, m.num_features, generator=g) + 0.5 for _, m in bn_layers(teacher)]
    scfg = SynthesisConfig(
        iterations=5, lr=0.05, ipc=IPC, channels=3, image_size=SIZE,
        weights=LossWeights(alpha=0.1, tv_l2=1e-4, l2=1e-5),
        pixel_min=(-2.0,) * 3, pixel_max=(2.0,) * 3, roll=2,
    )  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = {}
    for dev in ("cpu", DEV):
        first = []

        def on_step(t, losses, first=first):
            if t == 0:
                first.append(losses.total.cpu())

        res = synthesize(
            teacher.to(dev), plan_units(range(N_CLASSES), IPC, "class", True), scfg, mean, var, dev, on_step
        )
        out[dev] = (first[0], torch.cat([r.images for r in res]))
    torch.testing.assert_close(out[DEV][0], out["cpu"][0], rtol=1e-4, atol=1e-6)
    diff = (out[DEV][1] - out["cpu"][1]).abs()
    assert (diff <= 1e-3).float().mean() >= 0.999, float(diff.max())
    dispatch(cfg)  # the stage on the GPU writes every class's PNGs
    assert (images_artifact.path(cfg) / "manifest.json").exists()


@pytest.mark.parametrize("mode", ["explicit", "seed"])
def test_4_relabel_store_replays_on_gpu(gpu_root, mode):
    from lpld.artifacts import images as images_artifact
    from lpld.artifacts import labels as labels_artifact
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.core import augment
    from lpld.core.images import load_distilled
    from lpld.core.label_store import LabelStore
    from lpld.stages import dispatch
    from lpld.stages.common import dataset_spec

    _, base = gpu_root
    cfg = _cfg(base, "stage=relabel", f"relabel.record_mode={mode}", "quant=none")
    dispatch(cfg)
    store = LabelStore.open(labels_artifact.path(cfg), verify="full")
    assert len(store) > 0
    images, _, _ = load_distilled(images_artifact.path(cfg), verify=False)
    spec = dataset_spec(cfg)
    teacher, _ = teacher_artifact.load(cfg)
    teacher = teacher.to(DEV).eval()
    x_all = augment.to_model_input(images.to(DEV), spec.mean, spec.std)
    out_size = int(store.spec.aug.out_size)
    with torch.no_grad():
        for i in range(min(len(store), 4)):
            b = store.read(i)
            x = augment.replay(x_all, _to_cuda(b), out_size)
            z = teacher(x).float().cpu()
            torch.testing.assert_close(z.half().float(), b.logits.float(), rtol=2e-3, atol=2e-3)


def _to_cuda(b):
    import dataclasses

    from lpld.core import augment

    return dataclasses.replace(b, index=b.index.to(DEV), aug=augment.record_to(b.aug, DEV))


def test_5_student_records_top1(gpu_root):
    from lpld.artifacts import results as results_artifact
    from lpld.report.records import load_records
    from lpld.stages import dispatch

    _, base = gpu_root
    cfg = _cfg(base, "stage=student", "stage.results_name=gpu")
    dispatch(cfg)
    recs = load_records(results_artifact.dir(cfg) / "gpu.jsonl")
    assert len(recs) == 1 and 0.0 <= recs[0]["top1"] <= 1.0
    rec, n_val = recs[0], N_CLASSES * 8
    assert abs(rec["top1"] * n_val - round(rec["top1"] * n_val)) < 1e-4  # a count of the 32 val images
    assert rec["top5"] == pytest.approx(1.0)  # 4 classes: the top 5 hold every class
    assert rec["top1"] <= rec["top5"] and (rec["epochs"], rec["global_batch"]) == (3, 4)


def test_6_reduced_demo_pipeline_on_gpu(tmp_path):
    """``stage=pipeline`` on the demo with the GPU preset (the fast tier's reduced demo settings)."""
    from conftest import REPO
    from test_pipeline import REDUCED

    over = [o for o in REDUCED if not o.startswith("trainer.num_workers")]
    cmd = [sys.executable, str(REPO / "run.py"), f"paths.root={tmp_path}", PRESET, "trainer.num_workers=2", *over]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert "| method | ipc | prune |" in r.stdout
