"""RDED (optimisation-free): stitch the teacher's most confident crops of real images (``lpld.core.rded``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lpld.core.errors import ConfigError
from lpld.core.rded import RDED_STYLES, class_indices, rded_class_images, sample_class_indices
from lpld.core.recover_methods.base import (
    PRECISION,
    BatchContext,
    ClassImages,
    RecoverBase,
    RecoverMethod,
    list_knob,
    register_recover_method,
)


@dataclass
class RdedKnobs:
    factor: int = 2  # patches per side (image_size must be divisible by it)
    candidates_per_class: int = 300  # real images sampled per class (RDED's mipc)
    crops_per_image: int = 5  # random crops scored per real image; the best represents it
    crop_scale: Any = list_knob(0.08, 1.0)  # RandomResizedCrop area range of the crops
    # official: RDED's square crops (size/factor), scored zero-padded, rank-interleaved tiling | lpld: 3:4-4:3
    # crops scored full size, consecutive
    style: str = "official"


@dataclass
class RecoverRded(RecoverBase):
    """RDED (optimisation-free): stitch the teacher's most confident real-image crops."""

    name: str = "rded"
    rded: RdedKnobs = field(default_factory=RdedKnobs)


class RdedMethod(RecoverMethod):
    """RDED's selection of real-image crops scored by the teacher; one unit per class."""

    kind = "rded"

    def settings(self, knobs: Mapping[str, Any], num_classes: int | None) -> dict[str, Any]:
        r = knobs["rded"]
        cs = list(r["crop_scale"])
        out = {
            "factor": int(r["factor"]),
            "candidates_per_class": int(r["candidates_per_class"]),
            "crops_per_image": int(r["crops_per_image"]),
            "crop_scale": [float(cs[0]), float(cs[1])],
            "style": str(r["style"]),
        }
        if out["factor"] < 1 or out["crops_per_image"] < 1:
            raise ConfigError("recover.rded.factor and recover.rded.crops_per_image must be >= 1")
        if out["style"] not in RDED_STYLES:
            raise ConfigError(f"recover.rded.style must be official|lpld, got {out['style']!r}")
        return {"name": self.name, "precision": PRECISION, "rded": out}

    def run_batch(self, ctx: BatchContext, units: list[list[int]]) -> list[ClassImages]:
        job, r = ctx.job, ctx.job.settings["rded"]
        assert ctx.real is not None, "rded reads real train images"
        targets = ctx.real.targets
        classes = [c for u in units for c in u]
        groups = []
        for c in classes:
            n_c = len(class_indices(targets, c))
            groups.append(sample_class_indices(targets, c, min(int(r["candidates_per_class"]), n_c), job.seed, "rded"))
        out = []
        for c, real in zip(classes, ctx.real.load(groups), strict=True):
            imgs, scores = rded_class_images(
                ctx.teacher,
                real,
                c,
                job.ipc,
                job.seed,
                factor=int(r["factor"]),
                crops_per_image=int(r["crops_per_image"]),
                crop_scale=tuple(r["crop_scale"]),
                device=ctx.device,
                style=str(r.get("style", "lpld")),  # records written before the switch used lpld's variant
            )
            out.append(ClassImages(c, imgs, {"total": float(-scores.mean()), "ce": float(-scores.mean())}))
        return out


register_recover_method(RdedMethod("rded", knobs=RecoverRded, schema="rded"))
