"""Class-wise BN statistics: ``<teacher base>/stats/<mode>_<8 hex>.pt`` (written by stage=stats, read by recover).

Identity: the teacher key, the resolved stats settings (mode, momentum, batch size, augmentation), the
image limit ``stage.max_images`` (a quick 64-image pass is never taken for the full one), the pass's
precision and, for the order-dependent EMA modes (official / ema), the seed that orders the pass and keys its
augmentation: the teacher seed (``stats_seed``), so all run seeds of a sweep share one pass per teacher, as the
official scripts compute one statistics file per teacher.
The consumer (recover) does not set the producer's ``stage.*`` knobs, so it opens the full default pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lpld.artifacts import teacher
from lpld.artifacts.base import dataset_name, get, root, sign, under
from lpld.config.frozen import Experiment, once
from lpld.core.io import ArtifactError

EMA_MODES = ("official", "ema")  # lpld.core.bnstats.EMA_MODES: the pass's order changes the result


@dataclass(frozen=True)
class StatsSpec:
    dataset: str
    teacher: str  # teacher key
    mode: str
    momentum: float
    batch_size: int
    augment: bool
    max_images: int | None
    precision: str
    order_seed: int | None  # the pass's order / augmentation seed (EMA modes only): ``stats_seed``

    def key(self) -> str:
        return f"{self.mode}_{sign(self.__dict__)}"

    def path(self, artifacts: Path) -> Path:
        return under(Path(artifacts), self.dataset, self.teacher, "stats", f"{self.key()}.pt")


def _precision(exp: Any) -> str:
    """The stats pass's precision: ``trainer.stage_precision.stats`` > ``trainer.precision``."""
    return str(get(exp, "trainer.stage_precision.stats") or get(exp, "trainer.precision", "32-true"))


@once
def spec(exp: Experiment) -> StatsSpec:
    from lpld.config import stats_settings

    st = stats_settings(exp)  # the stats stage's knobs under stage=stats, the default pass from any other stage
    return StatsSpec(
        dataset=dataset_name(exp),
        teacher=teacher.key(exp),
        mode=str(st["mode"]),
        momentum=float(st["momentum"]),
        batch_size=int(st["batch_size"]),
        augment=bool(st["augment"]),
        max_images=st.get("max_images"),
        precision=_precision(exp),
        order_seed=stats_seed(exp) if st["mode"] in EMA_MODES else None,
    )


@once
def stats_seed(exp: Experiment) -> int:
    """The seed of the stats pass: ``teacher_seed`` (as the teacher's own training), else the run seed."""
    return int(get(exp, "teacher_seed", exp.seed))


@once
def path(exp: Experiment) -> Path:
    return spec(exp).path(root(exp))


def open(exp: Experiment, teacher_fingerprint: str | None, allow_other_teacher: bool = False) -> dict[str, Any]:  # noqa: A001
    """The stats of this config, checked against the teacher (``lpld.core.bnstats.load_classwise_stats``)."""
    from lpld.core.bnstats import load_classwise_stats

    p = path(exp)
    if not p.exists():
        raise ArtifactError(
            f"no class-wise BN statistics at {p}; run `python run.py stage=stats dataset={exp.dataset.name} "
            f"model={exp.model.name}` with the same overrides first (or recover.stats_path=/path/to/stats.pt)"
            + _missing_hint(exp)
        )
    return load_classwise_stats(p, teacher_fingerprint, allow_other_teacher=allow_other_teacher)


def _missing_hint(exp: Experiment) -> str:
    from lpld.artifacts.catalog import missing_hint

    return missing_hint(exp, "stats", spec(exp))


def prepare(out: Path, teacher_fingerprint: str, mode: str, overwrite: bool) -> str:
    """Rank 0 of stage=stats: ``"reuse"`` finished stats of this teacher, or ``"compute"`` (after moving an
    overwritten file aside). Takes the file's lock; the caller releases it after writing (or on reuse here)."""
    from lpld.artifacts import overwrite as overwrite_artifact
    from lpld.core.io import acquire_lock, aside_path, release_lock

    acquire_lock(out, "class-wise stats")  # one writer per stats file (released by the caller, or at exit)
    if out.exists() and not overwrite:
        try:
            old = torch.load(out, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(
                f"{out} is corrupt ({e}); rerun `python run.py stage=stats stage.overwrite=true` to recompute it"
            ) from e
        same = isinstance(old, dict) and old.get("teacher_fingerprint") == teacher_fingerprint
        if same and old.get("mode") == mode:
            from lpld.core.bnstats import check_global_batch

            check_global_batch(old, out)  # an EMA file from before the global-batch fix is not reused (issue 20)
            release_lock(out)
            return "reuse"
        raise ArtifactError(
            f"{out} holds stats for another teacher or stage.mode; rerun with stage.overwrite=true to replace them "
            f"(the old file is kept as {out.name}.replaced until the new one is written)"
        )
    if out.exists() or aside_path(out).exists():
        # stage.overwrite=true: moved aside only once the pass has started (lpld.stages.stats), back if it fails,
        # deleted once the new stats are written
        overwrite_artifact.defer(out)
    return "compute"
