"""Codecs below fp16 top-k (issue 21 item 4): mrq / msq round trips, error bounds and byte counts by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg, tiny_overrides, write_image_tree

from lpld.core import augment, quant
from lpld.core.augment import AugConfig
from lpld.core.label_store import LabelStore, StoredBatch, StoreSpec, disk_bytes, finalize, prepare
from lpld.core.quant_lowbit import compact_index_dtype, fp16_ceil, pack4, unpack4
from lpld.core.relabel import generate
from lpld.core.storage_accounting import predict_store


def _enc_dec(z: torch.Tensor, cfg: quant.QuantConfig, t: float) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    enc = quant.encode(z, cfg)
    codec = cfg.codec
    b = StoredBatch(torch.arange(z.shape[0]), None, {n: codec.to_tensor(n, a) for n, a in enc.items()}, quant=cfg)
    b.num_classes = z.shape[1]
    return enc, b.decode(t)


def test_pack4_round_trips_every_pair_and_odd_lengths():
    a, b = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    q = torch.stack([a.reshape(-1), b.reshape(-1), a.reshape(-1)], 1).to(torch.int32)  # (256, 3): odd length
    p = pack4(q)
    assert p.shape == (256, 2) and int(p.max()) <= 255
    assert torch.equal(p[:, 0], q[:, 0] + 16 * q[:, 1]) and torch.equal(p[:, 1], q[:, 2])  # low nibble first
    assert torch.equal(unpack4(p, 3), q.long())


def test_fp16_ceil_is_the_smallest_fp16_not_below():
    x = torch.cat([torch.rand(10000) * 50, torch.rand(1000) * 1e-6, torch.tensor([0.0, 1.0, 65504.0, 7e4])])
    h = fp16_ceil(x)
    assert h.dtype == torch.float16 and (h.float() >= x.clamp(max=65504)).all()
    below = torch.nextafter(h, torch.zeros_like(h)).float()  # the fp16 just below (the reference, on the CPU)
    assert ((below < x) | (h == 0)).all()
    assert h[-4:].tolist() == [0.0, 1.0, 65504.0, 65504.0]


def test_compact_index_dtype():
    assert [compact_index_dtype(c) for c in (10, 256, 257, 65536, 65537)] == [
        np.uint8,
        np.uint8,
        np.uint16,
        np.uint16,
        np.uint32,
    ]


# a row whose top-4 logits are 3.0, 2.7, 1.3, 0.5 (gaps 0, 0.3, 1.7, 2.5; 2.5 is exact in fp16)
ROW = torch.tensor([[0.5, -1.0, 3.0, 1.3, -2.0, 2.7, 0.0, -0.5]])


def test_mrq_hand_computed_row_8_and_4_bit():
    # 8 bit, L = 255: 0.3 / 2.5 * 255 = 30.6 -> 31; 1.7 / 2.5 * 255 = 173.4 -> 173
    enc, p = _enc_dec(ROW, quant.QuantConfig("mrq", k=4, params={"bits": 8}), 1.0)
    assert enc["qindices"].tolist() == [[2, 5, 3, 0]] and enc["qindices"].dtype == np.uint8
    assert enc["qvalues"].tolist() == [[31, 173]] and float(enc["qscale"][0]) == 2.5
    gaps = torch.tensor([0.0, 31 * 2.5 / 255, 173 * 2.5 / 255, 2.5])
    ref = torch.zeros(1, 8)
    ref[0, [2, 5, 3, 0]] = torch.softmax(-gaps, 0)
    torch.testing.assert_close(p, ref, atol=1e-6, rtol=0)
    # 4 bit, L = 15: 0.3 / 2.5 * 15 = 1.8 -> 2; 1.7 / 2.5 * 15 = 10.2 -> 10; packed 2 + 16 * 10 = 162
    enc, p = _enc_dec(ROW, quant.QuantConfig("mrq", k=4, params={"bits": 4}), 2.0)
    assert enc["qvalues"].tolist() == [[162]]
    ref = torch.zeros(1, 8)
    ref[0, [2, 5, 3, 0]] = torch.softmax(-torch.tensor([0.0, 2 / 6, 10 / 6, 2.5]) / 2.0, 0)
    torch.testing.assert_close(p, ref, atol=1e-6, rtol=0)


def test_msq_hand_computed_row():
    tg = 2.0
    lp = torch.log_softmax(ROW[0] / tg, 0)  # top-4 gaps of z / T_g: 0, 0.15, 0.85, 1.25
    enc, p = _enc_dec(ROW, quant.QuantConfig("msq", k=4, temperature=tg, params={"bits": 8}), tg)
    # 0.15 / 1.25 * 255 = 30.6 -> 31; 0.85 / 1.25 * 255 = 173.4 -> 173; scale 1.25 exact; top log-prob in fp16
    assert enc["qvalues"].tolist() == [[31, 173]] and float(enc["qscale"][0]) == 1.25
    assert float(enc["qtop"][0]) == float(lp[2].half())
    top = float(lp[2].half())
    kept = torch.exp(top - torch.tensor([0.0, 31 * 1.25 / 255, 173 * 1.25 / 255, 1.25]))
    ref = torch.full((1, 8), float((1 - kept.sum()) / 4))
    ref[0, [2, 5, 3, 0]] = kept
    torch.testing.assert_close(p, ref / ref.sum(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["mrq", "msq"])
@pytest.mark.parametrize("bits", [8, 4])
def test_gap_error_within_the_hand_bound(mode, bits):
    """|d^ - d| <= s16 / (2L) for gaps >= s16 / (2L), <= s16 / L below (clamp at 1); last gap off by s16 - s."""
    g = torch.Generator().manual_seed(bits)
    z = torch.randn(500, 37, generator=g) * 4
    k, tg, lv = 9, 3.0, (1 << bits) - 1
    cfg = quant.QuantConfig(mode, k=k, temperature=tg, params={"bits": bits})
    enc = quant.encode(z, cfg)
    codec = cfg.codec
    d_hat = codec.gaps({n: codec.to_tensor(n, a) for n, a in enc.items()}, cfg).double()
    v = (z if mode == "mrq" else torch.log_softmax(z / tg, 1)).double()
    top = v.topk(k, 1)
    assert torch.equal(torch.from_numpy(enc["qindices"]).long(), top.indices)
    d = top.values[:, :1] - top.values
    s16 = torch.from_numpy(enc["qscale"]).double().view(-1, 1)
    assert (s16 >= d[:, -1:]).all() and (s16 - d[:, -1:] <= s16 * 2**-10).all()
    err = (d_hat - d).abs()[:, 1:-1]
    small = d[:, 1:-1] < s16 / (2 * lv)
    assert (err[~small] <= s16.expand_as(err)[~small] / (2 * lv) + 1e-6).all()
    assert (err[small] <= s16.expand_as(err)[small] / lv + 1e-6).all()
    # the bound is attained to within one step: the quantizer is no coarser than claimed and no finer
    assert float((err / s16).max()) > 0.45 / lv
    # decoding keeps the teacher's top-1 strictly on top
    _, p = _enc_dec(z, cfg, 1.0)
    assert torch.equal(p.argmax(1), z.argmax(1)) and torch.allclose(p.sum(1), torch.ones(500, dtype=p.dtype))


@pytest.mark.parametrize("mode", ["mrq", "msq"])
def test_decode_close_to_the_fp16_codec(mode):
    z = torch.randn(64, 20, generator=torch.Generator().manual_seed(3)) * 3
    base = mode[:2]
    ref_cfg = quant.QuantConfig(base, k=6, temperature=2.0)
    _, ref = _enc_dec(z, ref_cfg, 4.0)
    for bits, tol in ((8, 0.01), (4, 0.06)):
        _, p = _enc_dec(z, quant.QuantConfig(mode, k=6, temperature=2.0, params={"bits": bits}), 4.0)
        assert float((p - ref).abs().max()) < tol


@pytest.mark.parametrize(
    "mode,k,bits,c,row_bytes",
    [
        ("mrq", 10, 8, 16, 10 * 1 + 8 + 2),  # indices uint8, 8 interior gaps, fp16 scale
        ("mrq", 10, 4, 16, 10 * 1 + 4 + 2),  # 8 gaps, two per byte
        ("mrq", 7, 4, 300, 7 * 2 + 3 + 2),  # uint16 indices, 5 gaps -> 3 bytes
        ("msq", 10, 8, 256, 10 + 8 + 2 + 2),  # + fp16 top log-probability
        ("mrq", 2, 8, 10, 2 + 0 + 2),  # no interior gap: no qvalues array at all
    ],
)
def test_bytes_per_row_by_hand(mode, k, bits, c, row_bytes):
    cfg = quant.QuantConfig(mode, k=k, temperature=1.0, params={"bits": bits})
    arrays = quant.label_arrays(cfg, c)
    assert sum(int(np.prod(a.shape, dtype=np.int64)) * a.dtype.itemsize for a in arrays.values()) == row_bytes
    assert all(a.storage == "label" for a in arrays.values())
    enc = quant.encode(torch.randn(3, c), cfg)
    assert sum(a.nbytes for a in enc.values()) == 3 * row_bytes


N, C, HW, B = 30, 12, 12, 8
META = {"images_fingerprint": "img0", "teacher_fingerprint": "t0"}


@pytest.mark.parametrize("mode,bits", [("mrq", 8), ("msq", 4)])
def test_store_on_disk_matches_the_accounting(tmp_path, mode, bits):
    q = quant.QuantConfig(mode, k=5, temperature=2.0, params={"bits": bits})
    spec = StoreSpec(N, C, (HW, HW), B, 4, "2x", 0.5, "batch", q, AugConfig(out_size=HW, mix="cutmix"), "explicit", 3)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    teacher.append(torch.nn.Linear(4, C))
    images = torch.randn(N, 3, HW, HW)
    path = tmp_path / "store"
    assert prepare(path, spec, META) == "new"
    generate(path, teacher.eval(), images)
    man = finalize(path)
    rows, acc = int(man["num_rows"]), man["accounting"]
    per_row = 5 + (3 if bits == 8 else 2) + 2 + (2 if mode == "msq" else 0)
    assert acc["labels_bytes"] == rows * per_row
    npy = sum(p.stat().st_size for p in path.glob("*.npy"))
    assert npy == acc["on_disk_arrays"] == predict_store(spec)["on_disk_arrays"]
    assert disk_bytes(path) - npy == (path / "manifest.json").stat().st_size  # nothing else on disk
    store = LabelStore.open(path, verify="full")
    b = store.read(0)
    e, bi = (int(v) for v in store.batch_ids[0])
    idx = augment.batch_indices(3, e, bi, N, B)
    rec = augment.draw(spec.aug, len(idx), (HW, HW), augment.batch_seed(3, e, bi))
    with torch.no_grad():
        z = teacher(augment.apply(images, idx, rec, HW)).float()
    assert torch.equal(b.qindices.long(), (z if mode == "mrq" else z / 2.0).topk(5, 1).indices)
    assert torch.equal(b.decode(1.0).argmax(1), z.argmax(1))


def test_validation_names_the_knob():
    with pytest.raises(ValueError, match="quant.params.bits must be 8 or 4"):
        quant.QuantConfig("mrq", k=4, params={"bits": 2}).validate(10)
    with pytest.raises(ValueError, match="2 <= k < num_classes"):
        quant.QuantConfig("mrq", k=1).validate(10)
    with pytest.raises(ValueError, match="2 <= k < num_classes"):
        quant.QuantConfig("msq", k=10).validate(10)
    assert quant.QuantConfig("mrq", k=10, params={"bits": 4}).tag == "mr10q4"
    assert quant.QuantConfig("msq", k=50, params={"bits": 8}).label == "ms50q8"


IPC, SIZE, K = 2, 8, 4


@pytest.mark.parametrize("quant_name,index", [("mrq", "plain"), ("msq", "plain"), ("mrq", "rank")])
def test_relabel_then_student_through_the_yaml(tmp_path, quant_name, index):
    """teacher -> recover (random_real) -> relabel with conf/quant/<name>.yaml (4-bit) -> one student epoch."""
    from lpld.artifacts import labels as labels_artifact
    from lpld.artifacts import results as results_artifact
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.core.io import atomic_torch_save, fingerprint_state_dict
    from lpld.report.records import load_records
    from lpld.report.table import display
    from lpld.stages import run_stage
    from lpld.stages.common import build_teacher_model

    root = write_image_tree(tmp_path / "data", n_classes=K, per_class=4, size=SIZE)
    ov = [
        *tiny_overrides(tmp_path, root, n_classes=K, size=SIZE),
        f"ipc={IPC}",
        "recover=random_real",
        f"quant={quant_name}",
        "quant.k=3",
        "quant.params.bits=4",
        f"quant.params.index={index}",
        "dataset.recipe.student.epochs=1",
        "dataset.recipe.student.batch_size=4",
        "dataset.recipe.student.temperature=4.0",
    ]
    cfg = compose_cfg(["stage=recover", *ov])
    torch.manual_seed(0)
    state = build_teacher_model(cfg).state_dict()
    fp = fingerprint_state_dict(state)
    atomic_torch_save(teacher_artifact.path(cfg), {"state_dict": state, "fingerprint": fp, "val": {}})
    run_stage(cfg)
    rcfg = compose_cfg(["stage=relabel", *ov])
    run_stage(rcfg)
    path = labels_artifact.path(rcfg)
    tag = f"_{quant_name[:2]}3q4{'r' if index == 'rank' else ''}_"
    assert tag in path.name
    store = LabelStore.open(path, verify="full")
    acc = store.manifest["accounting"]
    extra = 2 if quant_name == "msq" else 0
    idx = 1 if index == "rank" else 3  # C = 4, k = 3: P = 24 ranks fit one byte; plain: 3 uint8 indices
    assert acc["labels_bytes"] == store.manifest["num_rows"] * (idx + 1 + 2 + extra)  # + 1 gap byte, fp16 scale
    scfg = compose_cfg(["stage=student", *ov])
    run_stage(scfg)
    recs = load_records(results_artifact.dir(scfg) / "results.jsonl")
    assert len(recs) == 1 and display(recs[0]["quant"]) == tag.strip("_")
    assert recs[0]["label_bytes"] == acc["total"] and math.isfinite(float(recs[0]["top1"]))


# ------------------------------------------------------------------------------------- ranked class indices
def test_subset_rank_is_a_bijection_onto_0_to_p():
    import itertools

    from lpld.core.quant_lowbit import rank_subsets, subset_count, unrank_subsets

    for c, k in ((5, 3), (6, 6), (7, 1)):
        subsets = torch.tensor(list(itertools.permutations(range(c), k)))
        r = rank_subsets(subsets, c)
        assert sorted(r.tolist()) == list(range(subset_count(c, k)))  # every rank once
        assert torch.equal(unrank_subsets(r, c, k), subsets)
    # by hand, C = 10, (2, 5, 3): digits 2 (radix 10), 5 - 1 = 4 (radix 9), 3 - 1 = 2 (radix 8): (2 * 9 + 4) * 8 + 2
    assert rank_subsets(torch.tensor([[2, 5, 3]]), 10).tolist() == [178]


def test_ranked_indices_bytes_and_round_trip():
    from lpld.core.quant_lowbit import rank_bytes

    # P = 10 * 9 * 8 * 7 * 6 = 30240 < 2^15: 2 bytes for 5 indices; k = 9: 3628800 < 2^22: 3 bytes
    assert (rank_bytes(10, 5), rank_bytes(10, 9), rank_bytes(10, 3), rank_bytes(100, 9)) == (2, 3, 2, 8)
    enc, _ = _enc_dec(ROW, quant.QuantConfig("mrq", k=3, params={"bits": 8, "index": "rank"}), 1.0)
    # ROW's top-3 classes are (2, 5, 3) in C = 8: digits 2, 4, 2 in radices 8, 7, 6 -> (2 * 7 + 4) * 6 + 2 = 110;
    # P = 336 >= 2^8: two bytes, little-endian
    assert enc["qindices"].tolist() == [[110, 0]] and enc["qindices"].dtype == np.uint8
    z = torch.randn(200, 10, generator=torch.Generator().manual_seed(5)) * 3
    for mode in ("mrq", "msq"):
        plain = quant.QuantConfig(mode, k=5, temperature=2.0, params={"bits": 4})
        ranked = quant.QuantConfig(mode, k=5, temperature=2.0, params={"bits": 4, "index": "rank"})
        e1, p1 = _enc_dec(z, plain, 2.0)
        e2, p2 = _enc_dec(z, ranked, 2.0)
        assert torch.equal(p1, p2)  # the same target, 3 bytes fewer per row
        assert sum(a.nbytes for a in e1.values()) - sum(a.nbytes for a in e2.values()) == 200 * (5 - 2)
        assert ranked.tag == f"{mode[:2]}5q4r"
    with pytest.raises(ValueError, match="index=rank needs"):
        quant.QuantConfig("mrq", k=10, params={"index": "rank"}).validate(1000)
    with pytest.raises(ValueError, match="must be plain or rank"):
        quant.QuantConfig("mrq", k=3, params={"index": "zip"}).validate(10)
