"""``student.arch``: the project's models first, then any timm model name (cross-architecture students)."""

from __future__ import annotations

import pytest
from conftest import compose_cfg, make_tiny_chain

from lpld.config.student_run import student_model_cfg
from lpld.errors import ConfigError
from lpld.stages import run_stage


def test_registry_names_come_first_and_timm_names_fall_back():
    assert student_model_cfg(compose_cfg(["student.arch=resnet18"]))["name"] == "resnet18"
    assert student_model_cfg(compose_cfg(["student.arch=resnet10t"])) == {
        "name": "timm",
        "arch": "resnet10t",
        "pretrained": False,
    }
    with pytest.raises(ConfigError, match="student.arch='resnet1000' is neither a model of this project"):
        student_model_cfg(compose_cfg(["student.arch=resnet1000"]))


def test_a_timm_student_trains_on_a_label_store(tmp_path):
    from lpld.models import build_model

    m = build_model({"name": "timm", "arch": "resnet10t"}, num_classes=4, in_chans=3, img_size=8)
    assert m.lpld_classifier == "fc"
    _, ov = make_tiny_chain(tmp_path)
    out = run_stage(compose_cfg(["stage=student", *ov, "student.arch=resnet10t"]))
    assert 0.0 <= out["top1"] <= 1.0
