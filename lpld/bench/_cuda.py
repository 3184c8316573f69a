"""GPU benchmark (``python -m lpld.bench --device cuda``) at ImageNet shape: ResNet-18, 224 px, 1000 classes.

Every ratio is measured in the same run, against a baseline on the same device, model and data; all
class-wise statistics targets are synthetic (no dataset needed). Times are wall-clock with
``torch.cuda.synchronize()`` before each reading; the first iteration(s) of each loop are warm-up and
not timed. Peak memory is ``torch.cuda.max_memory_allocated`` of each section (GiB).

* ``recover_img_per_s_ipc10`` / ``_ipc50``: LPLD recover (``lpld.core.synthesis.synthesize``, class-wise
  batching + class-wise targets, the teacher in the GPU preset's channels_last), device batches filled up to
  ``max_batch_images`` (256, the recover default): images optimised per second (each image counted once per
  iteration).
* ``recover_speedup_vs_per_class`` (IPC 10; ``_ipc50``): the same work done the official way, measured
  here: one class per batch, sequentially, with a faithful re-implementation of the official loop (one
  RandomResizedCrop + flip per batch, BN forward hooks that compute mean/var over the batch and the
  norm to the class's targets, CE + alpha * BN loss, Adam, clip). Target >= 3.
* ``stats_over_forward``: the stats stage as the GPU presets run it (``trainer=gpu``: channels_last, cuDNN
  benchmark, TF32; ``dataset=in1k``'s ``official`` mode, RandomResizedCrop + flip, batch 256): ``trainer.test``
  of ``lpld.lit.stats_module.StatsModule`` built by the stage's own ``stats_job`` over JPEG files written to a
  temporary folder, data loading included / the same ``trainer.test`` whose step is only the teacher forward
  (same loader, workers and Trainer). Target <= 1.2. ``stats_img_per_s``: images per second of that pass.
  ``stats_exact_over_forward``: ``ClasswiseBNStats.update`` (exact mode) / plain eval forward on tensors already
  on the device (no loading). ``stats_official_over_forward``: a faithful re-implementation of the official
  per-class Python loop (per BN layer, per class present in the batch: mean/var of that class's rows, EMA update
  with momentum 0.1) on the same tensors; ``stats_official_over_lpld`` its time over lpld's exact update.
* ``relabel_img_per_s`` / ``relabel_over_forward``: the relabel stage's path, ``trainer.predict`` of
  ``lpld.lit.relabel_module.RelabelModule`` with ``RelabelDataModule`` (uint8 images held on the device, the
  stored augmentation replayed per batch from them, the teacher once per group of batches, quantization on the
  device, memory-mapped writes, commits; ``finalize`` hashing the store) under the GPU preset's perf options /
  a plain eval forward of the same number of batches (channels_last as the preset). Batch 128, quant none,
  explicit records, fp32 (the relabel default). Target <= 1.2.
* ``student_over_fwdbwd``: one student epoch through Lightning (``StudentModule`` + ``StudentData`` on a
  real store: replay of the stored augmentation incl. CutMix on the device, label decoding, KL, backward,
  AdamW step) at bf16-mixed with the GPU preset's perf options (channels_last) / a plain bf16 forward +
  backward of the same model (channels_last as the preset) on the same number of already-augmented batches.
  Batch 128. Target <= 1.2.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lpld.core import augment
from lpld.core.bn_hooks import bn_layers

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TARGETS = {
    "recover_speedup_vs_per_class": (">=", 3.0),
    "stats_over_forward": ("<=", 1.2),
    "relabel_over_forward": ("<=", 1.2),
    "student_over_fwdbwd": ("<=", 1.2),
}


@torch.no_grad()
def _resnet18(num_classes: int, img: int, device: torch.device) -> nn.Module:
    """ResNet-18 (torchvision) with non-trivial running statistics, eval mode, frozen."""
    from lpld.models import build_model

    m = build_model({"name": "resnet18"}, num_classes=num_classes, in_chans=3, img_size=img).to(device)
    m.train()
    for _ in range(2):
        m(torch.randn(32, 3, img, img, device=device))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def preset_exp(device: torch.device, *overrides: str) -> Any:
    """The frozen experiment of the preset the stage would run on ``device`` (``trainer=gpu`` on CUDA, else
    ``trainer=cpu`` with no workers): the bench builds its Trainer and jobs from it as the stages do."""
    from lpld.config.compose import compose
    from lpld.config.experiment import freeze

    dev = ["trainer=gpu"] if device.type == "cuda" else ["trainer=cpu", "trainer.num_workers=0"]
    ov = ["logger=none", *dev, *overrides]
    return freeze(compose(ov), ov)


def _perf(exp: Any) -> Any:
    from lpld.lit.perf import PerfOptions

    return PerfOptions.from_cfg(exp.trainer.get("perf"))


def _channels_last(model: nn.Module, exp: Any, device: torch.device) -> nn.Module:
    """The preset's memory format on a CUDA device (GpuPerf does the same to the stage's networks)."""
    if device.type == "cuda" and _perf(exp).channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _write_jpeg_folder(root: Path, n: int, num_classes: int, side: int) -> None:
    """``n`` smooth random JPEGs (``side`` px) in ``root/train/<class>/`` (image i in class i % C) and one per
    class in ``root/val/<class>/``: an ImageNet-layout folder for the stats pass's loader."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(num_classes):
        (root / "train" / f"c{c:05d}").mkdir(parents=True, exist_ok=True)
        (root / "val" / f"c{c:05d}").mkdir(parents=True, exist_ok=True)
    for i in range(max(n, num_classes)):
        low = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)[None].float()
        img = F.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)[0]
        arr = img.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        split, c = ("train", i % num_classes) if i < n else ("val", i % num_classes)
        Image.fromarray(arr).save(root / split / f"c{c:05d}" / f"{i:06d}.jpg")
        if i < num_classes and i < n:  # val: one image per class
            Image.fromarray(arr).save(root / "val" / f"c{c:05d}" / f"{i:06d}.jpg")


def _synthetic_targets(model: nn.Module, num_classes: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    layers = bn_layers(model)
    mean = [m.running_mean.cpu() + 0.1 * torch.randn(num_classes, m.num_features, generator=g) for _, m in layers]
    var = [m.running_var.cpu() * (0.5 + torch.rand(num_classes, m.num_features, generator=g)) for _, m in layers]
    return mean, var


# ----------------------------------------------------------------------------------------------- recover
def _recover_lpld(model, mean, var, ipc, classes, iters, img, device) -> float:
    """Seconds per iteration of lpld's batched recover (median over iterations after the first)."""
    from lpld.core.recover_loss import LossWeights
    from lpld.core.synthesis import SynthesisConfig, plan_units, synthesize

    cfg = SynthesisConfig(
        iterations=iters,
        lr=0.25,
        ipc=ipc,
        channels=3,
        image_size=img,
        weights=LossWeights(alpha=0.01, first_bn_multiplier=10.0),
        pixel_min=tuple(-m / s for m, s in zip(MEAN, STD)),
        pixel_max=tuple((1 - m) / s for m, s in zip(MEAN, STD)),
        roll=0,
    )
    stamps: list[float] = []

    def on_step(t, losses):
        _sync(device)
        stamps.append(time.perf_counter())

    synthesize(model, plan_units(classes, ipc, "class", True), cfg, mean, var, device=device, on_step=on_step)
    return statistics.median(b - a for a, b in zip(stamps[:-1], stamps[1:]))


class _OfficialBNHook:
    """The official loss hook: batch mean/var of the BN input, L2 norms to the (class's) targets."""

    def __init__(self, module: nn.Module):
        self.handle = module.register_forward_hook(self.hook)
        self.target_mean: torch.Tensor | None = None
        self.target_var: torch.Tensor | None = None
        self.r_feature: torch.Tensor | None = None

    def hook(self, module, inputs, output):
        x = inputs[0]
        nch = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(self.target_mean - mean, 2) + torch.norm(self.target_var - var, 2)


def _recover_per_class(model, mean, var, ipc, classes, iters, img, device) -> float:
    """Seconds per class-iteration of the official loop: one class per batch, classes one after another."""
    from torchvision.transforms import v2

    hooks = [_OfficialBNHook(m) for _, m in bn_layers(model)]
    crop = v2.Compose([v2.RandomResizedCrop(img, scale=(0.08, 1.0), antialias=False), v2.RandomHorizontalFlip()])
    lo = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=device).view(1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)], device=device).view(1, 3, 1, 1)
    times: list[float] = []
    try:
        for c in classes:
            for h, m, v in zip(hooks, mean, var):
                h.target_mean, h.target_var = m[c].to(device), v[c].to(device)
            x = torch.randn(ipc, 3, img, img, device=device, requires_grad=True)
            y = torch.full((ipc,), c, device=device, dtype=torch.long)
            opt = torch.optim.Adam([x], lr=0.25, betas=(0.5, 0.9), eps=1e-8)
            for it in range(iters):
                _sync(device)
                t0 = time.perf_counter()
                for g in opt.param_groups:
                    g["lr"] = 0.5 * (1 + math.cos(math.pi * it / iters)) * 0.25
                out = model(crop(x))
                loss_bn = sum(
                    (10.0 if i == 0 else 1.0) * h.r_feature for i, h in enumerate(hooks) if h.r_feature is not None
                )
                loss = F.cross_entropy(out, y) + 0.01 * loss_bn
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.maximum(torch.minimum(x, hi), lo))
                _sync(device)
                if it > 0:
                    times.append(time.perf_counter() - t0)
    finally:
        for h in hooks:
            h.handle.remove()
    return statistics.median(times)


def bench_recover(device: torch.device, img: int, num_classes: int, iters: int, ipcs=(10, 50)) -> dict[str, float]:
    import copy

    model = _resnet18(num_classes, img, device)
    mean, var = _synthetic_targets(model, num_classes)
    # lpld's loop with the recover stage's teacher layout (GpuPerf: the preset's channels_last); the official
    # reference keeps the official scripts' NCHW
    lpld_model = _channels_last(copy.deepcopy(model), preset_exp(device, "stage=recover"), device)
    out: dict[str, float] = {}
    for ipc in ipcs:
        per_batch = min(num_classes, max(1, 256 // ipc))  # recover's max_batch_images default
        _peak_reset(device)
        t = _recover_lpld(lpld_model, mean, var, ipc, list(range(per_batch)), iters, img, device)
        out[f"recover_peak_mem_gib_ipc{ipc}"] = _peak_gib(device)
        t1 = _recover_per_class(model, mean, var, ipc, [0, 1], iters, img, device)
        lpld_rate = per_batch * ipc / t
        out[f"recover_img_per_s_ipc{ipc}"] = lpld_rate
        out[f"recover_per_class_img_per_s_ipc{ipc}"] = ipc / t1
        out[f"recover_speedup_vs_per_class_ipc{ipc}"] = lpld_rate / (ipc / t1)
    if f"recover_speedup_vs_per_class_ipc{ipcs[0]}" in out:
        out["recover_speedup_vs_per_class"] = out[f"recover_speedup_vs_per_class_ipc{ipcs[0]}"]
    return out


# ----------------------------------------------------------------------------------------------- stats
class _OfficialClassStats:
    """Faithful re-implementation of the official per-class loop: per BN layer and batch, a Python loop
    over the classes present, mean/var of that class's rows, EMA update (momentum 0.1)."""

    def __init__(self, model: nn.Module, num_classes: int, device: torch.device, momentum: float = 0.1):
        self.layers = bn_layers(model)
        self.mean = [torch.zeros(num_classes, m.num_features, device=device) for _, m in self.layers]
        self.var = [torch.ones(num_classes, m.num_features, device=device) for _, m in self.layers]
        self.momentum, self.labels = momentum, None
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            x = inputs[0]
            for c in self.labels.unique().tolist():  # the official loop: one Python iteration per class
                xc = x[self.labels == c]
                mu = xc.mean([0, 2, 3])
                var = xc.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(1, unbiased=False)
                self.mean[i][c] = (1 - self.momentum) * self.mean[i][c] + self.momentum * mu
                self.var[i][c] = (1 - self.momentum) * self.var[i][c] + self.momentum * var

        return hook

    def update(self, model, x, y):
        self.labels = y
        with torch.no_grad():
            model(x)

    def close(self):
        for h in self.handles:
            h.remove()


def bench_stats(device: torch.device, img: int, num_classes: int, n_batches: int, batch: int = 256) -> dict[str, Any]:
    from lpld.core.bnstats import ClasswiseBNStats

    model = _resnet18(num_classes, img, device)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, img, img, generator=g).to(device) for _ in range(n_batches)]
    ys = [torch.randint(0, num_classes, (batch,), generator=g).to(device) for _ in range(n_batches)]

    def timed(fn: Callable[[torch.Tensor, torch.Tensor], None]) -> float:
        fn(xs[0], ys[0])  # warm-up (cuDNN algorithm search, allocator)
        _sync(device)
        t0 = time.perf_counter()
        for x, y in zip(xs, ys):
            fn(x, y)
        _sync(device)
        return time.perf_counter() - t0

    def fwd(x, y):
        with torch.no_grad():
            model(x)

    acc = ClasswiseBNStats(model, num_classes)
    _peak_reset(device)
    best_f, best_s = float("inf"), float("inf")
    for _ in range(2):
        best_f = min(best_f, timed(fwd))
        best_s = min(best_s, timed(acc.update))
    peak = _peak_gib(device)
    off = _OfficialClassStats(model, num_classes, device)
    try:
        t_off = timed(lambda x, y: off.update(model, x, y))
    finally:
        off.close()
    return {
        "stats_exact_over_forward": best_s / best_f,
        "stats_official_over_forward": t_off / best_f,
        "stats_official_over_lpld": t_off / best_s,
        "stats_peak_mem_gib": peak,
    }


def bench_stats_stage(device: torch.device, img: int, num_classes: int, n_batches: int, batch: int = 256) -> dict:
    """The stats stage's pass (the preset's mode, loader and Trainer) over its forward-only twin; see the module
    docstring (``stats_over_forward``)."""
    from lpld.lit.stats_module import StatsModule
    from lpld.stages.common import build_trainer
    from lpld.stages.stats import stats_job

    class ForwardOnly(StatsModule):
        """The same loader and Trainer; the step is the teacher forward alone (nothing accumulated)."""

        def test_step(self, batch, batch_idx):
            self.teacher(batch[0])

        def on_test_epoch_end(self) -> None:
            self.result = None

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = n_batches * batch
        _write_jpeg_folder(root / "data", n, num_classes, img * 8 // 7)
        exp = preset_exp(
            device, "stage=stats", "dataset=in1k", "model=resnet18", f"dataset.root={root / 'data'}",
            f"dataset.num_classes={num_classes}", f"dataset.image_size={img}", f"stage.batch_size={batch}",
            f"paths.artifacts={root / 'artifacts'}",
        )  # fmt: skip
        job = stats_job(exp, root / "stats.pt")
        teacher = _channels_last(_resnet18(num_classes, img, device), exp, device)
        times: dict[str, float] = {"stats": float("inf"), "forward": float("inf")}
        for _ in range(2):  # the best of two of each: the first also pays cuDNN's search and the page cache
            for name, kind in (("forward", ForwardOnly), ("stats", StatsModule)):
                module = kind(teacher, "bench", job)
                trainer = build_trainer(
                    exp, logger=None, use_distributed_sampler=False, inference_mode=True, enable_progress_bar=False
                )
                _sync(device)
                t0 = time.perf_counter()
                trainer.test(module, verbose=False)
                _sync(device)
                times[name] = min(times[name], time.perf_counter() - t0)
        assert module.result is not None and int(module.result["global_batch"]) == batch  # the stats pass ran
    return {
        "stats_over_forward": times["stats"] / times["forward"],
        "stats_img_per_s": n / times["stats"],
        "stats_mode_official": float(job.mode == "official"),  # 1.0: the preset's official EMA was timed
    }


# ----------------------------------------------------------------------------------------------- relabel
def relabel_stage(path: Path, teacher: nn.Module, u8: torch.Tensor, mean, std, exp: Any) -> None:
    """The relabel stage's loop on a prepared store (``lpld.stages.relabel.run``): ``trainer.predict`` of
    ``RelabelModule`` (uint8 images held once, replayed per stored batch) over ``RelabelDataModule``, with the
    preset's Trainer (perf options, workers) at fp32; the caller finalizes."""
    from lpld.lit.relabel_datamodule import RelabelDataModule
    from lpld.lit.relabel_module import RelabelModule
    from lpld.stages.common import build_trainer

    module = RelabelModule(teacher, path, u8, mean, std)
    trainer = build_trainer(
        exp, logger=None, use_distributed_sampler=False, inference_mode=True, precision="32-true",
        enable_progress_bar=False,
    )  # fmt: skip
    dm = RelabelDataModule(path, None, int(exp.trainer["num_workers"]))
    trainer.predict(module, datamodule=dm, return_predictions=False)


def bench_relabel(device: torch.device, img: int, num_classes: int, n_batches: int, batch: int = 128) -> dict:
    """The relabel stage's predict loop over plain forwards; see the module docstring (``relabel_over_forward``)."""
    from lpld.core.augment import AugConfig
    from lpld.core.label_store import StoreSpec, finalize, prepare
    from lpld.core.quant import QuantConfig

    exp = preset_exp(device, "stage=relabel")
    teacher = _channels_last(_resnet18(num_classes, img, device), exp, device)
    n = n_batches * batch
    u8 = torch.randint(0, 256, (n, 3, img, img), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = augment.to_model_input(u8.to(device), MEAN, STD)
    spec = StoreSpec(
        n, num_classes, (img, img), batch, 1, "1x", 0.0, "batch", QuantConfig("none"), AugConfig(img), "explicit", 0
    )
    idxs = [augment.batch_indices(0, 0, i, n, batch).to(device) for i in range(n_batches)]
    meta = {"images_fingerprint": "bench", "teacher_fingerprint": "bench"}
    best_f = best_r = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        _peak_reset(device)
        for rep in range(3):  # rep 0 warms up both
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                for idx in idxs:
                    teacher(x.index_select(0, idx))
            _sync(device)
            tf = time.perf_counter() - t0
            path = Path(tmp) / f"s{rep}"
            t0 = time.perf_counter()
            prepare(path, spec, meta)
            relabel_stage(path, teacher, u8, MEAN, STD, exp)
            finalize(path)
            _sync(device)
            tr = time.perf_counter() - t0
            if rep > 0:
                best_f, best_r = min(best_f, tf), min(best_r, tr)
    return {
        "relabel_over_forward": best_r / best_f,
        "relabel_img_per_s": n / best_r,
        "relabel_peak_mem_gib": _peak_gib(device),
    }


# ----------------------------------------------------------------------------------------------- student
def bench_student(device: torch.device, img: int, num_classes: int, n_batches: int, epochs: int, batch: int = 128):
    """One student epoch through Lightning over a plain forward + backward of the same batches (ResNet-18)."""
    from lpld.bench.student import EpochTimer, bench_module, bench_store, bench_trainer
    from lpld.lit.perf import GpuPerf
    from lpld.lit.student_module import StudentData
    from lpld.models import build_model

    torch.manual_seed(0)
    n = n_batches * batch
    u8 = torch.randint(0, 256, (n, 3, img, img), dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    with tempfile.TemporaryDirectory() as tmp:
        small = build_model(
            {"name": "convnet", "width": 8, "depth": 3}, num_classes=num_classes, in_chans=3, img_size=img
        )
        store = bench_store(Path(tmp) / "store", u8, num_classes, batch, epochs, small.to(device).eval(), device=device)
        module = bench_module(
            {"name": "resnet18"}, num_classes, img, {"t0": 20.0, "schedule": "none"}, epochs, n_batches
        )
        module.set_images(u8, labels)
        data = StudentData(store, torch.arange(len(store)).numpy(), n_batches, "batch", seed=0)
        exp = preset_exp(device, "stage=student")
        plain = _plain_student_epoch(device, u8, store, n_batches, img, num_classes, exp)
        timer = EpochTimer(plain, time.perf_counter)
        timer.sync = lambda: _sync(device)
        _peak_reset(device)
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
        perf = [GpuPerf(_perf(exp))]  # the preset's channels_last etc. (acts on CUDA only, as in the stage)
        bench_trainer(epochs, timer, accelerator, precision, callbacks=perf).fit(module, datamodule=data)
        ratios = timer.ratios()
    return {
        "student_over_fwdbwd": float(statistics.median(ratios)),
        "student_img_per_s": n / statistics.median(timer.times[1:]),
        "student_peak_mem_gib": _peak_gib(device),
    }


def _plain_student_epoch(
    device: torch.device, u8: torch.Tensor, store: Any, n_batches: int, img: int, num_classes: int, exp: Any
) -> Callable[[], float]:
    """The reference: forward + backward (bf16 autocast on a GPU) of a ResNet-18 over the stored batches,
    already augmented and held on the device; returns a function timing one such epoch."""
    from lpld.models import build_model

    model = build_model({"name": "resnet18"}, num_classes=num_classes, in_chans=3, img_size=img).to(device).train()
    _channels_last(model, exp, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    x_all = augment.to_model_input(u8.to(device), MEAN, STD)
    stored = [store.read(i) for i in range(n_batches)]
    xs = [augment.replay(x_all, augment_to(sb, device), img) for sb in stored]
    ps = [torch.softmax(sb.logits.float().to(device) / 20.0, 1) for sb in stored]

    def plain_epoch() -> float:
        _sync(device)
        t0 = time.perf_counter()
        for x, p in zip(xs, ps):
            model.zero_grad(set_to_none=True)
            with amp:
                z = model(x)
            F.kl_div(F.log_softmax(z.float() / 20.0, 1), p, reduction="batchmean").backward()
        _sync(device)
        return time.perf_counter() - t0

    return plain_epoch


def augment_to(sb: Any, device: torch.device) -> Any:
    """A StoredBatch with its index and record on ``device`` (box on the host)."""
    import dataclasses

    return dataclasses.replace(sb, index=sb.index.to(device), aug=augment.record_to(sb.aug, device))


# ----------------------------------------------------------------------------------------------- suite
def run(device: str = "cuda", quick: bool = False, tiny: bool = False) -> dict[str, float]:
    """The whole GPU suite. ``tiny`` (tests only): 32 px, 10 classes, few iterations, any device."""
    dev = torch.device(device)
    if dev.type == "cuda":
        # the GPU presets' options (conf/trainer/gpu.yaml: cudnn_benchmark, tf32)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    img, c = (32, 10) if tiny else (224, 1000)
    it = 3 if tiny else (6 if quick else 12)
    out: dict[str, float] = {}
    nb = {"stats": 6, "relabel": 10, "student": 8} if not quick else {"stats": 3, "relabel": 4, "student": 4}
    if tiny:
        nb = {"stats": 2, "relabel": 2, "student": 2}
    b = {"stats": 16, "relabel": 8, "student": 8} if tiny else {"stats": 256, "relabel": 128, "student": 128}
    for name, fn in (
        ("recover", lambda: bench_recover(dev, img, c, it)),
        (
            "stats",
            lambda: {
                **bench_stats(dev, img, c, nb["stats"], b["stats"]),
                **bench_stats_stage(dev, img, c, nb["stats"], b["stats"]),
            },
        ),
        ("relabel", lambda: bench_relabel(dev, img, c, nb["relabel"], b["relabel"])),
        ("student", lambda: bench_student(dev, img, c, nb["student"], 3 if tiny else 4, b["student"])),
    ):
        t0 = time.perf_counter()
        out.update(fn())
        print(f"[bench-cuda] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out
