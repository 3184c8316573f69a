"""Issue 20, item 10: small-image recipes.

The official small-image recover (SRe2L ``small_dataset/recover_cifar.py``) rolls the images by
``randint(0, 4)`` per step and does nothing else: no RandomResizedCrop, no flip. ``recover.augment=roll`` is that
path; the small presets (cifar10, cifar10_jpg, cifar100, fmnist, demo) and ``dataset=imagefolder`` at <= 64 px
resolve it, ``recover.augment=rrc`` is lpld's previous crop + flip + roll. The student side follows RDED's small-image
``argument.py``: T 20 with CutMix, batch 10/50/100 (x2 for 100 classes) at ipc 1/10/50, and a recipe batch never
exceeds the set size ``ipc x num_classes``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg
from torch import nn

from lpld.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------------------
# core: the crop-off path rolls and does nothing else
# ----------------------------------------------------------------------------------------------------------------------


def test_apply_roll_is_torch_roll_by_hand():
    from lpld.core.jitter import JitterPlan, apply_roll

    x = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)
    z = torch.zeros(1, dtype=torch.long)
    plan = JitterPlan(z, z, z + 3, z + 4, torch.zeros(1, dtype=torch.bool), z + 1, z + 2)
    # roll down by 1 row and right by 2 columns, written out by hand
    want = torch.tensor([[10.0, 11, 8, 9], [2, 3, 0, 1], [6, 7, 4, 5]])
    assert torch.equal(apply_roll(x, plan)[0, 0], want)


def test_apply_roll_equals_torch_roll_per_image_exactly_and_passes_gradients():
    from lpld.core.jitter import JitterPlan, apply_roll

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 7, 9, generator=g, requires_grad=True)
    dy, dx = torch.randint(0, 5, (5,), generator=g), torch.randint(0, 5, (5,), generator=g)
    z = torch.zeros(5, dtype=torch.long)
    out = apply_roll(x, JitterPlan(z, z, z + 7, z + 9, z.bool(), dy, dx))
    for b in range(5):
        assert torch.equal(out[b], torch.roll(x[b], (int(dy[b]), int(dx[b])), (1, 2)))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # a permutation: every pixel read exactly once


def test_crop_off_plan_is_the_whole_image_unflipped_with_the_same_rolls():
    from lpld.core.jitter import draw_jitter_plan, make_generator

    on = draw_jitter_plan(make_generator(3, "j"), 200, 32, 32, 0.08, 1.0, flip=True, roll=4)
    off = draw_jitter_plan(make_generator(3, "j"), 200, 32, 32, 0.08, 1.0, flip=True, roll=4, crop=False)
    assert (on.h < 32).any() and on.flip.any()  # the crop path does crop and flip
    assert (off.top == 0).all() and (off.left == 0).all() and (off.h == 32).all() and (off.w == 32).all()
    assert not off.flip.any()
    assert torch.equal(off.dy, on.dy) and torch.equal(off.dx, on.dx)
    assert set(off.dy.tolist()) == set(range(5))  # U{0..4}: every shift of randint(0, 4)


class _Recorder(nn.Module):
    """A tiny BN teacher that records every input batch it is given."""

    def __init__(self, classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(4, classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.fc(self.net(x))


@pytest.mark.parametrize("crop", [False, True])
def test_synthesis_crop_off_feeds_the_teacher_rolled_images_only(crop):
    """The recover loop with ``crop=False`` shows the teacher exactly torch.roll(x) of the current images (no
    resize, no flip); with the crop on, the same step is not a roll (the property can fail)."""
    from lpld.core.recover_loss import LossWeights
    from lpld.core.synthesis import SynthesisConfig, initial_images, plan_units, segment_plan, synthesize

    torch.manual_seed(0)
    model = _Recorder(3)
    model.eval()
    cfg = SynthesisConfig(
        iterations=6, lr=0.1, ipc=2, channels=1, image_size=12, weights=LossWeights(0.05, 10.0, 0.0, 0.0),
        pixel_min=(-3.0,), pixel_max=(3.0,), seed=1, rrc_scale_min=0.08, flip=True, roll=4, crop=crop,
    )  # fmt: skip
    units = plan_units([0, 1, 2], 2, "slot", False, 3)
    synthesize(model, units, cfg)
    x0 = torch.cat([initial_images(c, cfg) for c in (0, 1, 2)])  # class-major, as the layout
    # first step: the images are still the initialisation; image p*ipc + j is in segment j
    plans = [segment_plan(s, cfg) for s in units[0].segments]
    want = torch.stack(
        [torch.roll(x0[i], (int(plans[i % 2].dy[0]), int(plans[i % 2].dx[0])), (1, 2)) for i in range(6)]
    )
    assert torch.equal(model.seen[0], want) is (not crop)


# ----------------------------------------------------------------------------------------------------------------------
# config: the presets resolve the small-image recipe; the switches restore lpld's previous values
# ----------------------------------------------------------------------------------------------------------------------


def _rec(*o: str):
    from lpld.config import recover_settings

    return recover_settings(compose_cfg(["ipc=10", *o]))


def _temperature_and_batch(*o: str) -> tuple[float, int]:
    """T as the student resolves it, the batch as relabel writes the store with (the student replays it)."""
    from lpld.artifacts import labels as labels_artifact
    from lpld.config.student import student_settings

    t = student_settings(compose_cfg(["stage=student", *o]), {"epochs": 1, "granularity": "batch"})["temperature"]
    return t, labels_artifact.store_spec(compose_cfg(["stage=relabel", *o])).batch_size


@pytest.mark.parametrize(
    "ds", ["dataset=cifar10", "dataset=cifar10_jpg", "dataset=cifar100", "dataset=fmnist", "dataset=demo"]
)
def test_small_presets_recover_rolls_only(ds):
    s = _rec(ds)
    assert (s["augment"], s["jitter"]) == ("roll", 4)
    assert not {"rrc_scale_min", "rrc_scale_max", "flip"} & set(s)  # not read, so not part of the images' key
    old = _rec(ds, "recover.augment=rrc")  # the switch: lpld before
    assert "augment" not in old and (old["rrc_scale_min"], old["flip"], old["jitter"]) == (0.08, True, 4)


@pytest.mark.parametrize("ds", ["dataset=in1k", "dataset=tiny", "dataset=in21k"])
def test_large_presets_keep_the_crop_and_their_keys(ds):
    s = _rec(ds, "model=resnet18")
    assert "augment" not in s and (s["rrc_scale_min"], s["flip"]) == (0.08, True)
    assert _rec(ds, "model=resnet18", "recover.augment=rrc") == s  # rrc is the default: no key of its own


def test_recover_settings_reach_the_loop():
    from lpld.core.recover_methods.optimize import synthesis_config

    roll = synthesis_config(_rec("dataset=cifar10_jpg"), 10, 3, 32, [0.5] * 3, [0.25] * 3, 0)
    rrc = synthesis_config(_rec("dataset=cifar10_jpg", "recover.augment=rrc"), 10, 3, 32, [0.5] * 3, [0.25] * 3, 0)
    assert (roll.crop, roll.flip, roll.roll) == (False, False, 4)
    assert (rrc.crop, rrc.flip, rrc.rrc_scale_min) == (True, True, 0.08)


def test_cda_keeps_its_crop_curriculum_and_refuses_roll():
    s = _rec("dataset=cifar10_jpg", "recover=cda")
    assert "augment" not in s and s["cda"]["schedule"] == "cosine"
    with pytest.raises(ConfigError, match="recover.augment=rrc"):
        _rec("dataset=cifar10_jpg", "recover=cda", "recover.augment=roll")
    with pytest.raises(ConfigError, match="recover.augment must be rrc|roll"):
        _rec("dataset=cifar10_jpg", "recover.augment=crop")


IF = ["dataset=imagefolder", "dataset.num_classes=10", "model=convnet"]


def test_imagefolder_small_sizes_take_the_small_image_recover():
    s = _rec(*IF, "dataset.image_size=32")
    assert (s["augment"], s["jitter"], s["iterations"]) == ("roll", 4, 1000)
    big = _rec(*IF)  # 224 px: ImageNet's recipe, unchanged
    assert "augment" not in big and (big["jitter"], big["iterations"], big["rrc_scale_min"]) == (32, 4000, 0.08)
    old = _rec(*IF, "dataset.image_size=32", "dataset.recipe.size_table=null")  # the switch: lpld before
    assert "augment" not in old and (old["jitter"], old["iterations"]) == (32, 4000)
    assert _rec(*IF, "dataset.image_size=32", "recover.jitter=2")["jitter"] == 2  # the command line still wins


def test_imagefolder_between_the_official_sizes_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"image_size=128.*dataset\.recipe\.size_table=null"):
        _rec(*IF, "dataset.image_size=128")
    assert _rec(*IF, "dataset.image_size=128", "dataset.recipe.size_table=null")["jitter"] == 32


@pytest.mark.parametrize(
    "overrides,temperature,batch",
    [
        (["dataset=cifar10_jpg", "ipc=1"], 20.0, 10),  # RDED argument.py: 10 / 50 / 100, T 20 with CutMix
        (["dataset=cifar10_jpg", "ipc=10"], 20.0, 50),
        (["dataset=cifar10", "ipc=50"], 20.0, 100),
        (["dataset=cifar100", "ipc=10"], 20.0, 100),  # x2 for 100 classes
        (["dataset=demo", "ipc=10"], 4.0, 32),  # no official run: the demo keeps its CPU-tuned T and batch
        (["dataset=fmnist", "ipc=10"], 4.0, 32),
        ([*IF, "dataset.image_size=32", "ipc=10"], 20.0, 100),  # 128 capped at the set size, 10 x 10
        ([*IF, "dataset.image_size=32", "ipc=50"], 20.0, 128),
        ([*IF, "dataset.image_size=32", "ipc=10", "relabel.batch_size=128"], 20.0, 128),  # command line: not capped
        (["dataset=cifar10_jpg", "ipc=10", "dataset.recipe.student.temperature=4"], 4.0, 50),  # switch: old T
    ],
)
def test_student_temperature_and_batch(overrides, temperature, batch):
    assert _temperature_and_batch("model=convnet", *overrides) == (temperature, batch)


def test_size_table_entries_are_checked():
    from lpld.config.schema import unknown_keys

    cfg = compose_cfg(["dataset=imagefolder", "+dataset.recipe.size_table.1.recover.jiter=4"], raw=True)
    assert unknown_keys(cfg) == ["dataset.recipe.size_table.1.recover.jiter"]
    cfg = compose_cfg(["dataset=imagefolder", "+dataset.recipe.size_table.1.stduent.batch_size=4"], raw=True)
    assert unknown_keys(cfg) == ["dataset.recipe.size_table.1.stduent"]
    assert unknown_keys(compose_cfg(["dataset=imagefolder"], raw=True)) == []  # refuse is a valid entry key
