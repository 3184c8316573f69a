"""Distilled images that reach spawned ranks by path, not through the module's pickle (issue 20 item 4).

Under ``trainer=ddp_spawn`` Lightning pickles the Trainer and the LightningModule into every rank
(``torch.multiprocessing`` moves each CPU tensor of the pickle into shared memory: the uint8 image set, 28 GiB at
in1k IPC 200, went through ``/dev/shm``, which small containers do not have). A module that knows where its images
come from (:meth:`ReloadableImages.set_image_source`) leaves them out of its pickle, and each rank decodes them from
the image folder in ``setup`` (before the module is moved to its device), as per-rank launches (torchrun, srun) do:
the folder's manifest fingerprint is checked, so every rank holds the parent's pixels. A module without a source,
and every launch that pickles nothing (one process, torchrun, srun, Lightning's re-launch, ``fork``), is unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from lpld.core.io import ArtifactError


@dataclass(frozen=True)
class DistilledImagesSource:
    """Where a module's images come from: an image folder written by ``stage=recover``.

    Args:
        root: the folder (``lpld.artifacts.images.path``).
        fingerprint: its manifest's ``images_fingerprint`` when the parent process loaded it (None: not checked).
    """

    root: str
    fingerprint: str | None

    def load(self, workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images (N, C, H, W), labels (N,)) decoded from the folder; its files hashed against the manifest.

        Raises:
            ArtifactError: the folder changed since the parent loaded it (another fingerprint), or its files no
                longer match their manifest.
        """
        from lpld.core.images import load_distilled

        # the teacher was checked by the parent; the file hash against the manifest (verify) still runs
        images, labels, man = load_distilled(self.root, allow_other_teacher=True, verify=True, workers=workers)
        if self.fingerprint is not None and man.get("images_fingerprint") != self.fingerprint:
            raise ArtifactError(
                f"distilled images at {self.root} changed while the run was starting (fingerprint "
                f"{man.get('images_fingerprint')}, the launching process loaded {self.fingerprint}); do not rewrite "
                "an image folder a run is reading: rerun the command"
            )
        return images, labels


class ReloadableImages:
    """LightningModule mixin: the tensors named by ``image_attrs`` (plain attributes or buffers) stay out of the
    module's pickle when a source is set, and are loaded from it in ``setup`` of the process that unpickled it.

    ``image_attrs`` pairs with :meth:`DistilledImagesSource.load`'s (images, labels): the first name receives the
    images, the second (if any) the labels as int64. A subclass that defines ``setup`` calls ``super().setup(stage)``.
    """

    image_attrs: tuple[str, ...] = ("images_u8",)

    def set_image_source(self, source: DistilledImagesSource | None) -> None:
        """Where the images this module holds were loaded from (None: they travel in its pickle)."""
        self.__dict__["_image_source"] = source

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        if state.get("_image_source") is None:
            return state
        buffers = state.get("_buffers")
        if buffers is not None and any(n in buffers for n in self.image_attrs):
            state["_buffers"] = buffers = dict(buffers)
        for name in self.image_attrs:
            where = buffers if buffers is not None and name in buffers else state
            t = where[name]
            where[name] = torch.empty((0, *t.shape[1:]), dtype=t.dtype)  # an empty stand-in: same dtype and rank
        state["_images_pending"] = True
        return state

    def setup(self, stage: str) -> None:
        if self.__dict__.get("_images_pending"):
            self._load_images()
        super().setup(stage)  # type: ignore[misc]

    def _load_images(self) -> None:
        local = max(1, int(getattr(getattr(self, "_trainer", None), "num_devices", 1) or 1))
        workers = max(1, min(16, (os.cpu_count() or 1) // local))  # this node's CPUs shared by its ranks
        loaded = self.__dict__["_image_source"].load(workers=workers)
        for i, name in enumerate(self.image_attrs):
            setattr(self, name, loaded[i] if i == 0 else loaded[i].long())
        self.__dict__["_images_pending"] = False
