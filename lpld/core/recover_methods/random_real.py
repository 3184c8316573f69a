"""Random real images ("A label is worth a thousand images"): ``ipc`` real train images per class, drawn with
the seed from the class's own generator (``lpld.core.rded.random_real_indices``)."""

from __future__ import annotations

from lpld.core.rded import random_real_indices
from lpld.core.recover_methods.base import BatchContext, ClassImages, RecoverMethod, register_recover_method


class RandomRealMethod(RecoverMethod):
    """Real train images, unchanged; one unit per class; no knobs beyond RecoverBase."""

    kind = "random_real"

    def run_batch(self, ctx: BatchContext, units: list[list[int]]) -> list[ClassImages]:
        assert ctx.real is not None, "random_real reads real train images"
        classes = [c for u in units for c in u]
        groups = [random_real_indices(ctx.real.targets, c, ctx.job.ipc, ctx.job.seed) for c in classes]
        return [ClassImages(c, x, {}) for c, x in zip(classes, ctx.real.load(groups), strict=True)]


register_recover_method(RandomRealMethod("random_real"))
