"""Tiny artifacts for the reliability tests: a label store built through the core API, and stage configs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from conftest import compose_cfg, tiny_overrides, write_image_tree
from torch import nn

from lpld.artifacts import images as images_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.core import augment
from lpld.core.augment import AugConfig
from lpld.core.io import atomic_torch_save, fingerprint_state_dict
from lpld.core.label_store import StoreSpec, finalize, prepare
from lpld.core.quant import QuantConfig
from lpld.core.relabel import generate

N, C, HW, B = 20, 6, 8, 4
META = {"images_fingerprint": "img0", "teacher_fingerprint": "t0"}
N_CLASSES, IPC, SIZE = 4, 3, 8


def teacher(seed: int = 0, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes)
    ).eval()


def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (N, 3, HW, HW), dtype=torch.uint8, generator=g)
    return augment.to_model_input(u8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def spec(quant: QuantConfig = QuantConfig(), record: str = "explicit", **kw) -> StoreSpec:
    base = dict(
        num_images=N,
        num_classes=C,
        image_hw=(HW, HW),
        batch_size=B,
        epochs=4,
        prune_name="2x",
        prune_ratio=0.5,
        granularity="batch",
        quant=quant,
        aug=AugConfig(out_size=HW, mix="cutmix"),
        record_mode=record,
        seed=3,
    )
    base.update(kw)
    return StoreSpec(**base)


def build_store(path: Path, sp: StoreSpec | None = None) -> Path:
    """prepare + generate + finalize a small complete store at ``path``."""
    sp = sp or spec()
    assert prepare(path, sp, META) == "new"
    generate(path, teacher(classes=sp.num_classes), images(), chunk=2)
    finalize(path)
    return path


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(f: Path, pos: int) -> None:
    data = bytearray(f.read_bytes())
    data[pos] ^= 0xFF
    f.write_bytes(bytes(data))


def npy_data_offset(f: Path) -> int:
    """Byte offset of the array data in a .npy file (after its header)."""
    from numpy.lib import format as npy_format

    with open(f, "rb") as fh:
        version = npy_format.read_magic(fh)
        (npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0)(fh)
        return fh.tell()


# ----------------------------------------------------------------------------------------------------------------------
# stage configs on a tiny image tree (random teacher -> random_real images -> relabel -> student)
# ----------------------------------------------------------------------------------------------------------------------


def stage_overrides(root: Path, extra: tuple[str, ...] = ()) -> list[str]:
    data = root / "data"
    if not data.exists():
        write_image_tree(data, n_classes=N_CLASSES, per_class=6, size=SIZE)
    return [
        *tiny_overrides(root, data, n_classes=N_CLASSES, size=SIZE),
        f"ipc={IPC}",
        "recover=random_real",
        "dataset.recipe.student.epochs=3",
        "dataset.recipe.student.batch_size=4",
        "dataset.recipe.student.rrc_scale=[0.5,1.0]",
        *extra,
    ]


def save_random_teacher(cfg) -> str:
    from lpld.stages.common import build_teacher_model

    torch.manual_seed(0)
    state = build_teacher_model(cfg).state_dict()
    fp = fingerprint_state_dict(state)
    atomic_torch_save(teacher_artifact.path(cfg), {"state_dict": state, "fingerprint": fp, "val": {}})
    return fp


def student_cfg(root: Path, extra: tuple[str, ...] = ()):
    """teacher -> recover (random_real) -> relabel in process; returns the student stage config."""
    from lpld.stages import dispatch

    ov = stage_overrides(root, extra)
    cfg = compose_cfg(["stage=recover", *ov])
    if not teacher_artifact.path(cfg).exists():
        save_random_teacher(cfg)
    if not (images_artifact.path(cfg) / "manifest.json").exists():
        dispatch(cfg)
    dispatch(compose_cfg(["stage=relabel", *ov]))
    return compose_cfg(["stage=student", *ov])


def arrays_equal(a: Path, b: Path) -> bool:
    """Every .npy of two store directories holds the same bytes."""
    fa, fb = sorted(p.name for p in a.glob("*.npy")), sorted(p.name for p in b.glob("*.npy"))
    return fa == fb and all((a / n).read_bytes() == (b / n).read_bytes() for n in fa)


__all__ = ["np", "compose_cfg"]
