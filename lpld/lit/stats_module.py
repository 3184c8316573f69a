"""StatsModule: one eval-mode pass of the teacher over the train set -> class-wise BN stats."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from lpld.core.bnstats import EMA_MODES, ClasswiseBNStats
from lpld.core.io import atomic_torch_save


@dataclass(frozen=True)
class StatsJob:
    """The resolved settings of one stats pass (plain values, so the module pickles into DDP ranks).

    Attributes:
        dataset: the dataset config (plain dict) the train set is built from.
        model_name: the teacher's model name (stored in the artifact).
        mode: ``exact`` | ``official`` | ``ema`` (``lpld.core.bnstats``); ``momentum`` the EMA momentum.
        batch_size: images per batch over all ranks (the global batch: each of W ranks takes ``batch_size / W``
            rows of every batch, and in the EMA modes each running update sees the whole global batch).
        augment: the images are augmented (``official``: RandomResizedCrop + flip; else the train transform).
        seed: the teacher seed: orders the EMA modes' pass and keys each image's augmentation (one pass per teacher,
            shared by every run seed, as the official per-teacher statistics file).
        max_images: use only the first ``max_images`` train images (None: all).
        num_workers: DataLoader workers.
        out_path: where rank 0 writes the artifact.
    """

    dataset: dict[str, Any]
    model_name: str
    mode: str
    momentum: float
    batch_size: int
    augment: bool
    seed: int
    max_images: int | None
    num_workers: int
    out_path: str

    @property
    def num_classes(self) -> int:
        return int(self.dataset["num_classes"])


class StatsModule(L.LightningModule):
    """Runs ``ClasswiseBNStats`` under a Trainer (``trainer.test``).

    Args:
        teacher: the teacher network (eval mode is set at test start).
        teacher_fp: its fingerprint, stored in the artifact.
        job: what to compute and where to write it.
    """

    def __init__(self, teacher: torch.nn.Module, teacher_fp: str, job: StatsJob):
        super().__init__()
        # plain values: a logger's log_hyperparams (csv, wandb) cannot walk a frozen dataclass
        self.save_hyperparameters({"teacher_fp": teacher_fp, "job": asdict(job)})
        self.teacher, self.teacher_fp, self.job = teacher, teacher_fp, job
        self.acc = ClasswiseBNStats(self.teacher, job.num_classes, mode=job.mode, momentum=job.momentum)
        self.out_path = job.out_path
        self.result: dict[str, Any] | None = None

    # -- data: each rank gets its rows of every global batch; no image is seen twice ----------
    def test_dataloader(self) -> DataLoader:
        from lpld.data import build_dataset
        from lpld.data.epoch_seeded import EpochSeededDataset
        from lpld.data.transforms import eval_transform, rrc_flip_transform, train_transform

        job = self.job
        ds_cfg = job.dataset  # the dataset builders read any mapping
        if not job.augment:
            tf = eval_transform(ds_cfg)
        else:  # official: the official pass's RandomResizedCrop + flip; else the teacher's own augmentation
            tf = rrc_flip_transform(ds_cfg) if job.mode == "official" else train_transform(ds_cfg)
        ds = build_dataset(ds_cfg, "train", transform=tf)
        self.class_names = list(ds.classes)
        if job.augment:
            # each image's crop and flip drawn from (seed, index): the same whatever the workers, ranks or the
            # global RNG state left by earlier draws (the loader's worker seeds would otherwise decide them)
            ds = EpochSeededDataset(ds, job.seed)
        n = len(ds)
        if job.max_images:
            n = min(n, int(job.max_images))
        seed = job.seed if job.mode in EMA_MODES else None  # an EMA depends on the order
        world = int(self.trainer.world_size)
        check_stats_batch(job.batch_size, world)
        sampler = GlobalBatchShards(n, job.batch_size, self.global_rank, world, seed=seed)
        return DataLoader(
            PaddedRows(ds, n),
            batch_sampler=sampler,
            num_workers=job.num_workers,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )

    def on_test_start(self) -> None:
        # the accumulators go to the teacher's device as private copies (see ClasswiseBNStats.to_private)
        self.acc.to_private(self.device)
        if self.acc.mode in EMA_MODES and self.trainer.world_size > 1:
            self.acc.batch_reduce = self._all_reduce  # the EMA sees the global batch, as SyncBatchNorm would
        self.teacher.eval()

    @staticmethod
    def _all_reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y, valid = batch
        self.acc.update(x, y, valid)

    def on_test_epoch_end(self) -> None:
        if self.trainer.world_size > 1:
            if self.acc.mode == "exact":
                # additive float64 sums: a plain all-reduce SUM gives the 1-process result
                self.acc.load_sums([self._all_reduce(t) for t in self.acc.sums()])
            else:  # the running statistics are already global (batch_reduce); the image counts are per rank
                self.acc.count = self._all_reduce(self.acc.count)
        out = self.acc.finalize()
        out.update(
            teacher_fingerprint=self.teacher_fp,
            num_classes=self.job.num_classes,
            class_names=self.class_names,
            dataset=str(self.job.dataset["name"]),
            model=self.job.model_name,
            # the batch every EMA update saw, over `world_size` ranks (a pre-issue-20 multi-rank EMA file lacks it)
            global_batch=int(self.job.batch_size),
            world_size=int(self.trainer.world_size),
        )
        out["missing_names"] = [self.class_names[i] for i in out["missing"]]
        check_finite_stats(out)
        self.result = out
        if self.trainer.is_global_zero:
            atomic_torch_save(self.out_path, out)


def check_finite_stats(out: dict[str, Any]) -> None:
    """Refuse statistics with a NaN/inf mean or variance for a class that was seen (unseen classes are NaN on
    purpose and listed in ``missing``), naming the first class and layer, before anything is written.

    Raises:
        ConfigError: the teacher's activations are not finite (a NaN teacher, or a wrong dataset.mean/std).
    """
    from lpld.errors import ConfigError

    seen = out["count"] > 0
    for name, mean, var in zip(out["layers"], out["mean"], out["var"], strict=True):
        bad = ~(torch.isfinite(mean).all(1) & torch.isfinite(var).all(1)) & seen
        if bool(bad.any()):
            c = int(torch.nonzero(bad).flatten()[0])
            label = out["class_names"][c] if c < len(out.get("class_names", [])) else str(c)
            raise ConfigError(
                f"stage stats: the class-wise BatchNorm statistics of class {c} ({label}) at layer {name} are not "
                f"finite (NaN/inf mean or variance; {int(bad.sum())} class(es) affected); nothing was written. The "
                "teacher or its input is broken: check dataset.mean/std, and retrain the teacher with "
                "`python run.py stage=squeeze stage.overwrite=true` if its weights are not finite"
            )


def check_stats_batch(batch_size: int, world: int) -> int:
    """Rows per rank of the stats pass's global batch, refusing a world size that does not divide it.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of ``world``.
    """
    from lpld.dist import per_rank_batch
    from lpld.errors import ConfigError

    try:
        return per_rank_batch(int(batch_size), int(world), "stage.batch_size", unit="one batch of stage=stats")
    except ValueError as e:
        raise ConfigError(f"stage stats: {e}") from e


class GlobalBatchShards(Sampler[list[int]]):
    """Batch sampler: rank ``rank``'s rows of every global batch of the pass (at most ``B / W`` each; no image is
    served twice).

    The order (``randperm(n)`` from ``seed``, or ``range(n)``) is cut into global batches of ``global_batch``
    rows, as one process would; rank ``r`` takes rows ``r, r + W, ...`` of each. Every rank yields the same
    number of batches, ``ceil(n / global_batch)``, so per-batch collectives match: a rank whose share of the
    last (short) batch is empty gets one padding row, index ``i + n`` (see ``PaddedRows``), that counts nowhere.

    Args:
        n: images in the pass.
        global_batch: rows per batch over all ranks (divisible by ``world``).
        rank: this rank; world: number of ranks.
        seed: permute the order once with this seed (None: ``range(n)``).
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int | None = None):
        self.n, self.global_batch, self.rank, self.world, self.seed = int(n), int(global_batch), rank, world, seed

    def _order(self) -> list[int]:
        if self.seed is None:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order, G = self._order(), self.global_batch
        for start in range(0, self.n, G):
            rows = order[start : min(self.n, start + G)]
            mine = rows[self.rank :: self.world]
            yield mine if mine else [rows[0] + self.n]

    def __len__(self) -> int:
        return -(-self.n // self.global_batch)


class PaddedRows(Dataset):
    """``dataset[i]`` as ``(x, y, True)`` for ``i < n``; ``(x, y, False)`` of ``dataset[i - n]`` for a padding row."""

    def __init__(self, dataset: Any, n: int):
        self.dataset, self.n = dataset, int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Any, Any, bool]:
        x, y = self.dataset[i if i < self.n else i - self.n]
        return x, y, i < self.n
