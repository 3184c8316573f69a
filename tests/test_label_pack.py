"""Packed (entropy-coded) label stores: exact round trip of every file, exact packed bytes, corruption refused."""

from __future__ import annotations

import pytest
import torch

from lpld.core.augment import AugConfig
from lpld.core.io import ArtifactError
from lpld.core.label_store import LabelStore, StoreSpec, finalize, prepare
from lpld.core.label_store.pack import pack, shuffle_bytes, store_files, unpack, unshuffle_bytes
from lpld.core.quant import QuantConfig
from lpld.core.relabel import generate

N, C, HW, B = 40, 10, 12, 8


def _store(tmp_path, quant: QuantConfig, record: str = "explicit"):
    aug = AugConfig(out_size=HW, mix="cutmix")
    spec = StoreSpec(N, C, (HW, HW), B, 3, "1x", 0.0, "batch", quant, aug, record, 1)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    teacher.append(torch.nn.Linear(4, C))
    path = tmp_path / "store"
    prepare(path, spec, {"images_fingerprint": "i", "teacher_fingerprint": "t"})
    generate(path, teacher.eval(), torch.randn(N, 3, HW, HW))
    finalize(path)
    return path


def test_shuffle_round_trips():
    data = bytes(range(256)) * 3
    for itemsize in (1, 2, 4, 8):
        assert unshuffle_bytes(shuffle_bytes(data, itemsize), itemsize) == data
    assert shuffle_bytes(b"\x01\x02\x03\x04", 2) == b"\x01\x03\x02\x04"  # low bytes, then high bytes


@pytest.mark.parametrize("method", ["zlib", "zstd"])
@pytest.mark.parametrize(
    "quant,record",
    [
        (QuantConfig("none"), "explicit"),
        (QuantConfig("mrq", k=4, params={"bits": 4}), "explicit"),
        (QuantConfig("msq", k=3, temperature=2.0, params={"index": "rank"}), "seed"),  # uint64 seeds, ranked indices
    ],
)
def test_pack_unpack_restores_every_file_byte_for_byte(tmp_path, method, quant, record):
    if method == "zstd":
        pytest.importorskip("zstandard")
    store = _store(tmp_path, quant, record)
    info = pack(store, tmp_path / "s.lpack", method)
    files = store_files(store)
    assert info["packed_bytes"] == (tmp_path / "s.lpack").stat().st_size  # the accounting is the file
    assert info["raw_bytes"] == sum(p.stat().st_size for p in files)
    assert info["packed_bytes"] < info["raw_bytes"]
    out = unpack(tmp_path / "s.lpack", tmp_path / "restored")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files)
    for p in files:
        assert (out / p.name).read_bytes() == p.read_bytes()
    a, b = LabelStore.open(store, verify="full"), LabelStore.open(out, verify="full")
    assert torch.equal(a.read(2).decode(2.0), b.read(2).decode(2.0))
    with pytest.raises(ArtifactError, match="already holds a label store"):
        unpack(tmp_path / "s.lpack", out)


def test_corrupt_or_foreign_packs_are_refused(tmp_path):
    store = _store(tmp_path, QuantConfig("none"))
    pack(store, tmp_path / "s.lpack", "zlib")
    data = bytearray((tmp_path / "s.lpack").read_bytes())
    data[-10] ^= 0xFF  # inside the last payload (the manifest's zlib stream)
    (tmp_path / "bad.lpack").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupt"):
        unpack(tmp_path / "bad.lpack", tmp_path / "o1")
    assert not (tmp_path / "o1" / "manifest.json").exists()
    (tmp_path / "x.lpack").write_bytes(b"not a pack")
    with pytest.raises(ArtifactError, match="not a packed label store"):
        unpack(tmp_path / "x.lpack", tmp_path / "o2")
    (tmp_path / "short.lpack").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError, match="truncated|corrupt"):
        unpack(tmp_path / "short.lpack", tmp_path / "o3")
    with pytest.raises(ValueError, match="pack method"):
        pack(store, tmp_path / "y.lpack", "lzma")
