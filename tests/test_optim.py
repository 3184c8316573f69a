"""The teacher's and the student's learning rate at every optimizer step equal a hand computation of their
own warm-up + cosine schedules (both now built by ``lpld.lit.optim``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lpld.lit.classifier import ClassifierModule
from lpld.lit.optim import LRSchedule, build_optimizer
from lpld.lit.student_module import StudentModule

TINY = {"name": "convnet", "width": 4, "depth": 1, "norm": "batch"}


def lrs(module, steps: int) -> list[float]:
    """lr of each of ``steps`` optimizer steps, from the module's own configure_optimizers."""
    out = module.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert out["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_teacher_schedule_counted_warmup_then_cosine():
    lr = 0.2
    m = ClassifierModule(
        TINY, 3, 1, 8, {"name": "sgd", "lr": lr, "weight_decay": 5e-4, "momentum": 0.9, "epochs": 5, "warmup_epochs": 1}
    )
    m._trainer = SimpleNamespace(estimated_stepping_batches=10)  # 10 steps over 5 epochs: W = 2
    # by hand: steps 0, 1 at lr (s + 1) / 2; then 0.5 (1 + cos(pi (s - 2) / 8)) for s = 2..9
    expected = [lr * 0.5, lr * 1.0] + [lr * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert expected[3] == pytest.approx(lr * 0.9619397662556434)
    assert lrs(m, 10) == pytest.approx(expected, rel=1e-12, abs=0)


def _student(scheduler: str, warmup_epochs: float = 0.5):
    optim = {
        "name": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.01,
        "warmup_epochs": warmup_epochs,
        "warmup_start": 0.01,
        "scheduler": scheduler,
    }
    return StudentModule(
        model_cfg=TINY,
        num_classes=3,
        in_chans=1,
        img_size=8,
        quant_mode="none",
        loss={"name": "kl"},
        temp={"t0": 4.0, "schedule": "none"},
        ca={"mode": "none"},
        optim=optim,
        epochs=3,
        steps_per_epoch=4,
        mean=(0.5,),
        std=(0.5,),
    )


@pytest.mark.parametrize("scheduler", ["cosine", "smooth_cosine", "constant"])
def test_student_schedule_warmup_from_fraction_then_decay(scheduler):
    lr = 1e-3
    # 12 steps, W = round(0.5 x 4) = 2: steps 0, 1 at lr (0.01 + 0.99 s / 2); then the decay at t = (s - 2) / 10
    period = {"cosine": 1.0, "smooth_cosine": 2.0}.get(scheduler)
    after = [1.0 if period is None else 0.5 * (1 + math.cos(math.pi * (s - 2) / 10 / period)) for s in range(2, 12)]
    expected = [lr * 0.01, lr * 0.505] + [lr * f for f in after]
    if scheduler == "cosine":
        assert expected[-1] == pytest.approx(lr * 0.024471741852423234)  # 0.5 (1 + cos(0.9 pi))
    assert lrs(_student(scheduler), 12) == pytest.approx(expected, rel=1e-12, abs=0)


def test_student_without_warmup_starts_at_full_lr_and_unknown_names_fail():
    assert lrs(_student("cosine", warmup_epochs=0), 1) == [pytest.approx(1e-3)]
    with pytest.raises(ValueError, match="student.scheduler="):
        _student("linear").configure_optimizers()
    with pytest.raises(ValueError, match="choose stage.optimizer="):
        build_optimizer("lion", [torch.zeros(1, requires_grad=True)], lr=0.1, key="stage.optimizer")
    with pytest.raises(ValueError, match="warm-up"):
        LRSchedule(10, 2, warmup="exponential")
