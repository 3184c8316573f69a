"""Entropy coding of label-store arrays (issue 21, item 4): zlib (stdlib) vs zstandard, bytes and decode speed.

    python -m lpld.bench._entropy <label store dir> [--k 5] [--repeat 20] [--also <more store dirs>]

Reads a store written with ``quant=none`` (the full fp16 logits of a real teacher), re-encodes its logits with
the top-k codecs (mr fp16 + uint16, mrq 8 / 4 bit + uint8 indices, mrq 4 bit + ranked indices) and compresses
every array -- labels and the augmentation records -- whole, as one ``.npy`` payload: raw, zlib level 6 and 9,
zstd level 3 and 19, each also after a byte-plane shuffle (byte j of every element together: exposes the fp16
exponent bytes' redundancy).
Prints one markdown row per array and codec: bytes, ratio to raw, decode MB/s (decompressed bytes / best of
``repeat`` decodes). Then packs each store whole (``lpld.core.label_store.pack``, both methods) and times the
unpack. zstandard is optional here (``pip install zstandard``); without it only zlib is measured.

A measurement script, not a timed benchmark: the leading underscore keeps it out of ``python -m lpld.bench``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lpld.core.label_store.pack import METHODS, pack, unpack
from lpld.core.quant import QuantConfig, encode


def shuffle(a: np.ndarray) -> bytes:
    """Byte-plane shuffle: for an itemsize-s array, all bytes 0 of the elements, then all bytes 1, ..."""
    b = np.ascontiguousarray(a).view(np.uint8).reshape(-1, a.dtype.itemsize)
    return np.ascontiguousarray(b.T).tobytes()


def compressors() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    """name -> (compress, decompress)."""
    out: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
        "zlib-6": (lambda b: zlib.compress(b, 6), zlib.decompress),
        "zlib-9": (lambda b: zlib.compress(b, 9), zlib.decompress),
    }
    try:
        import zstandard as zstd
    except ImportError:
        return out
    for level in (3, 19):
        c, d = zstd.ZstdCompressor(level=level), zstd.ZstdDecompressor()
        out[f"zstd-{level}"] = (c.compress, d.decompress)
    return out


def decode_mb_s(blob: bytes, decompress: Callable[[bytes], bytes], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        decompress(blob)
        best = min(best, time.perf_counter() - t)
    return n / best / 1e6


def arrays_of(store: Path, k: int) -> dict[str, np.ndarray]:
    """The store's record arrays and its labels under each codec (name -> array)."""
    man = json.loads((store / "manifest.json").read_text())
    if man["quant"]["mode"] != "none":
        raise SystemExit(f"{store} stores quant={man['quant']['mode']}; give a quant=none store (full logits)")
    out: dict[str, np.ndarray] = {}
    for name in ("sample_index", "crops", "flips", "mix_index"):
        if (store / f"{name}.npy").exists():
            out[f"record:{name}"] = np.load(store / f"{name}.npy")
    z = torch.from_numpy(np.load(store / "logits.npy")).float()
    out["label:none fp16 logits"] = z.half().numpy()
    for cfg in (
        QuantConfig("mr", k=k),
        QuantConfig("mrq", k=k, params={"bits": 8}),
        QuantConfig("mrq", k=k, params={"bits": 4}),
        QuantConfig("mrq", k=k, params={"bits": 4, "index": "rank"}),
    ):
        for name, a in encode(z, cfg).items():
            out[f"label:{cfg.tag} {name}"] = a
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--also", type=Path, nargs="*", default=[], help="more stores (any quant) to pack whole")
    args = ap.parse_args()
    comps = compressors()
    print("| array | dtype x shape | raw B | codec | shuffled | bytes | ratio | decode MB/s |")
    print("|---|---|---|---|---|---|---|---|")
    totals: dict[tuple[str, str, bool], int] = {}
    for name, a in arrays_of(args.store, args.k).items():
        raw = np.ascontiguousarray(a).tobytes()
        for cname, (comp, dec) in comps.items():
            for shuf in (False, True):  # a 1-byte array shuffles to itself (kept for the totals)
                blob = comp(shuffle(a) if shuf else raw)
                assert len(dec(blob)) == len(raw)
                mbs = decode_mb_s(blob, dec, len(raw), args.repeat)
                print(
                    f"| {name} | {a.dtype} x {tuple(a.shape)} | {len(raw)} | {cname} | {'yes' if shuf else 'no'} | "
                    f"{len(blob)} | {len(blob) / len(raw):.3f} | {mbs:.0f} |"
                )
                tag = name.split(" ")[0]
                totals[(tag, cname, shuf)] = totals.get((tag, cname, shuf), 0) + len(blob)
    print()
    print("| arrays | codec | shuffled | bytes |")
    print("|---|---|---|---|")
    for (tag, cname, shuf), b in sorted(totals.items()):
        print(f"| {tag} | {cname} | {'yes' if shuf else 'no'} | {b} |")
    print()
    print("| whole store (lpld.core.label_store.pack) | method | store bytes | packed bytes | ratio | unpack s |")
    print("|---|---|---|---|---|---|")
    for store in [args.store, *args.also]:
        for method in METHODS:
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    info = pack(store, Path(tmp) / "s.lpack", method)
                    t = time.perf_counter()
                    unpack(Path(tmp) / "s.lpack", Path(tmp) / "out")
                    dt = time.perf_counter() - t
            except ImportError:
                continue
            raw, packed = info["raw_bytes"], info["packed_bytes"]
            print(f"| {store.name} | {method} | {raw} | {packed} | {packed / raw:.3f} | {dt:.3f} |")


if __name__ == "__main__":
    main()
