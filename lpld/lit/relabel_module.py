"""RelabelModule: replay the augmentation on the device, teacher forward, quantize, write, one rank each.

The distilled images live once on the module's device as uint8 (N, C, H, W) (a non-persistent
buffer: ``Trainer.predict`` moves it with the module; predict never wraps the module in DDP, so it
is never broadcast). The predict loop hands it ``RelabelItem`` s (``lpld.lit.relabel_datamodule``):
host-only groups of store positions with their image indices and augmentation records.
``transfer_batch_to_device`` leaves them on the host, so the records the writer stores never
visit the device (Lightning's default hook moved them to the GPU and the writer's ``.numpy()``
failed). ``predict_step`` then, for a group of G stored batches:

1. replays each batch on the device (``augment.apply`` on ``to_model_input`` of just that batch's
   images: elementwise, so the same values as converting the whole set first),
2. runs the teacher once on the G batches concatenated (eval mode: each row's logits are
   independent of the others; bit-identical to per-batch forwards on CPU, checked in tests),
3. quantizes the group's logits on the device (top-k / argmax / fp16 there) and moves the encoded
   labels to the host once per forward,
4. writes each batch's rows and commits every ``chunk`` batches (flush + progress file), so an
   interrupted run resumes at the last commit. ``lpld.core.label_store.finalize`` (rank 0, after the
   loop) hashes the arrays and marks the store complete.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from torch import nn

from lpld.core import augment, quant
from lpld.core.label_store import StoreWriter
from lpld.errors import ConfigError
from lpld.lit.spawn_images import ReloadableImages


class RelabelModule(ReloadableImages, L.LightningModule):
    """Wraps the (eval-mode, frozen) teacher for ``Trainer.predict``.

    Args:
        teacher: the teacher (or an ``EnsembleTeacher``); never trained here.
        store_path: the prepared store.
        images_u8: (N, C, H, W) uint8 distilled images (held once; moved with the module).
        mean, std: the dataset normalization (``augment.to_model_input``).
        chunk: batches between commits.

    With an image source (``set_image_source``) the images stay out of the module's pickle (ddp_spawn ranks load
    them from the folder: ``lpld.lit.spawn_images``).
    """

    def __init__(
        self,
        teacher: nn.Module,
        store_path: str | os.PathLike,
        images_u8: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        chunk: int = 32,
    ):
        super().__init__()
        if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
            raise ValueError(f"RelabelModule needs uint8 (N, C, H, W) images, got {images_u8.dtype} {images_u8.shape}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("images_u8", images_u8, persistent=False)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.store_path = str(store_path)
        self.chunk = int(chunk)
        if self.chunk < 1:  # the commit test below is `batches % chunk`
            raise ConfigError(f"stage.chunk={chunk!r} must be >= 1 (batches between commits); set stage.chunk=32")
        self._writer: StoreWriter | None = None
        self._n = 0

    def on_predict_start(self) -> None:
        self.teacher.eval()
        self._writer = StoreWriter(self.store_path, rank=int(self.global_rank))
        self._n = 0

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Keep ``RelabelItem`` s on the host: indices and records are tiny and are written from the host;
        the pixels are already on the device (``images_u8``)."""
        return batch

    def replay(self, index: torch.Tensor, rec: augment.AugRecord, out_size: int) -> torch.Tensor:
        """(B, C, S, S) float32 augmented batch on the module's device, from the uint8 images."""
        dev = self.images_u8.device
        idx = index.to(dev, non_blocking=True)
        # convert just this batch's images (elementwise: the same values as converting the whole set), in batch
        # order; no torch.unique, whose data-dependent size would block the host on a GPU every batch
        src = augment.to_model_input(self.images_u8.index_select(0, idx), self.mean, self.std)
        return augment.apply(src, torch.arange(idx.numel(), device=dev), rec, out_size)

    @torch.no_grad()
    def predict_step(self, batch: Any, batch_idx: int) -> None:
        w = self._writer
        assert w is not None
        if not batch.positions:  # a rank with nothing left to compute
            return None
        out = int(w.spec.aug.out_size)
        xs = [self.replay(idx, rec, out) for idx, rec in zip(batch.index, batch.records)]
        # an ensemble rescales each stored batch on its own (G-VBSM): tell it where the batches split
        kw = {"sizes": [int(i.numel()) for i in batch.index]} if getattr(self.teacher, "rescale", False) else {}
        logits = self.teacher(torch.cat(xs) if len(xs) > 1 else xs[0], **kw).float()
        enc = quant.encode(logits, w.spec.quant)  # quantized on the device; one host transfer per array per forward
        r = 0
        for i, idx, rec in zip(batch.positions, batch.index, batch.records):
            n = int(idx.numel())
            w.write(int(i), idx, rec, {k: v[r : r + n] for k, v in enc.items()})
            r += n
            self._n += 1
            if self._n % self.chunk == 0:
                w.commit()
        return None

    def on_predict_end(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
