"""Methods that optimise images from noise by matching BN statistics (LPLD Eq. 6; SRe2L Eq. 3; CDA).

``batching`` ``class``: each class is optimised on its own (a unit = one class); ``slot``: ``group_classes``
classes share a batch, SRe2L-style (a unit = one group). ``classwise``: the BN targets are the class-wise
statistics of stage=stats (LPLD Eq. 3) rather than the teacher's global running statistics. The loop itself is
:func:`lpld.core.synthesis.synthesize`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from lpld.core.errors import ConfigError
from lpld.core.recover_loss import LossWeights, SegmentLosses
from lpld.core.recover_methods.base import (
    PRECISION,
    BatchContext,
    ClassImages,
    RecoverBase,
    RecoverMethod,
    recipe_knob,
    register_recover_method,
)
from lpld.core.synthesis import BATCHING, SynthesisConfig, Unit, plan_units, synthesize

CDA_SCHEDULES = ("step", "linear", "cosine")
# per-step augmentation of the images being optimised: ``rrc`` = RandomResizedCrop(rrc_scale_min..max) + flip + roll
# (LPLD / SRe2L ImageNet and Tiny scripts); ``roll`` = the roll alone (SRe2L small_dataset/recover_cifar.py)
AUGMENTS = ("rrc", "roll")

# ----------------------------------------------------------------------------------------------------------------------
# knobs (conf/recover/{lpld,lpld_c,sre2l,cda}.yaml extend these)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RecoverOptimize(RecoverBase):
    """Methods that optimise images from noise by BN matching (lpld, lpld_c; LPLD Eq. 6, Appendix C)."""

    # null = dataset.recipe.recover.<key> (Appendix C, Tables 11/14/17), else the fallback
    iterations: int | None = recipe_knob(1000)
    lr: float | None = recipe_knob(0.1)
    alpha: float | None = recipe_knob(0.05, "BN-matching weight (Eq. 6 alpha)")
    first_bn_multiplier: float | None = recipe_knob(10.0, "extra weight of the first BN layer (SRe2L-family code: 10)")
    tv_l2: float | None = recipe_knob(1.0e-4, "total-variation L2 prior")
    l2: float | None = recipe_knob(1.0e-5, "image L2-norm prior")
    jitter: int | None = recipe_knob(4, "max random roll in pixels per step")
    betas: Any = recipe_knob([0.5, 0.9], "Adam betas")
    augment: str | None = recipe_knob("rrc", "per-step augmentation: rrc (crop + flip + roll) | roll (roll only)")
    rrc_scale_min: float = 0.08  # RandomResizedCrop area range per step
    rrc_scale_max: float = 1.0
    flip: bool = True  # random horizontal flip per step
    init: str = "random"  # Gaussian noise (the only initialisation of Table 11)
    precision: str = PRECISION  # the math is defined in fp32 (batching equivalence, resume equality)
    # class-wise statistics file to read: null = the mode stage=stats writes for this dataset (recipe.stats.mode)
    stats_mode: str | None = None


@dataclass
class RecoverSlot(RecoverOptimize):
    """SRe2L-style methods: a batch holds image j of every class of a group (sre2l; Eq. 3)."""

    name: str = "sre2l"
    group_classes: int | None = None  # null = min(num_classes, 100) (SRe2L's batch of 100 classes)


@dataclass
class CdaSchedule:
    schedule: str = "cosine"  # step | linear | cosine
    milestone: float = 1.0  # fraction of the iterations spent annealing (CDA/README.md runs: --milestone 1)


@dataclass
class RecoverCda(RecoverSlot):
    """CDA: SRe2L + a curriculum on RandomResizedCrop's lower scale bound."""

    name: str = "cda"
    cda: CdaSchedule = field(default_factory=CdaSchedule)


# the knobs a recipe may set (recover.<key> > ipc_table > dataset recipe > fallback)
RECIPE_KEYS = tuple(f.name for f in fields(RecoverOptimize) if "recipe" in f.metadata)
_OPT_KEYS = tuple(k for k in RECIPE_KEYS if k != "augment")  # always in the settings (augment only when roll)


# ----------------------------------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------------------------------


class OptimizeMethod(RecoverMethod):
    """Images synthesised from noise (``lpld.core.synthesis``): ``batching`` class | slot, ``classwise``."""

    kind = "optimize"

    def __init__(self, name: str, batching: str, classwise: bool, knobs: type, schema: str):
        if batching not in BATCHING:
            raise ValueError(f"an optimize method needs batching in {BATCHING} ({name})")
        super().__init__(name, knobs=knobs, schema=schema, classwise=classwise)
        self.batching = batching

    def as_dict(self) -> dict[str, Any]:
        """``{"kind", "batching", "classwise"}`` as the recover stage's table used them."""
        return {"kind": self.kind, "batching": self.batching, "classwise": self.classwise}

    def settings(self, knobs: Mapping[str, Any], num_classes: int | None) -> dict[str, Any]:
        s: dict[str, Any] = {"name": self.name, **_optimize(knobs)}
        if self.batching == "slot":
            g = knobs.get("group_classes")
            if g is None and num_classes is None:
                raise ConfigError(
                    f"recover={self.name} groups classes by recover.group_classes (default min(num_classes, 100)) "
                    "but dataset.num_classes is not set; set dataset.num_classes=<N> or recover.group_classes=<G>"
                )
            s["group_classes"] = int(g) if g is not None else min(int(num_classes), 100)
            if s["group_classes"] < 1:
                raise ConfigError("recover.group_classes must be >= 1")
        if "cda" in knobs:
            if s.get("augment") == "roll":
                raise ConfigError(
                    "recover=cda is a curriculum on the RandomResizedCrop floor, but recover.augment resolved to "
                    "'roll' (no crop; the small-image recipe); set recover.augment=rrc"
                )
            s["cda"] = _cda(knobs["cda"])
        return s

    def plan(self, classes: Sequence[int], ipc: int, settings: Mapping[str, Any]) -> list[list[int]]:
        units = plan_units(classes, ipc, self.batching, self.classwise, settings.get("group_classes", 1))
        return [list(u.classes) for u in units]

    def run_batch(self, ctx: BatchContext, units: list[list[int]]) -> list[ClassImages]:
        job = ctx.job
        scfg = synthesis_config(job.settings, job.ipc, job.channels, job.image_size, job.mean, job.std, job.seed)
        plan: list[Unit] = []
        for u in units:
            plan += plan_units(u, job.ipc, self.batching, self.classwise, job.settings.get("group_classes", 1))
        hook = ctx.on_step

        def on_step(t: int, losses: SegmentLosses) -> None:
            if hook is not None:
                hook(t, scfg.iterations, {"loss": losses.total, "ce": losses.ce, "bn": losses.bn})

        with torch.enable_grad():  # predict runs under no_grad
            res = synthesize(ctx.teacher, plan, scfg, ctx.class_mean, ctx.class_var, device=ctx.device, on_step=on_step)
        out = []
        for r in res:
            for p, c in enumerate(r.classes):
                out.append(ClassImages(c, r.images[p * job.ipc : (p + 1) * job.ipc], r.class_loss.get(c, {})))
        return out


def synthesis_config(
    s: Mapping[str, Any],
    ipc: int,
    channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
) -> SynthesisConfig:
    """The loop settings of resolved optimize settings ``s`` for a dataset geometry (pixel bounds from mean/std)."""
    lo = tuple((0.0 - m) / sd for m, sd in zip(mean, std))
    hi = tuple((1.0 - m) / sd for m, sd in zip(mean, std))
    cda = s.get("cda") or {}
    return SynthesisConfig(
        iterations=int(s["iterations"]),
        lr=float(s["lr"]),
        ipc=ipc,
        channels=channels,
        image_size=image_size,
        weights=LossWeights(
            alpha=float(s["alpha"]),
            first_bn_multiplier=float(s["first_bn_multiplier"]),
            tv_l2=float(s["tv_l2"]),
            l2=float(s["l2"]),
        ),
        pixel_min=lo,
        pixel_max=hi,
        seed=seed,
        rrc_scale_min=float(s.get("rrc_scale_min", 0.08)),
        rrc_scale_max=float(s.get("rrc_scale_max", 1.0)),
        flip=bool(s.get("flip", False)),
        roll=int(s["jitter"]),
        crop=s.get("augment", "rrc") == "rrc",
        cda_schedule=cda.get("schedule"),
        cda_milestone=float(cda.get("milestone", 0.0)),
        betas=(float(s["betas"][0]), float(s["betas"][1])),
    )


def _optimize(k: Mapping[str, Any]) -> dict[str, Any]:
    """The BN-matching optimisation knobs (Eq. 6, Appendix C), validated."""
    s: dict[str, Any] = {key: k[key] for key in _OPT_KEYS}
    s["betas"] = [float(b) for b in s["betas"]]
    for key in ("iterations", "jitter"):
        s[key] = int(s[key])
    for key in ("lr", "alpha", "first_bn_multiplier", "tv_l2", "l2"):
        s[key] = float(s[key])
    # not recipe knobs: a recipe's rrc/flip/init/precision entry is not read (lpld.config.recover)
    s["rrc_scale_min"] = float(k["rrc_scale_min"])
    s["rrc_scale_max"] = float(k["rrc_scale_max"])
    s["flip"] = bool(k["flip"])
    s["init"] = str(k["init"])
    s["precision"] = str(k["precision"])
    if s["iterations"] < 1 or s["lr"] <= 0 or s["jitter"] < 0:
        # 0 iterations would write the Gaussian-noise initialisation as finished distilled images
        bad = {key: s[key] for key in ("iterations", "lr", "jitter")}
        raise ConfigError(
            f"recover.iterations >= 1, recover.lr > 0 and recover.jitter >= 0 are required, got {bad}; set e.g. "
            "recover.iterations=1000 (for real images without synthesis use recover=random_real)"
        )
    if not 0 < s["rrc_scale_min"] <= s["rrc_scale_max"] <= 1:
        raise ConfigError("need 0 < recover.rrc_scale_min <= recover.rrc_scale_max <= 1")
    augment = str(k.get("augment") or "rrc")
    if augment not in AUGMENTS:
        raise ConfigError(f"recover.augment must be {'|'.join(AUGMENTS)}, got {augment!r}")
    if augment == "roll":
        # the roll alone: crop and flip knobs are not read, so they are not part of the images' identity; `rrc` adds
        # no key, so images made before this knob keep their keys
        for key in ("rrc_scale_min", "rrc_scale_max", "flip"):
            del s[key]
        s["augment"] = "roll"
    if s["init"] != "random":
        raise ConfigError(f"recover.init={s['init']} is not supported; the only initialisation is 'random' (Table 11)")
    return s


def _cda(node: Mapping[str, Any]) -> dict[str, Any]:
    out = {"schedule": str(node["schedule"]), "milestone": float(node["milestone"])}
    if out["schedule"] not in CDA_SCHEDULES or not 0 <= out["milestone"] <= 1:
        raise ConfigError("recover.cda.schedule must be step|linear|cosine and recover.cda.milestone in [0, 1]")
    return out


register_recover_method(OptimizeMethod("lpld", "class", True, RecoverOptimize, "optimize"))
register_recover_method(OptimizeMethod("lpld_c", "class", False, RecoverOptimize, "optimize"))
register_recover_method(OptimizeMethod("sre2l", "slot", False, RecoverSlot, "slot"))
register_recover_method(OptimizeMethod("cda", "slot", False, RecoverCda, "cda"))
