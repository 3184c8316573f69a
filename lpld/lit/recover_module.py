"""RecoverModule: runs the recover stage's device batches under a Lightning Trainer (``predict``).

Each predict "sample" is the index of one device batch (a list of units of classes). Rank r
of W takes batches r, r+W, ... (no padding, so no class is written twice); every rank writes
the PNGs and records of its own classes; after a barrier rank 0 writes the manifest. A batch
whose classes are all recorded for this config is skipped (resume).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lpld.core.images import save_png, to_uint8
from lpld.core.recover_job import RecoverJob, class_done, finalize_manifest, write_class_record
from lpld.core.recover_loss import LossWeights, SegmentLosses
from lpld.core.recover_methods import get_recover_method
from lpld.core.synthesis import SynthesisConfig, Unit, plan_units, synthesize
from lpld.lit.display import log_images_uint8, progress_enabled
from lpld.lit.sharding import ShardSampler


class RecoverModule(L.LightningModule):
    """Synthesises the distilled images of a :class:`lpld.core.recover_job.RecoverJob`.

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
        self.dataset_cfg = OmegaConf.create(dataset)  # the dataset builders read a config node
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
        if self.global_rank == 0 and progress_enabled():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            mine = [
                self.job.batches[i] for i in range(self.global_rank, len(self.job.batches), self.trainer.world_size)
            ]
            total = sum(len(u) for b in mine for u in b)
            self._progress = Progress(
                TextColumn("[bold]recover {task.fields[method]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("classes"),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
            )
            self._task = self._progress.add_task("recover", total=total, method=self.job.method, loss="-")
            self._progress.start()

    def _advance(self, n: int, loss: float | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **({"loss": f"{loss:.4f}"} if loss is not None else {}))

    # ------------------------------------------------------------------ work
    def predict_step(self, batch_index: int, batch_idx: int = 0) -> None:
        job = self.job
        units = job.batches[int(batch_index)]
        classes = [c for u in units for c in u]
        if all(class_done(job, c) for c in classes):
            self._advance(len(classes))
            return None
        t0 = time.perf_counter()
        # one generator per recover-method kind (lpld.core.recover_methods)
        if job.kind == "optimize":
            results = self._optimize(units)
        elif job.kind == "rded":
            results = self._rded(classes)
        else:
            results = self._random_real(classes)
        images_u8 = []
        for c, imgs, _losses in results:
            u8 = to_uint8(imgs, tuple(job.mean), tuple(job.std))
            d = job.class_dir(c)
            for j in range(u8.shape[0]):
                save_png(d / f"{j:05d}.png", u8[j])
            images_u8.append(u8)
        # records last: a class counts as done only once all its PNGs are on disk
        for c, _, losses in results:
            write_class_record(job, c, losses)
        tot = [r[2].get("total") for r in results if r[2].get("total") is not None]
        self._advance(len(classes), (sum(tot) / len(tot)) if tot else None)
        if self.logger is not None:
            m = {"recover/batch_seconds": time.perf_counter() - t0, "recover/classes_done_rank": len(classes)}
            if tot:
                m["recover/final_loss"] = sum(tot) / len(tot)
            self.logger.log_metrics(m, step=self._log_step)
            if job.log_images and self.global_rank == 0:
                log_images_uint8(
                    self.logger,
                    f"recover/batch_{int(batch_index):05d}",
                    torch.cat(images_u8),
                    step=self._log_step,
                    caption=f"classes {classes[0]}..{classes[-1]}",
                )
        return None

    def _synthesis_config(self) -> SynthesisConfig:
        job, s = self.job, self.job.settings
        lo = tuple((0.0 - m) / sd for m, sd in zip(job.mean, job.std))
        hi = tuple((1.0 - m) / sd for m, sd in zip(job.mean, job.std))
        cda = s.get("cda") or {}
        return SynthesisConfig(
            iterations=int(s["iterations"]),
            lr=float(s["lr"]),
            ipc=job.ipc,
            channels=job.channels,
            image_size=job.image_size,
            weights=LossWeights(
                alpha=float(s["alpha"]),
                first_bn_multiplier=float(s["first_bn_multiplier"]),
                tv_l2=float(s["tv_l2"]),
                l2=float(s["l2"]),
            ),
            pixel_min=lo,
            pixel_max=hi,
            seed=job.seed,
            rrc_scale_min=float(s["rrc_scale_min"]),
            rrc_scale_max=float(s["rrc_scale_max"]),
            flip=bool(s["flip"]),
            roll=int(s["jitter"]),
            cda_schedule=cda.get("schedule"),
            cda_milestone=float(cda.get("milestone", 0.0)),
            betas=(float(s["betas"][0]), float(s["betas"][1])),
        )

    def _optimize(self, units: list[list[int]]) -> list[tuple[int, torch.Tensor, dict[str, float]]]:
        job = self.job
        meth = get_recover_method(job.method)
        scfg = self._synthesis_config()
        plan: list[Unit] = []
        for u in units:
            plan += plan_units(u, job.ipc, meth.batching, meth.classwise, job.settings.get("group_classes", 1))
        every = max(1, job.progress_every)

        def on_step(t: int, losses: SegmentLosses) -> None:
            if t % every and t != scfg.iterations - 1:
                return
            # one device->host copy every `progress_every` iterations (never per step)
            loss, ce, bn = torch.stack([losses.total.mean(), losses.ce.mean(), losses.bn.mean()]).tolist()
            if self._progress is not None:
                self._progress.update(self._task, loss=f"{loss:.4f}")
            if self.logger is not None:
                self.logger.log_metrics(
                    {"recover/loss": loss, "recover/ce": ce, "recover/bn": bn, "recover/iteration": t},
                    step=self._log_step,
                )
            self._log_step += every

        with torch.enable_grad():
            res = synthesize(
                self.teacher, plan, scfg, self.class_mean, self.class_var, device=self.device, on_step=on_step
            )
        out = []
        for r in res:
            for p, c in enumerate(r.classes):
                out.append((c, r.images[p * job.ipc : (p + 1) * job.ipc], r.class_loss.get(c, {})))
        return out

    def _rded(self, classes: list[int]) -> list[tuple[int, torch.Tensor, dict[str, float]]]:
        from lpld.core.rded import class_indices, rded_class_images, sample_class_indices

        job, r = self.job, self.job.settings["rded"]
        ds = self._real_dataset()
        groups = []
        for c in classes:
            n_c = len(class_indices(ds.targets, c))
            groups.append(
                sample_class_indices(ds.targets, c, min(int(r["candidates_per_class"]), n_c), job.seed, "rded")
            )
        out = []
        for c, real in zip(classes, self._load_real(ds, groups), strict=True):
            imgs, scores = rded_class_images(
                self.teacher,
                real,
                c,
                job.ipc,
                job.seed,
                factor=int(r["factor"]),
                crops_per_image=int(r["crops_per_image"]),
                crop_scale=tuple(r["crop_scale"]),
                device=self.device,
                style=str(r.get("style", "lpld")),  # records written before the switch used lpld's variant
            )
            out.append((c, imgs, {"total": float(-scores.mean()), "ce": float(-scores.mean())}))
        return out

    def _random_real(self, classes: list[int]) -> list[tuple[int, torch.Tensor, dict[str, float]]]:
        from lpld.core.rded import random_real_indices

        ds = self._real_dataset()
        groups = [random_real_indices(ds.targets, c, self.job.ipc, self.job.seed) for c in classes]
        return [(c, x, {}) for c, x in zip(classes, self._load_real(ds, groups), strict=True)]

    # ------------------------------------------------------------------ end
    def on_predict_end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self.trainer.strategy.barrier("recover_done")
        if self.global_rank == 0:
            finalize_manifest(self.job)
        self.trainer.strategy.barrier("recover_manifest")
