"""No code execution from files that can come from outside (issue 14, group 1).

Every loader is fed a file whose pickle calls ``os.system`` on load; the payload would create a marker
file. The loaders must refuse the file with a message naming the fix, and the marker must never appear.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lpld.models import build_model
from lpld.models.checkpoint import ModelCheckpointError, UnsafeCheckpointError
from lpld.models.convert_checkpoint import convert
from lpld.models.convert_checkpoint import main as convert_main

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cfg(**kw):
    return {"name": "convnet", "width": 8, "pretrained": False, "checkpoint": None, "tag": None, **kw}


def _payload_works(tmp_path: Path) -> None:
    """Sanity check of the harness: the full unpickler does run the payload."""
    marker = tmp_path / "sanity"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    marker.unlink()


def test_malicious_teacher_checkpoint_is_refused_and_never_runs(tmp_path):
    _payload_works(tmp_path)
    marker = tmp_path / "pwned"
    sd = build_model(_cfg(), 10, 3, 32).state_dict()
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": sd, "hyper_parameters": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as e:
        build_model(_cfg(checkpoint=str(path)), 10, 3, 32)
    assert not marker.exists(), "the checkpoint's pickled payload ran"
    msg = str(e.value)
    assert str(path) in msg and "python -m lpld.models.convert_checkpoint" in msg and "--trust" in msg


def test_pickled_module_is_refused_then_converted_by_explicit_trust(tmp_path):
    torch.manual_seed(0)
    src = build_model(_cfg(), 3, 1, 28).eval()
    legacy = tmp_path / "legacy.pt"
    torch.save(src, legacy)  # a whole pickled nn.Module: needs the full unpickler
    with pytest.raises(UnsafeCheckpointError):
        build_model(_cfg(checkpoint=str(legacy)), 3, 1, 28)
    out = tmp_path / "legacy.safetensors"
    # without --trust the converter reads weights-only too, so it refuses the same file
    assert convert_main([str(legacy), str(out)]) == 2 and not out.exists()
    assert convert_main([str(legacy), str(out), "--trust"]) == 0
    torch.manual_seed(1)
    dst = build_model(_cfg(checkpoint=str(out)), 3, 1, 28).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_converter_refuses_in_place_and_missing(tmp_path):
    p = tmp_path / "a.pt"
    torch.save({"w": torch.ones(2)}, p)
    with pytest.raises(ModelCheckpointError, match="is the input file"):
        convert(p, p)
    with pytest.raises(ModelCheckpointError, match="does not exist"):
        convert(tmp_path / "missing.pt", tmp_path / "b.safetensors")


def test_malicious_teacher_file_and_stats_file_are_refused(tmp_path):
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.core.bnstats import load_classwise_stats
    from lpld.core.io import ArtifactError

    marker = tmp_path / "pwned"
    teacher = tmp_path / "teacher.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": Payload(marker)}, teacher)
    with pytest.raises(ArtifactError, match="rerun stage=squeeze"):
        teacher_artifact.read(teacher)
    stats = tmp_path / "exact.pt"
    torch.save({"layers": [], "mean": [], "var": [], "count": Payload(marker), "teacher_fingerprint": "x"}, stats)
    with pytest.raises(ArtifactError, match="stage=stats"):
        load_classwise_stats(stats)
    assert not marker.exists()


def test_malicious_cifar_batch_is_refused(tmp_path):
    from lpld.data import build_dataset
    from lpld.data.errors import DatasetError

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "labels": [0, 1], "data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    ds_cfg = {"type": "cifar10", "name": "cifar10", "root": str(tmp_path), "num_classes": 10, "channels": 3}
    ds_cfg.update({"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    # the clean tree loads (numpy arrays and containers only: the restricted unpickler accepts it)
    assert len(build_dataset(ds_cfg, "train")) == 10
    marker = tmp_path / "pwned"
    bad = {"batch_label": "x", "labels": [0], "data": Payload(marker)}
    (folder / "data_batch_3").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DatasetError) as e:
        build_dataset(ds_cfg, "train")
    assert not marker.exists(), "the CIFAR pickle's payload ran"
    msg = str(e.value)
    assert "data_batch_3" in msg and ("posix.system" in msg or "os.system" in msg) and "dataset.download=true" in msg


def _calls(tree: ast.AST, attr: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
            yield node


def test_every_torch_load_and_resume_is_weights_only():
    """Static audit: every ``torch.load`` in lpld passes ``weights_only=True`` (the converter's explicit
    ``--trust`` branch excepted), and every ``Trainer.fit(ckpt_path=...)`` resumes weights-only."""
    offenders = []
    for path in sorted((REPO / "lpld").rglob("*.py")):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(REPO)
        for call in _calls(tree, "load"):
            if not (isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"):
                continue
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok and str(rel) != "lpld/models/convert_checkpoint.py":
                offenders.append(f"{rel}:{call.lineno} torch.load")
        for call in _calls(tree, "fit"):
            kw = {k.arg: k.value for k in call.keywords}
            if "ckpt_path" in kw:
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    offenders.append(f"{rel}:{call.lineno} fit(ckpt_path=...) without weights_only=True")
        for call in _calls(tree, "load_state_dict_from_url"):
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                offenders.append(f"{rel}:{call.lineno} load_state_dict_from_url")
    assert not offenders, "loads that could unpickle arbitrary objects:\n" + "\n".join(offenders)
