"""RecoverModule: runs the recover stage's device batches under a Lightning Trainer (``predict``).

Each predict "sample" is the index of one device batch (a list of units of classes). Rank r
of W takes batches r, r+W, ... (no padding, so no class is written twice); every rank writes
the PNGs and records of its own classes; after a barrier rank 0 writes the manifest. A batch
whose classes are all recorded for this config is skipped (resume).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lpld.core.images import quantize_images, write_class_images
from lpld.core.recover_job import RecoverJob, class_done, finalize_manifest, write_class_record
from lpld.core.recover_methods import BatchContext, get_recover_method
from lpld.lit.display import RecoverProgress, image_log_batches, log_images_uint8
from lpld.lit.sharding import ShardSampler


class RecoverModule(L.LightningModule):
    """Makes the distilled images of a :class:`lpld.core.recover_job.RecoverJob`: each device batch is one call of
    the job's method (``lpld.core.recover_methods``: ``run_batch``); this module writes the PNGs and records.

    Args:
        teacher: the teacher network the job was planned with.
        job: ``dataclasses.asdict`` of the RecoverJob (plain values only).
        dataset: the dataset config (plain dict); rded / random_real read real train images from it.
        num_workers: DataLoader workers for decoding real images.
    """

    def __init__(self, teacher: torch.nn.Module, job: dict[str, Any], dataset: dict[str, Any], num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters(ignore=["teacher"])
        self.job = RecoverJob(**job)
        self.dataset_cfg = dict(dataset)  # the dataset builders read any mapping
        self.num_workers = int(num_workers)
        self.teacher = teacher
        self.class_mean: list[torch.Tensor] | None = None
        self.class_var: list[torch.Tensor] | None = None
        if self.job.stats_path:
            stats = torch.load(self.job.stats_path, map_location="cpu", weights_only=True)
            self.class_mean = [m.float() for m in stats["mean"]]
            self.class_var = [v.float() for v in stats["var"]]
        self._real = None
        self._progress = None
        self._task = None
        self._log_step = 0

    # ------------------------------------------------------------------ data
    def predict_dataloader(self) -> DataLoader:
        n = len(self.job.batches)
        sampler = ShardSampler(n, self.global_rank, self.trainer.world_size)
        return DataLoader(list(range(n)), sampler=sampler, batch_size=None, num_workers=0)

    def _real_dataset(self):
        if self._real is None:
            from lpld.data import build_dataset
            from lpld.data.transforms import eval_transform

            ds_cfg = self.dataset_cfg
            self._real = build_dataset(ds_cfg, "train", transform=eval_transform(ds_cfg))
            if ds_cfg.get("jpeg_draft") and hasattr(self._real, "draft"):
                # the eval transform resizes then crops: a reduced-scale JPEG decode that stays >= the resize
                # side gives (nearly) the same input, much faster for files > 2x that side (README "GPU")
                from lpld.data.datasets import eval_draft_side

                self._real.draft = eval_draft_side(int(ds_cfg.image_size), float(ds_cfg.get("eval_crop_ratio") or 1.0))
        return self._real

    def _load_real(self, ds, groups: list[list[int]], chunk_images: int = 1024):
        """Decode the real images ``groups`` (one index list per class); yields one (n_g, C, H, W) tensor per group.

        Groups are read in chunks of about ``chunk_images`` images through one DataLoader each, with the
        preset's workers and pinned memory on a GPU, so file decoding runs in parallel (ImageNet-scale RDED
        decodes hundreds of candidate images per class) while at most one chunk is held in memory. Order
        and values are those of ``ds[i]`` in sequence.
        """
        nw = self.num_workers
        k = 0
        while k < len(groups):
            chunk = [groups[k]]
            while k + len(chunk) < len(groups) and sum(map(len, chunk)) + len(groups[k + len(chunk)]) <= chunk_images:
                chunk.append(groups[k + len(chunk)])
            k += len(chunk)
            flat = [int(i) for g in chunk for i in g]
            if nw <= 0 or len(flat) < 64:
                items = [ds[i][0] for i in flat]
            else:
                from torch.utils.data import Subset

                dl = DataLoader(
                    Subset(ds, flat),
                    batch_size=64,
                    shuffle=False,
                    num_workers=min(nw, -(-len(flat) // 64)),
                    pin_memory=self.device.type == "cuda",
                )
                items = [x for xb, _ in dl for x in xb]
            j = 0
            for g in chunk:
                yield torch.stack(items[j : j + len(g)])
                j += len(g)

    # ------------------------------------------------------------------ progress
    def on_predict_start(self) -> None:
        self.teacher.eval()
        if self.global_rank == 0:  # classes and iterations (done/total), loss, ETA: lpld.lit.display
            mine = [
                self.job.batches[i] for i in range(self.global_rank, len(self.job.batches), self.trainer.world_size)
            ]
            its = int(self.job.settings.get("iterations") or 0)  # methods that iterate (optimize) set it
            self._progress = RecoverProgress(self.job.method, sum(len(u) for b in mine for u in b), its, len(mine))

    def _advance(self, n: int, loss: float | None = None) -> None:
        if self._progress is not None:
            self._progress.classes(n, loss)

    # ------------------------------------------------------------------ work
    def predict_step(self, batch_index: int, batch_idx: int = 0) -> None:
        job = self.job
        units = job.batches[int(batch_index)]
        classes = [c for u in units for c in u]
        if all(class_done(job, c) for c in classes):
            self._advance(len(classes))
            return None
        t0 = time.perf_counter()
        results = get_recover_method(job.method).run_batch(self._context(), [list(u) for u in units])
        images_u8 = []
        for c, imgs, _losses in results:
            u8 = quantize_images(imgs, tuple(job.mean), tuple(job.std), job.settings)  # recover.quantize
            write_class_images(job.class_dir(c), u8, job.settings)  # recover.image_format (issue 20)
            images_u8.append(u8)
        # records last: a class counts as done only once all its images are on disk
        for c, _, losses in results:
            write_class_record(job, c, losses)
        tot = [r[2].get("total") for r in results if r[2].get("total") is not None]
        self._advance(len(classes), (sum(tot) / len(tot)) if tot else None)
        if self.logger is not None:
            m = {"recover/batch_seconds": time.perf_counter() - t0, "recover/classes_done_rank": len(classes)}
            if tot:
                m["recover/final_loss"] = sum(tot) / len(tot)
            self.logger.log_metrics(m, step=self._log_step)
            if job.log_images and self.global_rank == 0 and int(batch_index) in image_log_batches(len(job.batches)):
                log_images_uint8(
                    self.logger,
                    f"recover/batch_{int(batch_index):05d}",
                    torch.cat(images_u8),
                    step=self._log_step,
                    caption=f"classes {classes[0]}..{classes[-1]}",
                )
        return None

    def _context(self) -> BatchContext:
        """What the job's method may use for one device batch (real images are decoded only if it reads them)."""
        return BatchContext(
            job=self.job,
            teacher=self.teacher,
            device=self.device,
            real=_RealImages(self),
            class_mean=self.class_mean,
            class_var=self.class_var,
            on_step=self._on_step,
        )

    def _on_step(self, t: int, iterations: int, losses: Mapping[str, torch.Tensor]) -> None:
        """Progress of an optimising method: losses to the bar / logger every ``progress_every`` steps."""
        every = max(1, self.job.progress_every)
        if self._progress is not None:
            self._progress.step(t, iterations)
        if t % every and t != iterations - 1:
            return
        # one device->host copy every `progress_every` iterations (never per step)
        values = dict(zip(losses, torch.stack([v.mean() for v in losses.values()]).tolist(), strict=True))
        if self._progress is not None and "loss" in values:
            self._progress.step(t, iterations, values["loss"])
        if self.logger is not None:
            self.logger.log_metrics(
                {**{f"recover/{k}": v for k, v in values.items()}, "recover/iteration": t}, step=self._log_step
            )
        self._log_step += every

    # ------------------------------------------------------------------ end
    def on_predict_end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.trainer.strategy.barrier("recover_done")
        if self.global_rank == 0:
            finalize_manifest(self.job)
        self.trainer.strategy.barrier("recover_manifest")


class _RealImages:
    """The module's real train images as :class:`lpld.core.recover_methods.RealImages` (built on first use)."""

    def __init__(self, module: RecoverModule):
        self.module = module

    @property
    def targets(self) -> Sequence[int]:
        return self.module._real_dataset().targets

    def load(self, groups: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        return self.module._load_real(self.module._real_dataset(), list(groups))
