"""A small label generator shipped instead of a label store (issue 21, item 6).

A narrow ConvNet (:func:`build_generator`: ``depth`` blocks of 3x3 conv -> BatchNorm -> ReLU -> 2x2 average pool,
``width`` channels, then global average pooling and a linear layer to the C classes) is trained to reproduce the
teacher's outputs on the distilled images' augmentations (:func:`train_generator`): every batch of an
:class:`~lpld.core.online_labels.OnlineSchedule` (the image order and the crops / flips / CutMix of the student's
augmentation, from the generator's own seed), loss KL(softmax(t / T) || softmax(g / T)) x T^2 between the teacher's
logits t and the generator's g at the student's temperature T. The shipped generator is rounded to fp16
(:func:`round_fp16`), so what the student queries is what ships; its bytes are
``storage_accounting.model_bytes(generator, torch.float16)``.

The student then queries it online exactly as it would the teacher (``StudentModule(teacher=generator)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lpld.core import augment


def build_generator(num_classes: int, in_chans: int = 3, width: int = 32, depth: int = 3) -> nn.Module:
    """The narrow ConvNet (see the module docstring); ``depth`` >= 1 blocks of ``width`` channels."""
    if width < 1 or depth < 1:
        raise ValueError(f"a label generator needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
    layers: list[nn.Module] = []
    c = int(in_chans)
    for _ in range(int(depth)):
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.AvgPool2d(2, ceil_mode=True))
        c = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, int(num_classes))]
    return nn.Sequential(*layers)


@torch.no_grad()
def round_fp16(model: nn.Module) -> nn.Module:
    """Every floating parameter and buffer rounded to its fp16 value (kept in fp32): the shipped generator."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.copy_(t.half().float())
    return model


def _batch(images: torch.Tensor, schedule: Any, i: int) -> torch.Tensor:
    b = schedule.read(i)
    return augment.apply(images, b.index.to(images.device), b.aug, int(schedule.spec.aug.out_size))


def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(g / T)) x T^2, averaged over the batch."""
    t = float(temperature)
    p = F.log_softmax(teacher_logits.float() / t, dim=1)
    q = F.log_softmax(student_logits.float() / t, dim=1)
    return F.kl_div(q, p, reduction="batchmean", log_target=True) * t * t


@torch.no_grad()
def evaluate_generator(
    generator: nn.Module, teacher: nn.Module, images: torch.Tensor, schedule: Any, temperature: float
) -> dict[str, float]:
    """Mean divergence (:func:`kd_divergence`) and top-1 agreement of generator and teacher over ``schedule``."""
    generator.eval()
    teacher.eval()
    kl, agree, rows = 0.0, 0, 0
    for i in range(len(schedule)):
        x = _batch(images, schedule, i)
        g, t = generator(x).float(), teacher(x).float()
        kl += float(kd_divergence(g, t, temperature)) * x.shape[0]
        agree += int((g.argmax(1) == t.argmax(1)).sum())
        rows += x.shape[0]
    return {"kl": kl / max(1, rows), "top1_agreement": agree / max(1, rows), "rows": rows}


def train_generator(
    teacher: nn.Module,
    images: torch.Tensor,
    schedule: Any,
    temperature: float,
    *,
    passes: int = 1,
    width: int = 32,
    depth: int = 3,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a label generator on the teacher's logits over ``passes`` passes of ``schedule``.

    Args:
        teacher: the frozen teacher (eval mode; its logits are the targets).
        images: (N, C, H, W) float ``augment.to_model_input`` of the distilled images.
        schedule: an ``OnlineSchedule`` (``read(i)`` -> image indices + augmentation record) of the generator's seed.
        temperature: T of the student's targets (the loss matches the distributions at T).
        passes, width, depth, lr, weight_decay: the fit (Adam, cosine decay to 0 over all steps).
        seed: initialisation of the generator.

    Returns:
        (the generator rounded to fp16 values, in eval mode; {"loss": per-step losses, "steps"}).
    """
    teacher.eval()
    num_classes = int(schedule.spec.num_classes)
    with torch.random.fork_rng(devices=[]):  # the initialisation is drawn from `seed` alone; the global RNG is kept
        torch.manual_seed(int(seed))
        gen = build_generator(num_classes, int(images.shape[1]), width, depth)
    gen = gen.to(images.device)
    steps = int(passes) * len(schedule)
    opt = torch.optim.Adam(gen.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    losses: list[float] = []
    gen.train()
    for _ in range(int(passes)):
        for i in range(len(schedule)):
            x = _batch(images, schedule, i)
            with torch.no_grad():
                t = teacher(x).float()
            loss = kd_divergence(gen(x), t, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    gen.eval()
    return round_fp16(gen), {"loss": losses, "steps": steps}
