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


def test_a_hard_label_student_reports_zero_label_bytes_and_a_hard_marker(tmp_path):
    """Issue 19: the hard-label row showed the soft store's label bytes and sat in the plot as a soft point."""
    from lpld.artifacts import results
    from lpld.report.pareto import pareto_points
    from lpld.report.records import load_records
    from lpld.stages.pipeline import format_table

    _, ov = make_tiny_chain(tmp_path)
    for extra in ([], ["student=hard"]):
        run_stage(compose_cfg(["stage=student", *ov, *extra, "stage.results_name=hard"]))
    soft, hard = load_records(results.path(compose_cfg(["stage=student", *ov]), "hard"))
    assert soft["labels"] == "soft" and soft["label_only_bytes"] > 0
    assert hard["labels"] == "hard" and hard["label_only_bytes"] == 0
    # what it still reads from the store: the augmentation records it replays, the same as the soft student's
    assert hard["label_bytes"] == soft["label_bytes"] - soft["label_only_bytes"] > 0
    kinds = {p.kind for p in pareto_points([soft, hard])}
    assert kinds == {"soft", "hard"}
    row = format_table([hard]).splitlines()[-1].split("|")
    assert row[5].strip() == "hard" and row[6].strip() == "0.000"
