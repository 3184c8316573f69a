"""A recover method of a new kind, defined in this file only, runs recover -> relabel through the stage glue.

"mean_image": image j of class c = the mean of the real train images of class c (eval transform, normalised)
+ ``noise`` x a Gaussian draw from the class's own generator. It registers its knob dataclass with the core
registry (``lpld.core.recover_methods``) and its Hydra option with the ConfigStore (group ``recover``), so no
file outside this test names it. Its plan groups classes in pairs, to show a method decides its units.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import REPO, compose_cfg, tiny_overrides, write_image_tree

from lpld.core.errors import ConfigError
from lpld.core.images import to_uint8
from lpld.core.jitter import make_generator
from lpld.core.recover_methods import (
    BatchContext,
    ClassImages,
    RecoverBase,
    RecoverMethod,
    get_recover_method,
    register_recover_method,
    unregister_recover_method,
)

NAME = "toy_mean_image"
N_CLASSES, PER_CLASS, SIZE, IPC = 4, 6, 8, 2


@dataclass
class MeanImageKnobs(RecoverBase):
    """Knobs of the toy method (the schema of its Hydra option)."""

    name: str = NAME
    noise: Any = 0.25  # std of the Gaussian added to the class mean (normalised space)


class MeanImageMethod(RecoverMethod):
    """Class mean of the real images + seeded noise; units are pairs of classes."""

    kind = "mean_image"

    def __init__(self) -> None:
        super().__init__(NAME, knobs=MeanImageKnobs, schema=NAME)
        self.units_seen: list[list[int]] = []

    def settings(self, knobs: dict[str, Any], num_classes: int | None) -> dict[str, Any]:
        s = super().settings(knobs, num_classes)  # name, precision and the knobs it adds: noise
        s["noise"] = float(s["noise"])
        if s["noise"] < 0:
            raise ConfigError(f"recover.noise must be >= 0, got {s['noise']}")
        return s

    def plan(self, classes, ipc, settings) -> list[list[int]]:
        return [list(classes[i : i + 2]) for i in range(0, len(classes), 2)]

    def run_batch(self, ctx: BatchContext, units: list[list[int]]) -> list[ClassImages]:
        self.units_seen += units
        classes = [c for u in units for c in u]
        t = torch.as_tensor(list(ctx.real.targets))
        groups = [torch.nonzero(t == c).flatten() for c in classes]
        return [
            ClassImages(c, mean_image(real, c, ctx.job.ipc, ctx.job.seed, ctx.job.settings["noise"]), {"total": 0.0})
            for c, real in zip(classes, ctx.real.load(groups), strict=True)
        ]


def mean_image(real: torch.Tensor, c: int, ipc: int, seed: int, noise: float) -> torch.Tensor:
    """(ipc, C, H, W): the mean of ``real`` (n, C, H, W) plus seeded noise."""
    g = make_generator(seed, NAME, c)
    return real.mean(0, keepdim=True) + noise * torch.randn((ipc, *real.shape[1:]), generator=g)


@pytest.fixture
def toy_method():
    """Register the method and its Hydra option (``recover=toy_mean_image``); remove both afterwards."""
    from hydra.core.config_store import ConfigStore

    method = register_recover_method(MeanImageMethod())
    cs = ConfigStore.instance()
    cs.store(group="recover", name=NAME, node=MeanImageKnobs)
    try:
        yield method
    finally:
        unregister_recover_method(NAME)
        cs.repo.get("recover", {}).pop(f"{NAME}.yaml", None)


def _overrides(tmp_path) -> list[str]:
    data = write_image_tree(tmp_path / "data", n_classes=N_CLASSES, per_class=PER_CLASS, size=SIZE)
    return [
        *tiny_overrides(tmp_path, data, n_classes=N_CLASSES, size=SIZE),
        f"recover={NAME}",
        f"ipc={IPC}",
        "seed=3",
        "trainer=cpu",
        "recover.classes_per_batch=4",
        "relabel.epochs=2",
        "relabel.batch_size=4",
    ]


def _save_teacher(cfg) -> str:
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.core.io import atomic_torch_save, fingerprint_state_dict
    from lpld.stages.common import build_teacher_model

    torch.manual_seed(0)
    model = build_teacher_model(cfg).eval()
    fp = fingerprint_state_dict(model.state_dict())
    atomic_torch_save(teacher_artifact.path(cfg), {"state_dict": model.state_dict(), "fingerprint": fp})
    return fp


def test_toy_recover_method_runs_recover_then_relabel(tmp_path, toy_method):
    from lpld.artifacts import images as images_artifact
    from lpld.artifacts import labels as labels_artifact
    from lpld.data import build_dataset
    from lpld.data.transforms import eval_transform
    from lpld.stages import run_stage

    ov = _overrides(tmp_path)
    cfg = compose_cfg(["stage=recover", *ov])
    fp = _save_teacher(cfg)
    out = run_stage(cfg)
    assert out["complete"] and out["classes_done"] == N_CLASSES
    assert toy_method.units_seen == [[0, 1], [2, 3]]  # the method's plan decided the units

    # the images are what the method defines: class mean + seeded noise, truncated to uint8, stored as JPEG
    d = images_artifact.path(cfg)
    assert d.name.startswith(f"{NAME}_ipc{IPC}_seed3_")
    images, labels, man = images_artifact.open(cfg, fp)
    # issue 20: every method's images carry how they are stored (JPEG q75 after truncation, the official files)
    storage = {"image_format": "jpeg", "quantize": "truncate", "jpeg_quality": 75}
    assert man["method"] == NAME and man["config"] == {"name": NAME, "precision": "32-true", "noise": 0.25, **storage}
    assert labels.tolist() == [c for c in range(N_CLASSES) for _ in range(IPC)]
    ds = build_dataset(cfg.dataset, "train", transform=eval_transform(cfg.dataset))
    mean, std = tuple(cfg.dataset.mean), tuple(cfg.dataset.std)
    for c in range(N_CLASSES):
        real = torch.stack([ds[int(i)][0] for i in range(len(ds)) if ds.targets[i] == c])
        u8 = to_uint8(mean_image(real, c, IPC, 3, 0.25), mean, std, "truncate")
        want = torch.stack([_jpeg_pixels(x) for x in u8])  # what the stored JPEG decodes to
        got = images[c * IPC : (c + 1) * IPC]
        assert torch.equal(got, want), c

    # a rerun finds the images complete; another noise is another artifact
    assert run_stage(cfg)["state"] == "done"
    other = compose_cfg(["stage=recover", *ov, "recover.noise=0.5"])
    assert images_artifact.path(other) != d
    with pytest.raises(ConfigError, match="recover.noise"):
        run_stage(compose_cfg(["stage=recover", *ov, "recover.noise=-1"]))

    # relabel on the toy images; the label store opens and holds the schedule
    rcfg = compose_cfg(["stage=relabel", *ov])
    res = run_stage(rcfg)
    store = labels_artifact.open(labels_artifact.path(rcfg), verify="full")
    assert len(store) == res["batches"] > 0
    assert store.manifest["images_fingerprint"] == man["images_fingerprint"]


def _jpeg_pixels(u8: torch.Tensor) -> torch.Tensor:
    """uint8 (C, H, W) -> the pixels its JPEG (PIL's default quality, the official save) decodes to."""
    import io

    import numpy as np
    from PIL import Image

    from lpld.core.images import jpeg_bytes

    arr = np.asarray(Image.open(io.BytesIO(jpeg_bytes(u8))))
    return torch.from_numpy((arr[:, :, None] if arr.ndim == 2 else arr).copy()).permute(2, 0, 1)


def test_toy_method_is_refused_once_unregistered(tmp_path):
    with pytest.raises(ConfigError, match="unknown recover method"):
        get_recover_method(NAME)


def test_nothing_in_lpld_names_the_toy_method():
    r = subprocess.run(
        ["grep", "-rIl", "-e", NAME, "-e", "MeanImage", "lpld", "conf"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.stdout == "", r.stdout
