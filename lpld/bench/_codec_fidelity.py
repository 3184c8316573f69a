"""How far each top-k codec's decoded target is from the teacher's full softmax, on a real store's logits.

    python -m lpld.bench._codec_fidelity <label store dir of a quant=none run> [--t 4.0] [--k 3 5]

Prints one markdown row per codec: bytes per row, mean total-variation distance of the decoded target at T to
softmax(z / T) in fp32, the largest absolute probability difference to the fp16 codec of the same k (mr for
mrq, ms for msq), and the share of rows whose argmax is the teacher's.

A measurement script, not a timed benchmark: the leading underscore keeps it out of ``python -m lpld.bench``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lpld.core import quant


def decoded(z: torch.Tensor, cfg: quant.QuantConfig, t: float) -> tuple[torch.Tensor, float]:
    """(decoded (R, C) target at T, bytes per row) of the logits z under codec cfg."""
    enc = quant.encode(z, cfg)
    codec = cfg.codec
    labels = {n: codec.to_tensor(n, a) for n, a in enc.items()}
    return codec.decode(labels, cfg, t, z.shape[1]), sum(a.nbytes for a in enc.values()) / z.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--t", type=float, default=4.0)
    ap.add_argument("--k", type=int, nargs="+", default=[3, 5])
    args = ap.parse_args()
    z = torch.from_numpy(np.load(args.store / "logits.npy")).float()
    t = args.t
    full = torch.softmax(z / t, dim=1)
    print(f"| codec | bytes/row | mean TV distance to softmax(z/{t:g}) | max abs prob. error vs fp16 | top-1 kept |")
    print("|---|---|---|---|---|")
    for k in args.k:
        for mode, bits in (("mr", None), ("mrq", 8), ("mrq", 4), ("ms", None), ("msq", 8), ("msq", 4)):
            cfg = quant.QuantConfig(mode, k=k, temperature=t, params={} if bits is None else {"bits": bits})
            p, row = decoded(z, cfg, t)
            ref, _ = decoded(z, quant.QuantConfig(mode[:2], k=k, temperature=t), t)
            tv = 0.5 * (full - p).abs().sum(1).mean().item()
            top1 = (p.argmax(1) == z.argmax(1)).float().mean().item()
            print(f"| {cfg.label} | {row:.0f} | {tv:.4f} | {(p - ref).abs().max().item():.4f} | {top1:.4f} |")
    p, row = decoded(z, quant.QuantConfig("none"), t)
    print(f"| none (fp16 logits) | {row:.0f} | {0.5 * (full - p).abs().sum(1).mean().item():.6f} | - | 1.0000 |")


if __name__ == "__main__":
    main()
