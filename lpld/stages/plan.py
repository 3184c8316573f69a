"""Stage ``plan``: will this config fit? Memory per rank and label-store size, before launching anything.

``python run.py stage=plan dataset=in1k model=resnet18 ipc=200 trainer=ddp trainer.devices=8`` prints, for the
config and its world size W (``stage.world_size`` overrides the trainer preset's):

* **label store**: bytes on disk and number of files (``lpld.core.storage_accounting.predict_store``, exact
  for the arrays), plus the per-rank progress files that exist while relabel runs;
* **host memory per rank** of relabel and student: the distilled images held once as uint8, the model
  weights, and ``stage.runtime_gib`` for the Python/PyTorch/CUDA runtime (measured ~2-3 GiB per rank; the
  label store is memory-mapped, so its pages are shared page cache, not per-rank memory);
* **GPU memory per rank** of relabel and student: uint8 images + weights (+ gradients and optimizer state for
  the student) + activations. Activations are measured by one forward of the architecture on the ``meta``
  device (no data, no download, no GPU): the sum of every leaf module's output per sample (what autograd
  keeps for backward, the student) or the two largest consecutive outputs (inference, relabel), times the
  rows one rank runs at once and the bytes per element of the trainer's precision;
* squeeze, stats and recover per rank (the teacher's training batch, the statistics pass and its file, the
  largest device batch of images being optimised);
* the SLURM memory request that fits: ``hydra.launcher.mem_gb`` >= tasks per node x host peak per rank.

These are estimates (allocator caching and cuDNN workspaces add ~10-20% on a GPU); the store figures are exact.
Everything is computed from the config alone, so ImageNet-1K IPC 200 or ImageNet-21K IPC 20 can be planned
on a laptop.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lpld.config.frozen import Experiment
from lpld.core.label_store import array_layout, row_offsets
from lpld.core.storage_accounting import GIB, predict_store

log = logging.getLogger("lpld")

# bytes per element of activations / autocast compute by trainer precision
_ACT_BYTES = {"32-true": 4, "32": 4, "16-mixed": 2, "bf16-mixed": 2, "bf16-true": 2, "16-true": 2, "64-true": 8}
# optimizer state in fp32 values per parameter
_OPT_STATE = {"adamw": 2, "adam": 2, "sgd": 1}


def activation_bytes_per_sample(model: nn.Module, in_chans: int, img_size: int) -> tuple[int, int]:
    """(training, inference) activation elements per sample, from one forward on the ``meta`` device.

    training: sum of the outputs of every leaf module (what autograd saves for backward, an upper bound
    since in-place ReLUs share storage); inference: the largest sum of two consecutive leaf outputs (a
    layer's input and output alive at once).
    """
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: sizes.append(int(o.numel())) if torch.is_tensor(o) else None)
        for m in model.modules()
        if not list(m.children())
    ]
    try:
        model = model.to("meta")
        with torch.no_grad():
            model.eval()(torch.empty(1, in_chans, img_size, img_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    train = sum(sizes)
    infer = max((a + b for a, b in zip(sizes, sizes[1:])), default=max(sizes, default=0))
    return train, infer


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model(cfg_model: dict[str, Any], num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    from lpld.models import build_model

    m = dict(cfg_model)
    m["pretrained"], m["checkpoint"] = False, None  # the architecture only: never download weights
    with torch.device("meta"):
        return build_model(m, num_classes=num_classes, in_chans=in_chans, img_size=img_size)


def _relabel_plan(
    exp: Experiment, ds: Any, spec: Any, img_u8: int, act_b: int, runtime: float
) -> tuple[dict[str, Any], float]:
    """Relabel's memory per rank (the uint8 images, the fp32 teacher and one forward's rows), and its host bytes."""
    from lpld.lit.relabel_datamodule import auto_batches_per_forward
    from lpld.stages.common import to_container

    teacher = _model(to_container(exp.model), ds.num_classes, ds.channels, ds.image_size)
    t_params = _params(teacher)
    _, t_inf = activation_bytes_per_sample(teacher, ds.channels, ds.image_size)
    # relabel's stage.batches_per_forward defaults to auto (null); this stage's node has the key only if the
    # schema gives it one
    bpf = exp.stage.get("batches_per_forward") or auto_batches_per_forward(spec.batch_size)
    rows = int(bpf) * spec.batch_size
    # relabel on the GPU: uint8 images, fp32 teacher, one forward's float input (4 B) + activations + logits
    relabel_gpu = (
        img_u8
        + 4 * t_params
        + rows * ds.channels * ds.image_size**2 * 4
        + rows * t_inf * act_b
        + rows * ds.num_classes * 4
    )
    relabel_host = img_u8 + 4 * t_params + runtime
    entry = {
        "rows_per_forward": rows,
        "batches_per_forward": int(bpf),
        "host_bytes_per_rank": int(relabel_host),
        "gpu_bytes_per_rank": int(relabel_gpu),
        "teacher_params": t_params,
    }
    return entry, relabel_host


def _student_plan(
    exp: Experiment, ds: Any, spec: Any, img_u8: int, act_b: int, runtime: float, w: int
) -> tuple[dict[str, Any], float]:
    """The student's memory per rank (images, weights + gradients + optimizer state, the replayed batch), and its
    host bytes."""
    from lpld.config import student_settings
    from lpld.config.student_run import student_model_cfg

    student = _model(student_model_cfg(exp), ds.num_classes, ds.channels, ds.image_size)
    s_params = _params(student)
    s_train, _ = activation_bytes_per_sample(student, ds.channels, ds.image_size)
    st = student_settings(exp, {"epochs": spec.epochs, "granularity": spec.granularity, "batch_size": spec.batch_size})
    opt = st["optimizer"].lower()
    b = spec.batch_size
    per_rank_rows = -(-b // w)
    bn = _student_bn(exp, st, b, w)
    # student: every rank replays the whole stored batch (CutMix pairs rows), trains on b / W rows of it
    student_gpu = (
        img_u8
        + 4 * s_params * (2 + _OPT_STATE.get(opt, 2))  # weights, grads, optimizer state (fp32)
        + b * ds.channels * ds.image_size**2 * 4  # the replayed float batch
        + b * ds.num_classes * 4 * 2  # decoded targets (+ a temporary)
        + per_rank_rows * s_train * act_b
    )
    student_host = img_u8 + 4 * s_params + runtime
    entry = {
        "global_batch": b,
        "rows_per_rank": per_rank_rows,
        "host_bytes_per_rank": int(student_host),
        "gpu_bytes_per_rank": int(student_gpu),
        "student_params": s_params,
        "optimizer": opt,
        **bn,
    }
    return entry, student_host


def _student_bn(exp: Experiment, st: dict[str, Any], batch: int, w: int) -> dict[str, Any]:
    """The rows each student BatchNorm layer normalises over at world size ``w`` (student.bn_rows / sync_bn), refused
    as the student stage would refuse it."""
    from lpld.config.precedence import node_get
    from lpld.config.student import bn_layout

    accel = str(node_get(exp.trainer, "accelerator") or "cpu")
    groups, span = bn_layout(st, batch, int(st["accumulate"]), w, accel)
    if st.get("sync_bn") and w > 1:
        return {"bn_rows": batch // int(st["accumulate"]), "bn_groups_per_rank": 1, "bn": "sync over all ranks"}
    rows = int(st.get("bn_rows") or -(-batch // (int(st["accumulate"]) * w)))
    kind = "per rank" if not st.get("bn_rows") else "ghost" if span == 1 else f"one group over {span} ranks"
    return {"bn_rows": rows, "bn_groups_per_rank": groups, "bn": kind}


def _teacher_plans(exp: Experiment, ds: Any, act_b: int, runtime: float, w: int) -> dict[str, dict[str, Any]]:
    """Squeeze, stats and recover per rank, from the config alone (issue 19: ``stage=plan`` covers every stage).

    squeeze: the teacher's weights, gradients and optimizer state + the training activations of the global batch's
    ``ceil(B / W)`` rows on one rank. stats: the teacher's weights + the inference activations of one rank's rows of
    the stats batch; the statistics file holds mean and variance (float32) of every BN channel per class.
    recover: the largest device batch of images being optimised (fp32 images, gradient, Adam's two moments) + the
    teacher's activations kept for the backward pass to the images (``lpld.stages.recover.device_batch_bytes``).
    """
    from lpld.config import recover_settings, squeeze_settings, stats_settings
    from lpld.stages.common import to_container
    from lpld.stages.recover import planned_device_rows

    teacher = _model(to_container(exp.model), ds.num_classes, ds.channels, ds.image_size)
    t_params = _params(teacher)
    bn_channels = sum(m.num_features for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    t_train, t_inf = activation_bytes_per_sample(teacher, ds.channels, ds.image_size)
    chw = ds.channels * ds.image_size**2
    sq = squeeze_settings(exp)
    sq_rows = -(-int(sq["batch_size"]) // w)
    opt_state = _OPT_STATE.get(str(sq["name"]).lower(), 1)
    squeeze = {
        "global_batch": int(sq["batch_size"]),
        "rows_per_rank": sq_rows,
        "host_bytes_per_rank": int(4 * t_params + runtime),
        "gpu_bytes_per_rank": int(4 * t_params * (2 + opt_state) + sq_rows * (chw * 4 + t_train * act_b)),
    }
    stt = stats_settings(exp)
    st_rows = -(-int(stt["batch_size"]) // w)
    stats = {
        "mode": stt["mode"],
        "rows_per_rank": st_rows,
        "file_bytes": int(ds.num_classes * bn_channels * 2 * 4),  # accumulated in float64, stored as float32
        "host_bytes_per_rank": int(4 * t_params + runtime),
        "gpu_bytes_per_rank": int(4 * t_params + st_rows * (chw * 4 + t_inf * 4)),
    }
    rows, batches = planned_device_rows(exp)
    method = str(recover_settings(exp)["name"])
    optimising = method not in ("random_real", "rded")
    recover = {
        "method": method,
        "device_batches": batches,
        "largest_device_batch_images": rows,
        "image_uint8_bytes": int(ds.num_classes * int(exp.ipc) * chw),
        "host_bytes_per_rank": int(4 * t_params + runtime),
        "gpu_bytes_per_rank": int(4 * t_params + (rows * (chw * 4 * 4 + t_train * 4) if optimising else 0)),
    }
    return {"squeeze": squeeze, "stats": stats, "recover": recover}


def plan(exp: Experiment, world: int | None = None) -> dict[str, Any]:
    """The predictions for ``exp`` at world size ``world`` (None: the trainer preset's); see the module doc."""
    from lpld.artifacts import labels as labels_artifact
    from lpld.dist import planned_world_size
    from lpld.stages.common import dataset_spec

    st = exp.stage
    w = int(world or st.get("world_size") or planned_world_size(exp))
    ds = dataset_spec(exp)
    spec = labels_artifact.store_spec(exp)
    n = spec.num_images
    img_u8 = n * ds.channels * ds.image_size * ds.image_size
    acc = predict_store(spec)
    ids = spec.batch_ids()
    layout = array_layout(spec, len(ids), int(row_offsets(spec, ids)[-1]))
    files = len(layout) + 1  # one .npy per array + manifest.json (+ progress.<rank>.npy while generating)
    prec = str(exp.trainer["precision"])
    act_b = _ACT_BYTES.get(prec, 4)
    runtime = float(st["runtime_gib"]) * GIB
    relabel, relabel_host = _relabel_plan(exp, ds, spec, img_u8, act_b, runtime)
    student, student_host = _student_plan(exp, ds, spec, img_u8, act_b, runtime, w)
    upstream = _teacher_plans(exp, ds, act_b, runtime, w)
    tasks = int(st.get("tasks_per_node") or min(w, 8))
    return {
        **upstream,
        "world_size": w,
        "precision": prec,
        "num_images": n,
        "image_uint8_bytes": img_u8,
        "label_store": {
            "bytes": int(acc["on_disk_arrays"]),
            "total_accounting": int(acc["total"]),
            "files": files,
            "files_while_generating": files + w,
            "batches": int(acc["num_batches"]),
        },
        "relabel": relabel,
        "student": student,
        "slurm_mem_gb": int(-(-max(relabel_host, student_host) * tasks // GIB)) + 1,  # the teacher stages hold less
        "tasks_per_node": tasks,
    }


def _gib(x: float) -> str:
    return f"{x / GIB:10.2f} GiB"


def run(exp: Experiment) -> dict[str, Any]:
    p = plan(exp)
    ls, rl, sd = p["label_store"], p["relabel"], p["student"]
    sq, stt, rc = p["squeeze"], p["stats"], p["recover"]
    lines = [
        f"plan: {exp.dataset.name} ipc {exp.ipc} prune={exp.prune.name} quant={exp.quant.get('name', 'none')} "
        f"world size {p['world_size']} ({p['precision']})",
        f"  squeeze  host per rank           {_gib(sq['host_bytes_per_rank'])}",
        f"  squeeze  GPU per rank            {_gib(sq['gpu_bytes_per_rank'])}  "
        f"(global batch {sq['global_batch']}, {sq['rows_per_rank']} rows per rank)",
        f"  stats    GPU per rank            {_gib(stt['gpu_bytes_per_rank'])}  "
        f"({stt['mode']}, {stt['rows_per_rank']} rows per rank); statistics file {_gib(stt['file_bytes'])}",
        f"  recover  GPU per rank            {_gib(rc['gpu_bytes_per_rank'])}  "
        f"(recover={rc['method']}: {rc['device_batches']} device batches, the largest "
        f"{rc['largest_device_batch_images']:,d} images)",
        f"  distilled images (uint8)         {_gib(p['image_uint8_bytes'])}  ({p['num_images']:,d} images)",
        f"  label store                      {_gib(ls['bytes'])}  in {ls['files']} files "
        f"(+{p['world_size']} progress files while relabel runs), {ls['batches']:,d} stored batches",
        f"  relabel  host per rank           {_gib(rl['host_bytes_per_rank'])}",
        f"  relabel  GPU per rank            {_gib(rl['gpu_bytes_per_rank'])}  "
        f"({rl['batches_per_forward']} stored batches = {rl['rows_per_forward']} rows per forward)",
        f"  student  host per rank           {_gib(sd['host_bytes_per_rank'])}",
        f"  student  GPU per rank            {_gib(sd['gpu_bytes_per_rank'])}  "
        f"(global batch {sd['global_batch']}, {sd['rows_per_rank']} rows per rank, {sd['optimizer']}; BatchNorm over "
        f"{sd['bn_rows']} rows, {sd['bn']}, {sd['bn_groups_per_rank']} group(s) per rank)",
        f"  SLURM: hydra.launcher.mem_gb={p['slurm_mem_gb']} for {p['tasks_per_node']} tasks per node",
    ]
    print("\n".join(lines))
    return p
