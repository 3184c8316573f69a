"""stage=relabel / stage=storage end to end on a tiny demo config (Hydra compose, fake images + teacher)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg

from lpld.artifacts import images as images_artifact
from lpld.artifacts import labels as labels_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.core.images import class_dir_name, images_fingerprint, save_png
from lpld.core.io import ArtifactError, atomic_torch_save, atomic_write_json, fingerprint_state_dict
from lpld.core.label_store import LabelStore, disk_bytes


def _setup(tmp_path, extra: list[str] | None = None):
    over = [
        f"paths.artifacts={tmp_path}",
        f"paths.log_dir={tmp_path}/logs",
        "stage=relabel",
        "logger=none",
        "ipc=2",
        "model.width=8",
        "relabel.epochs=3",
        "relabel.batch_size=8",
        "prune=10x",
        "quant=mr",
        "quant.k=3",
        *(extra or []),
    ]
    cfg = compose_cfg(over)
    from lpld.stages.common import build_teacher_model

    model = build_teacher_model(cfg).eval()
    fp = fingerprint_state_dict(model.state_dict())
    atomic_torch_save(teacher_artifact.path(cfg), {"state_dict": model.state_dict(), "fingerprint": fp})
    root = images_artifact.path(cfg)
    g = torch.Generator().manual_seed(0)
    for c in range(10):
        for i in range(2):
            save_png(
                root / class_dir_name(c, f"c{c}") / f"{i:05d}.png",
                torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=g),
            )
    atomic_write_json(
        root / "manifest.json",
        {"complete": True, "teacher_fingerprint": fp, "images_fingerprint": images_fingerprint(root), "ipc": 2},
    )
    return cfg


def test_relabel_stage_end_to_end(tmp_path, capsys):
    from lpld.stages import relabel, storage

    cfg = _setup(tmp_path)
    out = relabel.run(cfg)
    path = labels_artifact.path(cfg)
    store = LabelStore.open(path, verify="full")
    # 20 images, batch 8 -> 3 batches/epoch x 3 epochs = 9, 10x -> 1 batch kept (at least one)
    assert len(store) == 1 and out["batches"] == 1
    assert store.manifest["quant"]["mode"] == "mr" and store.manifest["prune"]["name"] == "10x"
    assert disk_bytes(path) == out["disk_bytes"]
    # rerun: complete store is reused, bytes unchanged
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    relabel.run(cfg)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    # storage stage on the store prints its accounting
    scfg = compose_cfg([f"paths.artifacts={tmp_path}", "stage=storage", f"stage.path={path}", "logger=none"])
    res = storage.run(scfg)
    assert res["total"] == store.manifest["accounting"]["total"]
    assert "topk_indices" in capsys.readouterr().out


def test_relabel_stage_refuses_other_teacher(tmp_path):
    from lpld.stages import relabel

    cfg = _setup(tmp_path)
    # overwrite the teacher with different weights: images were made by another teacher
    from lpld.stages.common import build_teacher_model

    torch.manual_seed(123)
    model = build_teacher_model(cfg)
    atomic_torch_save(teacher_artifact.path(cfg), {"state_dict": model.state_dict()})
    with pytest.raises(ArtifactError, match="allow_other_teacher"):
        relabel.run(cfg)


def test_storage_prediction_without_store(tmp_path, capsys):
    from lpld.stages import storage

    cfg = compose_cfg(
        [f"paths.artifacts={tmp_path}", "stage=storage", "dataset=in1k", "ipc=10", "logger=none", "prune=1x"]
    )
    res = storage.run(cfg)
    assert abs(res["paper"]["total_gib"] / 5.67 - 1) < 0.05
    assert abs(res["predicted"]["total"] / 2**30 / 5.67 - 1) < 0.05
    assert "paper convention" in capsys.readouterr().out


def test_relabel_stage_ensemble_teachers(tmp_path):
    """relabel.teachers: two teachers (model tags a, b) combined by mean logits; fingerprint covers both."""

    from lpld.core.relabel import EnsembleTeacher
    from lpld.stages import relabel
    from lpld.stages.common import build_teacher_model

    cfg = _setup(tmp_path, ["relabel.teachers=[{tag: a}, {tag: b}]"])
    for tag, seed in (("a", 1), ("b", 2)):
        sub = cfg.with_values({"model.tag": tag})
        torch.manual_seed(seed)
        m = build_teacher_model(sub)
        atomic_torch_save(teacher_artifact.path(sub), {"state_dict": m.state_dict()})
    teacher, fp, meta = relabel.load_relabel_teacher(cfg)
    assert isinstance(teacher, EnsembleTeacher) and len(teacher.models) == 2
    assert meta["teacher"] == ["convnet-a", "convnet-b"] and len(set(meta["teacher_fingerprints"])) == 2
    assert labels_artifact.key(cfg).startswith("ens2-")
    out = relabel.run(cfg)
    store = LabelStore.open(out["path"])
    assert store.manifest["teacher_fingerprint"] == fp and store.manifest["meta"]["ensemble"] == "mean_logits"
