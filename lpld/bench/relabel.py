"""Relabel / label-store benchmarks (ratios measured in the same run).

* ``relabel_over_forward``: prepare + the relabel stage's predict loop (``RelabelModule`` on the uint8 images:
  augmentation replay per stored batch, teacher forward, quantization, memory-mapped writes, commits; the
  ``trainer=cpu`` preset's Trainer, ``lpld.bench._cuda.relabel_stage``) + finalize (checksums) of a label store,
  divided by a plain eval forward of the same teacher on the same (un-augmented) batches. CIFAR ResNet-18 at
  32 px, C = 1000, batch 128, quant none, explicit records.
* ``disk_over_accounting``: every file of that store (manifest included) / the accounting total.
* ``store_read_over_memory``: reading every stored batch (``store.read``: labels, indices, records)
  / slicing the same logit rows from an in-memory tensor.
* ``mr10_over_labels``: quant=mr, k=10, C=1000, batch 128, seed-mode records: bytes on disk /
  bytes of the top-k values and indices alone.
* ``official_pickles_over_labels`` (reference): the same labels written the official way, one
  ``torch.save`` list per batch (fp16 crop coordinates, flips, uint8 partner index, lambda, uint8
  box, fp16 top-k values, int16 indices), file bytes / top-k bytes, on a sample of the batches.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lpld.bench._cuda import preset_exp, relabel_stage
from lpld.core import augment
from lpld.core.augment import AugConfig
from lpld.core.label_store import LabelStore, StoreSpec, disk_bytes, finalize, prepare
from lpld.core.quant import QuantConfig
from lpld.core.relabel import generate

META = {"images_fingerprint": "bench", "teacher_fingerprint": "bench"}


def _teacher(num_classes: int) -> nn.Module:
    from lpld.models import build_model

    return build_model({"name": "resnet18_cifar"}, num_classes=num_classes, in_chans=3, img_size=32).eval()


def _spec(n: int, c: int, hw: int, epochs: int, quant: QuantConfig, record: str) -> StoreSpec:
    return StoreSpec(n, c, (hw, hw), 128, epochs, "1x", 0.0, "batch", quant, AugConfig(hw), record, 0)


def _relabel_vs_forward(tmp: Path, n_batches: int) -> dict[str, float]:
    torch.manual_seed(0)
    c, b = 1000, 128
    n = n_batches * b
    teacher = _teacher(c)
    u8 = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    x = augment.to_model_input(u8, (0.5,) * 3, (0.25,) * 3)
    spec = _spec(n, c, 32, 1, QuantConfig("none"), "explicit")
    exp = preset_exp(torch.device("cpu"), "stage=relabel")
    batches = [augment.batch_indices(0, 0, i, n, b) for i in range(n_batches)]
    with torch.no_grad():
        teacher(x[batches[0]])  # warm-up
    best_f = best_r = float("inf")
    path = tmp / "none"
    for rep in range(2):  # interleave to share machine-load drift; keep the best of each
        t0 = time.perf_counter()
        with torch.no_grad():
            for idx in batches:
                teacher(x.index_select(0, idx))
        best_f = min(best_f, time.perf_counter() - t0)
        path = tmp / f"none{rep}"
        t0 = time.perf_counter()
        prepare(path, spec, META)
        relabel_stage(path, teacher, u8, (0.5,) * 3, (0.25,) * 3, exp)
        finalize(path)
        best_r = min(best_r, time.perf_counter() - t0)
    store = LabelStore.open(path)
    acc = store.manifest["accounting"]
    # read speed: every batch from the store vs slicing rows from an in-memory logits tensor
    mem = torch.from_numpy(np.array(store.arrays["logits"]))
    offs = np.asarray(store.arrays["row_offsets"])
    reps = 50
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 256 KB copy should not wait on a pool thread of a shared machine
    t0 = time.perf_counter()
    for _ in range(reps):
        for i in range(len(store)):
            store.read(i)
    t_store = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        for i in range(len(store)):
            mem[int(offs[i]) : int(offs[i + 1])].clone()
    t_mem = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return {
        "relabel_over_forward": best_r / best_f,
        "disk_over_accounting": disk_bytes(path) / acc["total"],
        "store_read_over_memory": t_store / max(t_mem, 1e-9),
    }


def _official_pickle_bytes(store: LabelStore, sample: int) -> tuple[int, int]:
    """(pickle bytes, top-k bytes) over ``sample`` batches written one torch.save list per batch."""
    tot_pk = tot_lab = 0
    for i in np.linspace(0, len(store) - 1, sample).astype(int):
        bt = store.read(int(i))
        a = bt.aug
        rec = [
            (a.crops.float() / 32).half(),
            a.flips.clone(),
            a.mix_index.to(torch.uint8),
            float(a.lam),
            [torch.tensor(v, dtype=torch.uint8) for v in a.box.tolist()],
            bt.topk_values.clone(),
            bt.topk_indices.to(torch.int16),
        ]
        buf = io.BytesIO()
        torch.save(rec, buf)
        tot_pk += len(buf.getvalue())
        tot_lab += bt.topk_values.numel() * 2 + bt.topk_indices.numel() * 2
    return tot_pk, tot_lab


def _mr10(tmp: Path, epochs: int) -> dict[str, float]:
    torch.manual_seed(0)
    c, n, hw = 1000, 1000, 8
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * hw * hw, c)).eval()
    x = augment.to_model_input(torch.randint(0, 256, (n, 3, hw, hw), dtype=torch.uint8), (0.5,) * 3, (0.25,) * 3)
    spec = _spec(n, c, hw, epochs, QuantConfig("mr", 10), "seed")
    path = tmp / "mr10"
    prepare(path, spec, META)
    generate(path, teacher, x, chunk=256)
    finalize(path)
    store = LabelStore.open(path)
    comp = store.manifest["accounting"]["components"]
    labels = comp["topk_values"] + comp["topk_indices"]
    pk, lab = _official_pickle_bytes(store, 40)
    return {"mr10_over_labels": disk_bytes(path) / labels, "official_pickles_over_labels": pk / lab}


def run(quick: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="lpld-bench-relabel-") as d:
        tmp = Path(d)
        out = _relabel_vs_forward(tmp, 2 if quick else 3)
        out.update(_mr10(tmp, 60 if quick else 100))
    return out


if __name__ == "__main__":
    for k, v in run(quick=True).items():
        print(f"{k:32s} {v:.4f}")
