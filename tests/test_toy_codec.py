"""A label codec defined here only, carried through relabel -> student (issue 18: registries that carry the work).

``top1int8`` stores, per augmented image, the teacher's argmax class and its probability quantized to ``bits``
bits, in ONE uint8 label array ``top1`` (R, 2); decoded, the rest of the mass is spread uniformly. Nothing in
``lpld/`` or ``conf/`` names it: the class below, its registration and a ``quant`` config node stored from this
file are all it takes (checked by ``test_nothing_outside_this_file_names_the_toy_codec``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import compose_cfg, tiny_overrides, write_image_tree
from hydra.core.config_store import ConfigStore

from lpld.config.schema import QuantConf
from lpld.core import augment
from lpld.core.augment import AugConfig
from lpld.core.label_store import LabelStore, StoreSpec, disk_bytes, finalize, prepare
from lpld.core.quant import (
    CodecArray,
    CodecParam,
    LabelCodec,
    QuantConfig,
    get_label_codec,
    list_label_codecs,
    register_label_codec,
)
from lpld.core.relabel import generate
from lpld.core.storage_accounting import predict_store

NAME = "top1int8"
REPO = Path(__file__).resolve().parents[1]


class Top1Int8(LabelCodec):
    """The argmax class (uint8) and its probability at T = 1 rounded up to ``bits`` bits (uint8), one array."""

    params: ClassVar[dict[str, CodecParam]] = {"bits": CodecParam(int, 8, "bits of the stored top-1 probability")}
    report_kind = "hard"  # a plot marks it like hard labels: one class per image (plus its confidence)

    def validate(self, cfg: QuantConfig, num_classes: int) -> None:
        if num_classes > 256:
            raise ValueError(f"quant={self.name} stores the class as uint8: needs <= 256 classes, got {num_classes}")
        if not 1 <= int(cfg.param("bits")) <= 8:
            raise ValueError(f"quant.params.bits must be in 1..8, got {cfg.param('bits')}")

    def arrays(self, cfg: QuantConfig, num_classes: int) -> dict[str, CodecArray]:
        return {"top1": CodecArray((2,), np.dtype(np.uint8), "label")}

    def encode(self, z: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        p, idx = torch.softmax(z, dim=1).max(dim=1)
        levels = (1 << int(cfg.param("bits"))) - 1
        q = torch.ceil(p * levels).clamp_(1, levels)  # rounded up: the stored top-1 never drops below 1 / C
        return {"top1": torch.stack([idx, q.to(idx.dtype)], dim=1).to(torch.int32)}

    def decode(
        self, arrays: Mapping[str, torch.Tensor], cfg: QuantConfig, temperature: float, num_classes: int
    ) -> torch.Tensor:
        top = arrays["top1"].long()
        b = top.shape[0]
        p = (top[:, 1].float() / ((1 << int(cfg.param("bits"))) - 1)).clamp(1.0 / num_classes, 1.0)
        out = ((1.0 - p) / (num_classes - 1)).view(b, 1).expand(b, num_classes).clone()
        out.scatter_(1, top[:, :1], p.view(b, 1))
        return torch.softmax(out.clamp_min(1e-12).log() / float(temperature), dim=1)  # re-tempered at T

    def tag(self, cfg: QuantConfig) -> str:
        return f"top1b{cfg.param('bits')}"

    def label(self, cfg: QuantConfig) -> str:
        return f"top1@{cfg.param('bits')}bit"


if NAME not in list_label_codecs():
    register_label_codec(NAME)(Top1Int8)
# the quant option: a node of the quant schema stored from here, so no conf/quant/<name>.yaml is needed
ConfigStore.instance().store(group="quant", name="toy", node=QuantConf(name="toy", mode=NAME, params={"bits": 8}))

N, C, HW, B = 30, 12, 12, 8
META = {"images_fingerprint": "img0", "teacher_fingerprint": "t0"}


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(24, C),
    ).eval()


def _spec(bits: int = 8, record: str = "explicit") -> StoreSpec:
    q = QuantConfig(NAME, params={"bits": bits})
    return StoreSpec(N, C, (HW, HW), B, 4, "2x", 0.5, "batch", q, AugConfig(out_size=HW, mix="cutmix"), record, 3)


def _images() -> torch.Tensor:
    u8 = torch.randint(0, 256, (N, 3, HW, HW), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return augment.to_model_input(u8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


@pytest.mark.parametrize("record", ["explicit", "seed"])
def test_toy_codec_store_accounting_and_decode(tmp_path, record):
    spec, images, teacher = _spec(record=record), _images(), _teacher()
    path = tmp_path / "store"
    assert prepare(path, spec, META) == "new"
    generate(path, teacher, images)
    man = finalize(path)
    # the codec's one array is laid out, checksummed and counted as labels; everything else is records
    rows = int(man["num_rows"])
    assert man["arrays"]["top1"]["dtype"] == "|u1" and man["arrays"]["top1"]["shape"] == [rows, 2]
    assert "top1" in man["checksummed"]
    acc = man["accounting"]
    assert acc["components"]["top1"] == acc["labels_bytes"] == rows * 2  # rows x (class + probability) bytes
    assert (
        acc["records_bytes"]
        == acc["total"] - rows * 2
        == sum(a["nbytes"] for n, a in man["arrays"].items() if n != "top1")
    )
    npy = sum(p.stat().st_size for p in path.glob("*.npy"))
    assert npy == acc["on_disk_arrays"] == predict_store(spec)["on_disk_arrays"]
    assert disk_bytes(path) == npy + (path / "manifest.json").stat().st_size
    assert man["quant"] == {"mode": NAME, "k": 0, "temperature": 1.0, "params": {"bits": 8}}
    # read back (CRC-checked) and decode against an independent recomputation of the teacher's labels
    store = LabelStore.open(path, verify="full")
    assert store.spec.quant == spec.quant
    for i in range(len(store)):
        b = store.read(i)
        e, bi = (int(v) for v in store.batch_ids[i])
        idx = augment.batch_indices(3, e, bi, N, B)
        rec = augment.draw(spec.aug, len(idx), (HW, HW), augment.batch_seed(3, e, bi))
        with torch.no_grad():
            p = torch.softmax(teacher(augment.apply(images, idx, rec, HW)).float(), 1)
        assert set(b.labels) == {"top1"} and b.top1.dtype == torch.uint8 and b.logits is None
        assert torch.equal(b.top1[:, 0].long(), p.argmax(1))
        assert torch.equal(b.top1[:, 1].float(), torch.ceil(p.max(1).values * 255).clamp(1, 255))
        for t in (1.0, 4.0):
            q = b.decode(t)
            assert q.shape == (len(b), C) and torch.allclose(q.sum(1), torch.ones(len(b)), atol=1e-5)
            assert torch.equal(q.argmax(1), p.argmax(1))
        top = b.decode(1.0).max(1).values
        assert torch.allclose(top, b.top1[:, 1].float() / 255, atol=1e-6)


def test_toy_codec_params_tag_label_and_validation():
    q = QuantConfig(NAME, params={"bits": 4})
    assert (q.tag, q.label, get_label_codec(NAME).uses_k) == ("top1b4", "top1@4bit", False)
    assert q.to_dict() == {"mode": NAME, "k": 0, "temperature": 1.0, "params": {"bits": 4}}
    assert _spec(bits=4).to_dict() != _spec(bits=8).to_dict()  # the codec's knob is part of the store identity
    assert StoreSpec.from_dict(_spec(bits=4).to_dict()) == _spec(bits=4)
    a = predict_store(_spec(bits=4))
    assert a["labels_bytes"] == a["num_rows"] * 2 and a["components"]["top1"] == a["labels_bytes"]
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        _spec(bits=9)
    with pytest.raises(ValueError, match="no parameter quant.params.levels"):
        QuantConfig(NAME, params={"levels": 3}).validate(C)
    with pytest.raises(ValueError, match="<= 256 classes"):
        QuantConfig(NAME).validate(300)
    # the report shows the codec's label; a plot marks it as the codec says
    from lpld.report.table import display, quant_kind

    assert display(q.to_dict()) == "top1@4bit" and quant_kind(q.to_dict()) == "hard"
    assert display({"mode": "mr", "k": 10, "temperature": 1.0}) == "mr10"  # built-ins unchanged


def test_quant_settings_pass_the_codecs_params_through(tmp_path):
    from lpld.config import quant_settings
    from lpld.errors import ConfigError

    cfg = compose_cfg(["quant=toy"])
    assert quant_settings(cfg) == {"mode": NAME, "k": 0, "temperature": 1.0, "params": {"bits": 8}}
    assert quant_settings(compose_cfg(["quant=toy", "quant.params.bits=5"]))["params"] == {"bits": 5}
    assert quant_settings(compose_cfg(["quant=toy", "quant.k=7"]))["k"] == 0  # a knob it does not read: unused
    with pytest.raises(ConfigError, match="no parameter quant.params.levels"):
        quant_settings(compose_cfg(["quant=toy", "+quant.params.levels=3"]))
    with pytest.raises(ConfigError, match="quant.params.bits must be int"):
        quant_settings(compose_cfg(["quant=toy", "quant.params.bits=many"]))


IPC, SIZE, K = 2, 8, 4


def test_toy_codec_relabel_then_student_through_the_stages(tmp_path):
    """teacher -> recover (random_real) -> relabel with quant=toy -> one student epoch, all via run_stage."""
    from lpld.artifacts import images as images_artifact
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
        "quant=toy",
        "quant.params.bits=6",
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
    assert (images_artifact.path(cfg) / "manifest.json").exists()
    rcfg = compose_cfg(["stage=relabel", *ov])
    run_stage(rcfg)
    path = labels_artifact.path(rcfg)
    assert "_top1b6_" in path.name  # the codec's tag in the store key
    store = LabelStore.open(path, verify="full")
    assert store.manifest["quant"] == {"mode": NAME, "k": 0, "temperature": 1.0, "params": {"bits": 6}}
    acc = store.manifest["accounting"]
    assert acc["labels_bytes"] == store.manifest["num_rows"] * 2 == acc["components"]["top1"]
    assert int(store.read(0).top1[:, 1].max()) <= 63  # 6-bit probabilities
    scfg = compose_cfg(["stage=student", *ov])
    run_stage(scfg)
    recs = load_records(results_artifact.dir(scfg) / "results.jsonl")
    assert len(recs) == 1 and recs[0]["epochs"] == 1
    rec = recs[0]
    assert rec["quant"]["mode"] == NAME and display(rec["quant"]) == "top1@6bit"
    assert rec["label_bytes"] == acc["total"] and 0.0 <= rec["top1"] <= 1.0
    assert math.isfinite(float(rec["top1"]))


def test_nothing_outside_this_file_names_the_toy_codec():
    hits = [
        str(p.relative_to(REPO))
        for d in ("lpld", "conf")
        for p in (REPO / d).rglob("*")
        if p.is_file() and p.suffix in (".py", ".yaml") and any(s in p.read_text() for s in (NAME, "top1b", "Top1Int8"))
    ]
    assert hits == []
