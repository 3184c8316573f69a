"""Issue 19: each dataset preset selects its official teacher (``model: teacher_${dataset}`` in conf/config.yaml), so
the design's first command ``python run.py stage=recover dataset=in1k ipc=50`` looks for torchvision's pretrained
ResNet-18, not a ConvNet to train on ImageNet; ``model=<name>`` on the command line still wins."""

from __future__ import annotations

import pytest
from conftest import REPO, compose_cfg, run_cli

from lpld.artifacts import teacher

OFFICIAL = {  # dataset -> (model.name, pretrained): LPLD Table 10 / the main-table scripts' teachers
    "in1k": ("resnet18", True),  # torchvision IMAGENET1K_V1
    "tiny": ("resnet18_cifar", False),  # modified ResNet-18 (3x3 stem, no max-pool); weights: a checkpoint file
    "in21k": ("resnet18", False),  # ResNet-18 on ImageNet-21K-P; weights: a checkpoint file
    "demo": ("convnet", False),  # no official teacher at these sizes: lpld's ConvNet (the default job's keys kept)
}


@pytest.mark.parametrize("dataset", sorted(OFFICIAL))
def test_a_dataset_preset_selects_its_official_teacher(dataset):
    exp = compose_cfg([f"dataset={dataset}", "paths.data=/nonexistent"])
    assert (exp.model.name, exp.model.pretrained) == OFFICIAL[dataset]


def test_every_dataset_preset_has_a_teacher_option():
    datasets = {p.stem for p in (REPO / "conf" / "dataset").glob("*.yaml")}
    teachers = {p.stem.removeprefix("teacher_") for p in (REPO / "conf" / "model").glob("teacher_*.yaml")}
    assert datasets == teachers, datasets ^ teachers


def test_the_command_line_model_wins_and_the_demo_teacher_key_is_unchanged():
    assert compose_cfg(["dataset=in1k", "model=convnet", "paths.data=/x"]).model.name == "convnet"
    assert compose_cfg(["dataset=in1k", "model.pretrained=false", "paths.data=/x"]).model.pretrained is False
    # the default job's teacher (and so every key below it) is the one it always was
    assert teacher.key(compose_cfg([])) == "convnet-62760812"


def test_the_first_command_shows_the_pretrained_teacher(tmp_path):
    r = run_cli(tmp_path, "stage=recover", "dataset=in1k", "ipc=50", "show=true")
    assert r.returncode == 0, r.stderr
    assert "read  teacher  pretrained" in r.stdout or "teacher  pretrained" in r.stdout, r.stdout[-2000:]
    assert "name: resnet18" in r.stdout
