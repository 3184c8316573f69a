"""StatsModule: one eval-mode pass of the teacher over the train set -> class-wise BN stats."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lpld.core.bnstats import EMA_MODES, ClasswiseBNStats
from lpld.core.io import atomic_torch_save
from lpld.lit.sharding import ShardSampler


class StatsModule(L.LightningModule):
    """Runs ``ClasswiseBNStats`` under a Trainer (``trainer.test``).

    Args:
        cfg: the resolved run config as a plain dict (names and scalars only, so the module
            can be rebuilt in spawned DDP ranks).
        out_path: where rank 0 writes the artifact.
    """

    def __init__(self, cfg: dict[str, Any], out_path: str):
        super().__init__()
        self.save_hyperparameters()
        from lpld.data.recipe import stats_settings
        from lpld.stages.common import load_teacher

        self.cfg = OmegaConf.create(cfg)
        self.teacher, self.teacher_fp = load_teacher(self.cfg)
        self.settings = stats_settings(self.cfg)
        st = self.settings
        self.acc = ClasswiseBNStats(
            self.teacher, int(self.cfg.dataset.num_classes), mode=st["mode"], momentum=st["momentum"]
        )
        self.out_path = out_path
        self.result: dict[str, Any] | None = None

    # -- data: each rank gets a disjoint stride of the train set, never padded ----------------
    def test_dataloader(self) -> DataLoader:
        from lpld.data import build_dataset
        from lpld.data.transforms import eval_transform, rrc_flip_transform, train_transform

        ds_cfg = self.cfg.dataset
        st = self.settings
        if not st["augment"]:
            tf = eval_transform(ds_cfg)
        else:  # official: the official pass's RandomResizedCrop + flip; else the teacher's own augmentation
            tf = rrc_flip_transform(ds_cfg) if st["mode"] == "official" else train_transform(ds_cfg)
        ds = build_dataset(ds_cfg, "train", transform=tf)
        self.class_names = list(ds.classes)
        n = len(ds)
        limit = self.cfg.stage.get("max_images")
        if limit:
            n = min(n, int(limit))
        seed = int(self.cfg.seed) if st["mode"] in EMA_MODES else None  # an EMA depends on the order
        sampler = ShardSampler(n, self.global_rank, self.trainer.world_size, seed=seed)
        nw = int(self.cfg.trainer.get("num_workers", 0))
        return DataLoader(
            ds,
            batch_size=st["batch_size"],
            sampler=sampler,
            num_workers=nw,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )

    def on_test_start(self) -> None:
        # The accumulators go to the teacher's device, as private copies: ddp_spawn pickles the
        # module through torch.multiprocessing, which puts CPU tensors in shared memory, so
        # without the clone every rank would add into the same buffers.
        dev = self.device
        a = self.acc
        a.count = a.count.to(dev).clone()
        a.s1 = [t.to(dev).clone() for t in a.s1]
        a.s2 = [t.to(dev).clone() for t in a.s2]
        a.shift = [t.to(dev).clone() for t in a.shift]
        if a.mode in EMA_MODES:
            a.run_mean = [t.to(dev).clone() for t in a.run_mean]
            a.run_var = [t.to(dev).clone() for t in a.run_var]
            if self.trainer.world_size > 1:
                a.batch_reduce = self._all_reduce
        self.teacher.eval()

    @staticmethod
    def _all_reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.acc.update(x, y)

    def on_test_epoch_end(self) -> None:
        if self.trainer.world_size > 1 and self.acc.mode == "exact":
            # additive float64 sums: a plain all-reduce SUM gives the 1-process result
            self.acc.load_sums([self._all_reduce(t) for t in self.acc.sums()])
        out = self.acc.finalize()
        out.update(
            teacher_fingerprint=self.teacher_fp,
            num_classes=int(self.cfg.dataset.num_classes),
            class_names=self.class_names,
            dataset=str(self.cfg.dataset.name),
            model=str(self.cfg.model.name),
        )
        out["missing_names"] = [self.class_names[i] for i in out["missing"]]
        self.result = out
        if self.trainer.is_global_zero:
            atomic_torch_save(self.out_path, out)
