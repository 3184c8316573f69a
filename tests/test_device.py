"""Device correctness without a GPU: hot paths run on the ``meta`` device under a dispatch-level guard.

The ``meta`` device stands in for CUDA: tensors have shapes and dtypes but no data. ``DeviceGuard``
sees every aten op and fails when one op mixes devices (a CPU tensor other than a 0-dim scalar with a
device tensor, which CUDA refuses, e.g. ``x.sub_(cpu_mean)``: the student crash of issue 10, which the
meta device itself silently accepts for in-place ops), and, when ``no_sync`` is set, when an op needs
the device's data on the host (``.item()``/``.tolist()``, ``bincount``, ``unique``, ``nonzero``, a
device -> host copy): on a GPU each is a host-device synchronisation.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lpld.core import augment, quant
from lpld.core.label_store import StoredBatch

META = torch.device("meta")
# ops whose output size or value depends on the data: on a GPU the host waits for the device
SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::masked_select",
    "aten::is_nonzero",
    "aten::equal",
}
COPY_OPS = {"aten::_to_copy", "aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize"}


def _is_host_scalar(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dim() == 0  # CUDA kernels accept 0-dim CPU tensors as scalars


class DeviceGuard(TorchDispatchMode):
    """Fail on device mixing inside one op; with ``no_sync``, also on host syncs / device -> host copies.

    Copies (``.to``/``copy_``) may move host data onto the device (that is how inputs get there);
    a copy *off* the device is a sync and is recorded in ``syncs``.
    """

    def __init__(self, no_sync: bool = True):
        super().__init__()
        self.no_sync = no_sync
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if name in SYNC_OPS and any(t.device.type != "cpu" for t in tensors):
            self._sync(name)
        if name in COPY_OPS:
            if name == "aten::_to_copy":
                srcs, dst = tensors[:1], torch.device(kwargs.get("device") or tensors[0].device)
            else:  # copy_(dst, src) and friends
                srcs, dst = tensors[1:], tensors[0].device
            if dst.type == "cpu" and any(s.device.type != "cpu" for s in srcs):
                self._sync(f"{name} (device -> host)")
            return func(*args, **kwargs)
        devices = {t.device.type for t in tensors if not _is_host_scalar(t)}
        if len(devices) > 1:
            shapes = [(t.device.type, tuple(t.shape)) for t in tensors]
            raise AssertionError(f"{name} mixes devices {sorted(devices)}: {shapes}")
        return func(*args, **kwargs)

    def _sync(self, what: str) -> None:
        self.syncs.append(what)
        if self.no_sync:
            raise AssertionError(f"host-device sync in a hot path: {what}")


def test_guard_catches_the_issue_crashes_and_syncs():
    """The guard is not vacuous: the old ``to_model_input`` (CPU constants, in-place) and a .tolist() fail."""
    x = torch.zeros(2, 3, 4, 4, device=META)
    cpu_mean = torch.zeros(1, 3, 1, 1)
    x.sub_(cpu_mean)  # the meta device alone accepts this; CUDA does not
    with pytest.raises(AssertionError, match="mixes devices"), DeviceGuard():
        x.sub_(cpu_mean)
    with pytest.raises(AssertionError, match="sync"), DeviceGuard():
        torch.bincount(torch.zeros(3, dtype=torch.long, device=META), minlength=3)
    with pytest.raises(AssertionError, match="sync"), DeviceGuard():
        torch.zeros(3, device=META).cpu()
    with DeviceGuard():  # a 0-dim CPU tensor is a scalar on CUDA too; host -> device copies are fine
        _ = x * torch.tensor(2.0)
        _ = torch.ones(3).to(META)


def _old_to_model_input(images_uint8, mean, std):
    x = images_uint8.to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_to_model_input_on_device_and_old_version_fails():
    u8 = torch.zeros(4, 3, 8, 8, dtype=torch.uint8, device=META)
    with DeviceGuard():
        out = augment.to_model_input(u8, MEAN, STD)
    assert out.device == META and out.dtype == torch.float32
    with pytest.raises(AssertionError, match="mixes devices"), DeviceGuard():
        _old_to_model_input(u8, MEAN, STD)  # the crash of issue 10, caught on CPU
    # same values as before on CPU (the fix only moves the constants)
    cpu = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(augment.to_model_input(cpu, MEAN, STD), _old_to_model_input(cpu, MEAN, STD))


@pytest.mark.parametrize("mix", augment.MIX_MODES)
def test_apply_replay_on_device_without_sync(mix):
    cfg = augment.AugConfig(out_size=8, mix=mix)
    rec = augment.draw(cfg, 5, (8, 8), seed=3)
    moved = augment.record_to(rec, META)
    assert moved.crops.device == META and (moved.box is None or moved.box.device.type == "cpu")
    images = torch.zeros(6, 3, 8, 8, device=META)
    index = torch.tensor([0, 2, 2, 5, 1]).to(META)
    with DeviceGuard():
        out = augment.apply(images, index, moved, 8)
        out2 = augment.replay(images, StoredBatch(index=index, aug=moved), 8)
    assert out.shape == out2.shape == (5, 3, 8, 8) and out.device == META
    if mix == "cutmix":  # a box left on the device would be read back every batch
        on_dev = dataclasses.replace(moved, box=rec.box.to(META))
        with pytest.raises(AssertionError, match="sync"), DeviceGuard():
            augment.apply(images, index, on_dev, 8)


def _student(mix: str = "cutmix", quant_mode: str = "none", loss: str = "kl"):
    from lpld.lit.student_module import StudentModule

    m = StudentModule(
        model_cfg={"name": "convnet", "width": 8, "depth": 2},
        num_classes=5,
        in_chans=3,
        img_size=8,
        quant_mode=quant_mode,
        loss={"name": loss, "gamma": 0.1, "t2": False},
        temp={"t0": 4.0, "schedule": "none"},
        ca={"mode": "none", "value": None},
        optim={"name": "adamw", "lr": 1e-3},
        epochs=2,
        steps_per_epoch=1,
        mean=MEAN,
        std=STD,
    )
    g = torch.Generator().manual_seed(0)
    m.set_images(torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(7) % 5)
    rec = augment.draw(augment.AugConfig(out_size=8, mix=mix), 4, (8, 8), seed=1)
    index = torch.tensor([3, 0, 3, 6])
    logits = torch.randn(4, 5, generator=g)
    labels = quant.encode_tensors(logits, quant.QuantConfig(quant_mode, 2 if quant_mode in ("mr", "ms") else 0))
    labels = {k: (v.long() if not v.is_floating_point() else v) for k, v in labels.items()}
    return m, StoredBatch(index=index, aug=rec, **labels)


@pytest.mark.parametrize(
    "mix,quant_mode,loss",
    [("cutmix", "none", "kl"), ("cutout", "mr", "kl"), ("cutmix", "ms", "mse_gt"), ("none", "hard", "ce")],
)
def test_student_replay_and_loss_on_device_without_sync(mix, quant_mode, loss):
    m, stored = _student(mix, quant_mode, loss)
    ref_x = m.replay(stored)  # the same path on the CPU gives a finite loss
    ref_loss, _ = m.compute_loss(m.model(ref_x), stored, slice(0, 4), 4.0)
    assert torch.isfinite(ref_loss)
    m = m.to(META)
    if hasattr(m, "_place_data"):  # images are plain attributes moved at fit start, not buffers
        m._place_data()
    with DeviceGuard():
        batch = m.transfer_batch_to_device(stored, META, 0)
        x = m.replay(batch)
        logits = m.model(x[0:3])
        loss_t, _ = m.compute_loss(logits, batch, slice(0, 3), 4.0)
    assert x.device == META and loss_t.device == META and loss_t.dim() == 0
    assert batch.aug.crops.device == META and batch.index.device == META


def test_student_replay_equals_whole_set_replay():
    """Replaying from this batch's images only equals ``augment.replay`` on the whole converted set."""
    m, stored = _student("cutmix")
    whole = augment.replay(augment.to_model_input(m.images_u8, MEAN, STD), stored, 8)
    assert torch.equal(m.replay(stored), whole)


def test_recover_losses_on_device_without_sync():
    from lpld.core.jitter import JitterPlan, apply_jitter, draw_jitter_plan, make_generator
    from lpld.core.recover_loss import LossWeights, recover_losses, segment_counts

    seg = torch.tensor([0, 0, 1, 1, 1, 2])
    counts = segment_counts(seg, 3).to(META)
    plan = JitterPlan.stack([draw_jitter_plan(make_generator(0, "j", s), 4, 8, 8, roll=2) for s in range(3)]).to(META)
    x = torch.zeros(6, 3, 8, 8, device=META, requires_grad=True)
    seg_d, targets = seg.to(META), torch.tensor([1, 1, 2, 2, 2, 0]).to(META)
    w = LossWeights(alpha=0.1, tv_l2=1e-4, l2=1e-5)
    tm = [torch.zeros(3, 3).to(META), torch.zeros(3, 5).to(META)]
    tv = [torch.ones(3, 3).to(META), torch.ones(3, 5).to(META)]
    with DeviceGuard():
        x_aug = apply_jitter(x, plan.at(1).index(seg_d))
        bn_in = [x_aug * 2.0, torch.zeros(6, 5, 4, 4, device=META)]
        logits = x_aug.flatten(1)[:, :4]
        losses = recover_losses(logits, targets, x_aug, bn_in, seg_d, 3, tm, tv, w, counts=counts)
        losses.objective().backward()
    assert losses.total.shape == (3,) and x.grad is not None and x.grad.device == META


def test_synthesis_loop_on_device_without_sync():
    """Iterations 1..T-1 of ``synthesize`` (whole loop body: jitter, forward, Eq. 6, backward, Adam, clip)
    run on the device with no host sync; only the final copy of the images leaves it."""
    from lpld.core.recover_loss import LossWeights
    from lpld.core.synthesis import SynthesisConfig, plan_units, synthesize
    from lpld.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "convnet", "width": 4, "depth": 2}, num_classes=3, in_chans=3, img_size=8).eval()
    mean = [torch.zeros(3, 4), torch.zeros(3, 4)]
    var = [torch.ones(3, 4), torch.ones(3, 4)]
    cfg = SynthesisConfig(
        iterations=4, lr=0.1, ipc=2, channels=3, image_size=8,
        weights=LossWeights(alpha=0.1, tv_l2=1e-4, l2=1e-5),
        pixel_min=(-2.0,) * 3, pixel_max=(2.0,) * 3, roll=1,
    )  # fmt: skip
    guard, steps = DeviceGuard(), []

    def on_step(t, losses):  # the guard covers everything between the end of step 0 and the end of step T-1
        assert losses.total.device == META
        steps.append(t)
        if t == 0:
            guard.__enter__()
        elif t == cfg.iterations - 1:
            guard.__exit__(None, None, None)

    model = model.to(META)
    with pytest.raises(
        NotImplementedError, match="copy out of meta"
    ):  # x.cpu() after the loop: a meta tensor has no data
        synthesize(model, plan_units([0, 2], 2, "class", True), cfg, mean, var, device=META, on_step=on_step)
    assert steps == [0, 1, 2, 3]


def test_quant_encode_on_device_without_sync():
    z = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    for cfg in (
        quant.QuantConfig("none"),
        quant.QuantConfig("mr", 5),
        quant.QuantConfig("ms", 5, 2.0),
        quant.QuantConfig("hard"),
    ):
        with DeviceGuard():
            enc = quant.encode_tensors(z.to(META), cfg)
        assert all(v.device == META and v.shape[0] == 6 for v in enc.values())
        # host arrays: the store dtypes, equal to the encoding done on the host
        host = quant.encode(z, cfg)
        spec = quant.label_arrays(cfg, 40)
        assert set(host) == set(spec) and all(host[k].dtype == spec[k].dtype for k in host)
        ref = quant.to_host_arrays(quant.encode_tensors(z, cfg), 40)
        assert all(np.array_equal(host[k], ref[k]) for k in host)


def test_bn_hooks_see_fp32_under_autocast():
    """Under bf16 autocast the hooks hand out fp32 and the reducing callback runs with autocast off."""
    from lpld.core.bn_hooks import BNInputHooks

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)
    )
    model.eval()
    seen = []

    def on_input(i, x):
        seen.append((i, x.dtype, torch.is_autocast_enabled("cpu"), (x @ x.transpose(-1, -2)).dtype))

    x = torch.randn(2, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with BNInputHooks(model) as hooks:
            model(x)
            assert all(t.dtype == torch.float32 for t in hooks.inputs)
            assert model[0](x).dtype == torch.bfloat16  # autocast is really on: the hook upcasts
        with BNInputHooks(model, on_input=on_input):
            model(x)
    assert [s[0] for s in seen] == [0, 1]
    assert all(d == torch.float32 and not ac and mm == torch.float32 for _, d, ac, mm in seen)
    # float64 inputs are kept as they are
    with BNInputHooks(model.double()) as hooks:
        model(x.double())
        assert all(t.dtype == torch.float64 for t in hooks.inputs)


def test_stage_precision_and_perf_options_from_presets():
    from conftest import compose_cfg

    from lpld.lit.perf import GpuPerf, PerfOptions, resolve_precision
    from lpld.stages.common import build_trainer

    gpu = compose_cfg(["trainer=gpu", "stage=stats"])
    assert resolve_precision(gpu.trainer, "stats") == "32-true"
    assert resolve_precision(gpu.trainer, "student") == "32-true"  # issue 20: fp32 as the official scripts
    fast = compose_cfg(["trainer=gpu_bf16", "stage=stats"])  # the bf16 fast preset
    assert resolve_precision(fast.trainer, "stats") == "32-true"  # stats targets stay fp32 under bf16 presets
    assert resolve_precision(fast.trainer, "student") == resolve_precision(fast.trainer, "squeeze") == "bf16-mixed"
    assert resolve_precision(gpu.trainer, "stats", "bf16-mixed") == "bf16-mixed"  # a stage's own knob wins
    opts = PerfOptions.from_cfg(gpu.trainer.perf)
    assert opts.cudnn_benchmark and opts.tf32 and opts.channels_last and not opts.compile_student
    with pytest.raises(ValueError, match="trainer.perf"):
        PerfOptions.from_cfg({"channel_last": True})
    for preset in ("cpu", "ddp", "ddp_spawn", "ddp_cpu", "gpu_bf16", "ddp_bf16"):  # every preset has the same keys
        assert PerfOptions.from_cfg(compose_cfg([f"trainer={preset}"]).trainer.perf) is not None
    # on a CPU device the callback leaves the networks alone (CPU results stay bit-identical)
    cfg = compose_cfg(["stage=student", "trainer.stage_precision.student=bf16-mixed", "logger=none"])
    tr = build_trainer(cfg, enable_progress_bar=False)
    assert str(tr.precision) == "bf16-mixed" and any(isinstance(c, GpuPerf) for c in tr.callbacks)
    net = torch.nn.Conv2d(3, 4, 3)

    class M(torch.nn.Module):
        model = net

    GpuPerf(PerfOptions(channels_last=False, compile_student=True)).setup(tr, M(), "fit")
    assert net.weight.is_contiguous() and getattr(net, "_compiled_call_impl", None) is None  # nothing done on CPU
    # channels_last acts on any device (the cpu preset turns it on: oneDNN's faster layout)
    assert compose_cfg(["trainer=cpu"]).trainer.perf.channels_last
    net2 = torch.nn.Conv2d(3, 4, 3)

    class M2(torch.nn.Module):
        model = net2

    GpuPerf(PerfOptions(channels_last=True, compile_student=True)).setup(tr, M2(), "fit")
    assert net2.weight.is_contiguous(memory_format=torch.channels_last) and not net2.weight.is_contiguous()
    assert getattr(net2, "_compiled_call_impl", None) is None  # compile stays CUDA-only


def test_jpeg_draft_decode(tmp_path):
    """``draft`` keeps small JPEGs byte-identical and decodes large ones at a reduced scale >= the target."""
    from PIL import Image

    from lpld.data.datasets import FileImageDataset, decode_to_uint8, eval_draft_side, load_image

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((160, 120))
    big = small.resize((400, 300))
    ps, pb = tmp_path / "s.jpg", tmp_path / "b.jpg"
    small.save(ps, quality=90)
    big.save(pb, quality=90)
    assert eval_draft_side(224, 0.875) == 256
    # 120 px < 2 x 64: nothing to skip, same bytes as a full decode (also through decode_to_uint8)
    assert np.array_equal(np.asarray(load_image(ps, "RGB", draft=(64, 64))), np.asarray(load_image(ps, "RGB")))
    assert torch.equal(decode_to_uint8([str(ps)], "RGB", 64, draft=True), decode_to_uint8([str(ps)], "RGB", 64))
    # 300 px >= 4 x 64: decoded at 1/4 scale, both sides still >= 64
    assert load_image(pb, "RGB", draft=(64, 64)).size == (100, 75)
    assert load_image(pb, "L", draft=(64, 64)).mode == "L"
    ds = FileImageDataset([str(pb)], [0], ["a"], draft=70)
    assert min(ds[0][0].size) >= 70 and ds[0][0].size[0] < 400
    ds.draft = None
    assert ds[0][0].size == (400, 300)


def test_synthesis_under_bf16_autocast():
    """recover.precision=bf16-mixed: the loop runs under autocast, Eq. 6 stays fp32, losses near the fp32 ones."""
    from lpld.core.recover_loss import LossWeights
    from lpld.core.synthesis import SynthesisConfig, plan_units, synthesize
    from lpld.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "convnet", "width": 8, "depth": 2}, num_classes=3, in_chans=3, img_size=8).eval()
    mean = [torch.zeros(3, 8), torch.zeros(3, 8)]
    var = [torch.ones(3, 8), torch.ones(3, 8)]
    cfg = SynthesisConfig(
        iterations=3, lr=0.05, ipc=2, channels=3, image_size=8, weights=LossWeights(alpha=0.1),
        pixel_min=(-2.0,) * 3, pixel_max=(2.0,) * 3,
    )  # fmt: skip
    first = {}
    for name, ctx in (("fp32", torch.autocast("cpu", enabled=False)), ("bf16", torch.autocast("cpu", torch.bfloat16))):
        seen = []
        with ctx:
            res = synthesize(
                model,
                plan_units([0, 2], 2, "class", True),
                cfg,
                mean,
                var,
                on_step=lambda t, s, seen=seen: seen.append(s),
            )
        assert all(s.total.dtype == torch.float32 and s.bn.dtype == torch.float32 for s in seen)
        assert all(r.images.dtype == torch.float32 and torch.isfinite(r.images).all() for r in res)
        first[name] = seen[0]
    # bf16 activations (8-bit mantissa): the same objective to about 1%
    torch.testing.assert_close(first["bf16"].total, first["fp32"].total, rtol=3e-2, atol=1e-2)


def test_ca_search_losses_on_device_without_sync():
    """Calibrated Alignment's grid evaluation stays on the device (one argmin copy per epoch is outside)."""
    from lpld.core.temperature import ca_grid, ca_losses

    z, p = torch.zeros(4, 5, device=META), torch.zeros(4, 5, device=META)
    with DeviceGuard():
        losses = ca_losses(z, p, ca_grid(0.01, 1.0, 7))
    assert losses.shape == (7,) and losses.device == META


def test_recover_real_image_loading_in_workers_keeps_order():
    """RDED / random-real selection decode through DataLoader workers: same tensors, same order as ds[i]."""
    from types import SimpleNamespace

    from lpld.data.datasets import TensorImageDataset
    from lpld.lit.recover_module import RecoverModule

    g = torch.Generator().manual_seed(0)
    ds = TensorImageDataset(
        torch.randint(0, 256, (200, 3, 4, 4), dtype=torch.uint8, generator=g),
        [i % 5 for i in range(200)],
        list("abcde"),
    )
    groups = [[3, 1, 4], list(range(100, 170)), [199, 0], list(range(20, 60))]
    for workers, chunk in ((0, 1024), (2, 1024), (2, 80)):
        fake = SimpleNamespace(num_workers=workers, device=torch.device("cpu"))
        got = list(RecoverModule._load_real(fake, ds, groups, chunk_images=chunk))
        assert len(got) == len(groups)
        for g_idx, x in zip(groups, got, strict=True):
            assert torch.equal(x, torch.stack([ds[i][0] for i in g_idx]))
