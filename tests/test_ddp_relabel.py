"""Relabel on any device: host-only records, uint8 images replayed on the device, grouped teacher forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lpld.core import augment
from lpld.core.augment import AugConfig
from lpld.core.label_store import StoreSpec, finalize, prepare
from lpld.core.quant import QuantConfig
from lpld.core.relabel import generate

MEAN, STD = (0.5,), (0.25,)


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6)).eval()


def _spec(record_mode: str = "explicit", quant: QuantConfig | None = None) -> StoreSpec:
    q = quant or QuantConfig("mr", 2)
    # 20 images, batch 6 -> 4 batches/epoch (last one short: 2 rows) x 4 epochs, 2x pruning
    return StoreSpec(20, 6, (8, 8), 6, 4, "2x", 0.5, "batch", q, AugConfig(8), record_mode, 5)


META = {"images_fingerprint": "i", "teacher_fingerprint": "t"}


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _reference(tmp_path, spec: StoreSpec, u8: torch.Tensor):
    """The core single-process generator on the float images (the pre-existing path)."""
    ref = tmp_path / "ref"
    prepare(ref, spec, META)
    generate(ref, _teacher(), augment.to_model_input(u8, MEAN, STD))
    finalize(ref)
    return ref


def _run_module(path, u8: torch.Tensor, bpf: int, device: torch.device | None = None) -> None:
    """Drive RelabelModule's hooks as Lightning's predict loop does, moving batches to ``device``."""
    from lpld.lit.relabel_datamodule import RelabelDataModule
    from lpld.lit.relabel_module import RelabelModule

    module = RelabelModule(_teacher(), path, u8, MEAN, STD, chunk=3)
    dm = RelabelDataModule(path, batches_per_forward=bpf)
    dm.setup("predict")
    module.on_predict_start()
    for j, item in enumerate(dm.predict_dataloader()):
        moved = module.transfer_batch_to_device(item, device or torch.device("cpu"), 0)
        module.predict_step(moved, j)
    module.on_predict_end()
    finalize(path)


def _same_files(a, b) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for f in names:
        if f != "manifest.json":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_explicit_records_stay_on_host_when_the_batch_goes_to_a_device(tmp_path):
    """The GPU crash (issue 10): Lightning moved the AugRecord to the device and the writer called .numpy().

    ``meta`` stands in for the GPU: a record moved there cannot be converted to numpy (the old default
    hook moved it). The module's hook must hand the writer host tensors.
    """
    from lightning.pytorch.utilities import move_data_to_device

    from lpld.lit.relabel_datamodule import RelabelDataModule

    spec, u8 = _spec("explicit"), _images()
    path = tmp_path / "store"
    prepare(path, spec, META)
    dm = RelabelDataModule(path, batches_per_forward=2)
    dm.setup("predict")
    item = dm._ds[0]
    # the default hook would have put the record on the device: the writer then cannot store it
    moved_default = move_data_to_device(item, torch.device("meta"))
    assert moved_default.records[0].crops.device.type == "meta"
    with pytest.raises((TypeError, RuntimeError, NotImplementedError)):
        moved_default.records[0].crops.numpy()
    _run_module(path, u8, bpf=2, device=torch.device("meta"))
    _same_files(path, _reference(tmp_path, spec, u8))


@pytest.mark.parametrize("record_mode", ["explicit", "seed"])
@pytest.mark.parametrize("bpf", [1, 3])
def test_uint8_replay_and_grouped_forwards_give_the_reference_bytes(tmp_path, record_mode, bpf):
    """uint8 images + on-device replay + bpf stored batches per forward == the float per-batch generator."""
    spec, u8 = _spec(record_mode), _images()
    path = tmp_path / "store"
    prepare(path, spec, META)
    _run_module(path, u8, bpf)
    _same_files(path, _reference(tmp_path, spec, u8))


@pytest.mark.parametrize("quant", [QuantConfig("none"), QuantConfig("hard"), QuantConfig("ms", 3, 2.0)])
def test_grouped_forward_all_quant_modes(tmp_path, quant):
    spec, u8 = _spec("explicit", quant), _images()
    path = tmp_path / "store"
    prepare(path, spec, META)
    _run_module(path, u8, 4)
    _same_files(path, _reference(tmp_path, spec, u8))


def test_resume_after_partial_commit_gives_the_same_bytes(tmp_path):
    """Kill after the first commit (chunk 3 of groups of 2), resume: the uninterrupted store's bytes."""
    from lpld.lit.relabel_datamodule import RelabelDataModule
    from lpld.lit.relabel_module import RelabelModule

    spec, u8 = _spec(), _images()
    path = tmp_path / "store"
    prepare(path, spec, META)
    module = RelabelModule(_teacher(), path, u8, MEAN, STD, chunk=3)
    dm = RelabelDataModule(path, batches_per_forward=2)
    dm.setup("predict")
    module.on_predict_start()
    for j, item in enumerate(dm.predict_dataloader()):
        module.predict_step(item, j)
        if j == 1:  # 4 batches written, 3 committed: the 4th is lost with the process
            break
    module._writer = None  # no close(): an interruption does not commit
    _run_module(path, u8, 2)
    _same_files(path, _reference(tmp_path, spec, u8))


def test_groups_are_fixed_blocks_of_the_store():
    from lpld.lit.relabel_datamodule import auto_batches_per_forward, groups

    assert groups(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    done = np.array([1, 1, 1, 1, 0, 1, 1], dtype=np.uint8)
    assert groups(7, 3, done) == [[3, 4, 5]]  # a block with one undone batch is recomputed whole
    assert auto_batches_per_forward(32) == 8 and auto_batches_per_forward(128) == 2
    assert auto_batches_per_forward(1024) == 1


def test_module_refuses_float_images(tmp_path):
    from lpld.lit.relabel_module import RelabelModule

    with pytest.raises(ValueError, match="uint8"):
        RelabelModule(_teacher(), tmp_path, torch.zeros(2, 1, 8, 8), MEAN, STD)


def test_load_distilled_parallel_decode_equals_sequential(tmp_path):
    """uint8 images decoded by a thread pool, in windows: same tensor, labels and fingerprint check as 1 thread."""
    from lpld.core.images import class_dir_name, images_fingerprint, load_distilled, read_png, save_png
    from lpld.core.io import ArtifactError, atomic_write_json

    g = torch.Generator().manual_seed(0)
    for c in range(3):
        for i in range(50):  # 150 images: more than one decoding window
            save_png(
                tmp_path / class_dir_name(c, f"c{c}") / f"{i:05d}.png",
                torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8, generator=g),
            )
    atomic_write_json(
        tmp_path / "manifest.json", {"complete": True, "images_fingerprint": images_fingerprint(tmp_path)}
    )
    a, la, _ = load_distilled(tmp_path, workers=1)
    b, lb, _ = load_distilled(tmp_path, workers=4)
    assert a.dtype == torch.uint8 and a.shape == (150, 3, 4, 5)
    assert torch.equal(a, b) and torch.equal(la, lb) and la.tolist() == [c for c in range(3) for _ in range(50)]
    assert torch.equal(a[57], read_png(tmp_path / class_dir_name(1, "c1") / "00007.png"))
    save_png(tmp_path / class_dir_name(2, "c2") / "00003.png", torch.zeros(3, 4, 5, dtype=torch.uint8))
    with pytest.raises(ArtifactError, match="fingerprint|hash|changed"):
        load_distilled(tmp_path, workers=4)
