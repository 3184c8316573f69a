"""Label store format 2: per-batch CRC-32s catch any flipped data byte at the first read of its batch."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from lpld.core.io import ArtifactError, aside_path
from lpld.core.label_store import FORMAT, LabelStore, StoreWriter, batch_slices, crc32s, finalize, prepare
from lpld.core.quant import QuantConfig

from .helpers import META, build_store, copy_store, flip_byte, npy_data_offset, spec


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("integrity") / "store")


def _owner_batch(store: LabelStore, name: str, pos: int) -> int:
    """Independent reference: which stored batch owns byte ``pos`` of array ``name``'s data."""
    a = store.manifest["arrays"][name]
    shape = a["shape"]
    item = np.dtype(a["dtype"]).itemsize * int(np.prod(shape[1:], dtype=np.int64))  # bytes per leading index
    lead = pos // item
    if name in ("lam", "box", "checksums"):
        return lead
    offs = np.asarray(store.arrays["row_offsets"])
    return int(np.searchsorted(offs, lead, side="right") - 1)


def _failing_batches(path) -> list[tuple[int, str]]:
    st = LabelStore.open(path, verify="none")
    bad = []
    for i in range(len(st)):
        try:
            st.read(i)
        except ArtifactError as e:
            bad.append((i, str(e)))
    return bad


@pytest.mark.parametrize("name", ["logits", "crops", "sample_index", "mix_index", "flips", "lam", "box", "checksums"])
def test_any_flipped_data_byte_fails_exactly_its_batch(store, tmp_path, name):
    ref = LabelStore.open(store)
    f = store / f"{name}.npy"
    start, size = npy_data_offset(f), f.stat().st_size
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for k, pos in enumerate(sorted({start, size - 1, *rng.integers(start, size, 4).tolist()})):
        path = copy_store(store, tmp_path / f"c{k}")
        flip_byte(path / f"{name}.npy", pos)
        bad = _failing_batches(path)
        want = _owner_batch(ref, name, pos - start)
        assert [i for i, _ in bad] == [want], (name, pos)
        msg = bad[0][1]
        e, b = (int(v) for v in ref.batch_ids[want])
        assert f"stored batch {want} (epoch {e}, batch {b}" in msg
        # the damaged file is named (checksums.npy always is: the message says data or CRC changed)
        assert f"{name}.npy" in msg
        assert "stage=relabel" in msg and "stage.overwrite=true" in msg


def test_default_fast_open_misses_a_mid_file_flip_but_the_read_catches_it(tmp_path):
    """The issue's case: one byte in the middle of logits.npy, outside the 16 blocks verify=fast samples."""
    from lpld.core.label_store import _SAMPLE_BLOCK, _SAMPLE_COUNT

    path = build_store(tmp_path / "big", spec(num_classes=1000))
    f = path / "logits.npy"
    size = f.stat().st_size
    assert size > _SAMPLE_BLOCK * _SAMPLE_COUNT
    covered = np.zeros(size, dtype=bool)
    for i in range(_SAMPLE_COUNT):  # the sampled blocks (label_store._sampled_sha256)
        s0 = (size - _SAMPLE_BLOCK) * i // (_SAMPLE_COUNT - 1)
        covered[s0 : s0 + _SAMPLE_BLOCK] = True
    gaps = np.flatnonzero(~covered)
    pos = int(gaps[np.abs(gaps - size // 2).argmin()])  # the unsampled byte nearest the middle
    flip_byte(f, pos)
    LabelStore.open(path, verify="fast")  # sizes, headers and sampled hashes still pass (why reads must check)
    with pytest.raises(ArtifactError, match="checksum mismatch in logits.npy"):
        LabelStore.open(path, verify="full")
    bad = _failing_batches(path)
    assert len(bad) == 1 and "logits.npy" in bad[0][1]


def test_index_arrays_are_hashed_fully_on_fast_open(store, tmp_path):
    path = copy_store(store, tmp_path / "ids")
    f = path / "row_offsets.npy"
    flip_byte(f, npy_data_offset(f) + 9)
    with pytest.raises(ArtifactError, match="row_offsets.npy.*stage.overwrite=true"):
        LabelStore.open(path, verify="fast")


def test_truncated_file_is_refused_on_open_naming_it_and_the_fix(store, tmp_path):
    path = copy_store(store, tmp_path / "trunc")
    f = path / "logits.npy"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(ArtifactError, match=r"logits\.npy has .* bytes.*stage\.overwrite=true"):
        LabelStore.open(path)


def test_old_format_is_refused_and_overwrite_regenerates_it(store, tmp_path):
    path = copy_store(store, tmp_path / "old")
    man = json.loads((path / "manifest.json").read_text())
    man["format"] = "lpld-label-store/1"
    (path / "manifest.json").write_text(json.dumps(man))
    for call in (lambda: LabelStore.open(path), lambda: prepare(path, spec(), META)):
        with pytest.raises(ArtifactError, match=r"lpld-label-store/1.*stage\.overwrite=true"):
            call()
    # following the fix: overwrite starts over, keeps the old store aside until the new one is complete
    assert prepare(path, spec(), META, overwrite=True) == "new"
    assert aside_path(path).is_dir()
    from lpld.core.relabel import generate

    from .helpers import images, teacher

    generate(path, teacher(), images(), chunk=2)
    finalize(path)
    assert not aside_path(path).exists()
    st = LabelStore.open(path, verify="full")
    assert st.manifest["format"] == FORMAT
    for i in range(len(st)):
        st.read(i)


def test_writer_accepts_tensors_and_arrays_alike(tmp_path):
    """Tensors (any device; here CPU) or numpy arrays give the same bytes and checksums."""
    from lpld.core import augment, quant

    from .helpers import images, teacher

    sp = spec(QuantConfig("mr", 3))
    x, t = images(), teacher()
    out = []
    for kind in ("numpy", "tensor"):
        path = tmp_path / kind
        prepare(path, sp, META)
        w = StoreWriter(path)
        for i, (e, b) in enumerate(w.batch_ids):
            idx = augment.batch_indices(sp.seed, int(e), int(b), sp.num_images, sp.batch_size)
            rec = augment.draw(sp.aug, len(idx), sp.image_hw, w.seed_of(i))
            with torch.no_grad():
                z = t(x[idx])
            enc = quant.encode(z, sp.quant)
            # tensors as a device module would hand them over (int64 indices, narrowed by the writer)
            as_t = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "u" else v) for k, v in enc.items()}
            labels = enc if kind == "numpy" else as_t
            w.write(i, idx, rec, labels)
        w.close()
        finalize(path)
        out.append(path)
    for n in ("topk_values", "topk_indices", "checksums", "crops"):
        assert (out[0] / f"{n}.npy").read_bytes() == (out[1] / f"{n}.npy").read_bytes(), n


def test_checksums_match_an_independent_crc(store):
    st = LabelStore.open(store)
    names = st.manifest["checksummed"]
    for i in range(len(st)):
        r0, r1 = (int(v) for v in st.arrays["row_offsets"][i : i + 2])
        want = [
            zlib.crc32(np.array(st.arrays[n][r0:r1] if n not in ("lam", "box") else st.arrays[n][i]).tobytes())
            for n in names
        ]
        assert np.array_equal(st.arrays["checksums"][i], np.array(want, dtype=np.uint32))
        assert np.array_equal(crc32s(batch_slices(st.arrays, names, i, r0, r1)), want)
