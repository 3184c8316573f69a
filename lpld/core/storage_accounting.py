"""Predicted storage of images and labels for any dataset / ipc / prune / quant config.

Two conventions:

* ``store``: the bytes this project's label store takes (``label_store.array_layout``: uint16
  crop coordinates, uint8 flips and CutMix partners, fp32 lambda, uint16 box, fp16 logits or
  top-k values, uint16/uint32 indices, npy headers). Exact for the arrays (tests compare with
  bytes on disk).
* ``paper``: the accounting behind LPLD Table 24 (official FKD-style pickles): per image and
  epoch, crop coordinates as 4 x float32 (16 B), flip status as 1 B bool, CutMix partner index as
  int64 (8 B) and fp16 logits (2C B); per batch, lambda as float64 (8 B) and the CutMix box as
  4 x int64 (32 B); sizes in GiB (2^30 bytes; the paper writes "GB"). This gives 5.66 GiB for
  ImageNet-1K IPC10 x 300 epochs (Table 24: 5.67), i.e. ~2025 B per image-epoch, 2000 of
  which are the logits; the pickle container overhead (~1 KB per batch file) is not modelled.

Image bytes: uint8 pixels (N x C x H x W) unless ``image_bytes_per_image`` is given (e.g. the
~16,000 B per JPEG that Table 24's image column implies for ImageNet-1K: 0.15 GiB for 10,000 images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lpld.core.label_store import StoreSpec, accounting, array_layout, row_offsets
from lpld.core.pruning import batches_per_epoch, num_kept

GIB = float(1 << 30)


@dataclass(frozen=True)
class PaperConvention:
    """Byte sizes of the official per-batch records (Table 21 components + logits)."""

    crop_bytes: int = 16  # 4 x float32 relative coordinates per image
    flip_bytes: int = 1  # bool per image
    mix_index_bytes: int = 8  # int64 partner index per image
    lambda_bytes: int = 8  # float64 per batch
    box_bytes: int = 32  # 4 x int64 per batch
    logit_bytes: int = 2  # fp16 per class


def kept_batches_and_rows(spec: StoreSpec) -> tuple[int, int]:
    """(M, R): number of kept batches and of rows, without building the selection when not pruned."""
    ids = spec.batch_ids()
    return len(ids), int(row_offsets(spec, ids)[-1])


def predict_store(spec: StoreSpec) -> dict[str, Any]:
    """Accounting (see ``label_store.accounting``) of the store this spec would produce."""
    m, r = kept_batches_and_rows(spec)
    acc = accounting(array_layout(spec, m, r))
    acc["num_batches"], acc["num_rows"] = m, r
    return acc


def predict_paper(
    num_images: int,
    num_classes: int,
    epochs: int,
    batch_size: int,
    prune_ratio: float = 0.0,
    granularity: str = "epoch",
    mix: str = "cutmix",
    conv: PaperConvention = PaperConvention(),
    drop_last: bool = False,
) -> dict[str, Any]:
    """Label bytes under the paper's (official code's) convention, by Table 21 component.

    Pruning keeps ``num_kept`` epochs (granularity epoch) or batches (batch); at batch granularity
    the kept batches are counted as full batches (the short last batch is a rounding detail).
    ``drop_last``: each epoch holds only its full batches (the official generator when pruning).
    """
    bpe = batches_per_epoch(num_images, batch_size, drop_last)
    seen = bpe * batch_size if drop_last else num_images  # images labelled per epoch
    if granularity == "epoch":
        ep = num_kept(epochs, prune_ratio)
        batches, image_epochs = ep * bpe, ep * seen
    else:
        batches = num_kept(epochs * bpe, prune_ratio)
        image_epochs = min(batches * batch_size, epochs * seen)
    comp = {
        "crop_coords": image_epochs * conv.crop_bytes,
        "flips": image_epochs * conv.flip_bytes,
        "mix_index": image_epochs * conv.mix_index_bytes if mix == "cutmix" else 0,
        "lambda": batches * conv.lambda_bytes if mix == "cutmix" else 0,
        "box": batches * conv.box_bytes if mix == "cutmix" else 0,
        "logits": image_epochs * num_classes * conv.logit_bytes,
    }
    total = sum(comp.values())
    return {"components": comp, "total": total, "total_gib": total / GIB, "num_batches": batches}


def image_bytes(num_images: int, channels: int, image_size: int, bytes_per_image: float | None = None) -> int:
    """Bytes of the distilled images: uint8 pixels, or ``bytes_per_image`` each (compressed files)."""
    if bytes_per_image is not None:
        return int(math.ceil(num_images * float(bytes_per_image)))
    return num_images * channels * image_size * image_size


def format_table(rows: list[tuple[str, int]], title: str) -> str:
    """Plain-text table of (component, bytes) with MB and GiB columns and a total line."""
    width = max([len(k) for k, _ in rows] + [12])
    lines = [title, f"{'component':<{width}} {'bytes':>16} {'MB':>12} {'GiB':>10}"]
    for k, v in rows:
        lines.append(f"{k:<{width}} {v:>16,d} {v / 1e6:>12.3f} {v / GIB:>10.4f}")
    tot = sum(v for _, v in rows)
    lines.append(f"{'total':<{width}} {tot:>16,d} {tot / 1e6:>12.3f} {tot / GIB:>10.4f}")
    return "\n".join(lines)


def model_bytes(model: Any, float_dtype: Any = None) -> int:
    """Bytes of a network a student runs at train time (an online teacher, a label generator; issue 21).

    Every parameter and buffer of ``model`` (an ``nn.Module`` or a state dict) at its own dtype, or with floating
    tensors at ``float_dtype`` (e.g. ``torch.float16``: the teacher shipped in fp16); integer buffers keep theirs.
    Container overhead (file headers, names) is not counted.
    """
    import torch

    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    total = 0
    for t in state.values():
        size = torch.empty((), dtype=float_dtype).element_size() if float_dtype and t.is_floating_point() else None
        total += t.numel() * (size or t.element_size())
    return int(total)
