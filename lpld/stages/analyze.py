"""stage=analyze: diversity of distilled datasets (LPLD Sec. 3.2) and the Eq. 8 update bound.

For each distilled image folder (``stage.methods`` at ``lpld.artifacts.images.path`` plus ``stage.image_dirs``) and a
seeded per-class sample of the real train set, the teacher's penultimate features give

* within-class feature cosine similarity (Eq. 4; Table 1: mean ± std over classes; lower = more diverse),
* MMD^2 between real and synthetic features (Eq. 5; Fig. 3), one Gaussian bandwidth for all methods
  (median heuristic on the real features unless ``stage.mmd_bandwidth`` is set) so values are comparable,

and image grids (Fig. 2 style: a few classes x images per class; one grid per class too). Eq. 8 is
evaluated for the train set's class counts. ``stage.mode=eq8`` does only the latter (no teacher needed).
Everything lands in a deterministic folder (see conf/stage/analyze.yaml).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpld.artifacts import images as images_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.config.frozen import Experiment
from lpld.core.bn_updates import Eq8Bound, required_updates
from lpld.core.diversity import median_bandwidth, mmd2, within_class_cosine
from lpld.core.images import class_dir_name, load_distilled
from lpld.core.io import ArtifactError, atomic_write_bytes, atomic_write_json
from lpld.errors import ConfigError
from lpld.lit.display import log_images_uint8
from lpld.report.grids import class_rows_grid, per_class_grids, save_grid_png
from lpld.stages.common import build_logger, dataset_spec, finish_logger, to_container

log = logging.getLogger("lpld")


def analysis_dir(exp: Experiment) -> Path:
    """``<artifacts>/<dataset>/<teacher>/analysis/ipc<ipc>_seed<seed>`` unless ``stage.out_dir`` is set."""
    if exp.stage.get("out_dir"):
        return Path(str(exp.stage.out_dir)).expanduser().resolve()
    return teacher_artifact.base_dir(exp) / "analysis" / f"ipc{int(exp.ipc)}_seed{int(exp.seed)}"


def method_dirs(exp: Experiment) -> dict[str, Path]:
    """{label: distilled image folder}: each ``stage.methods`` entry at its images_dir, then ``stage.image_dirs``."""
    out: dict[str, Path] = {}
    for m in exp.stage.get("methods") or []:
        out[str(m)] = images_artifact.path(images_artifact.with_method(exp, str(m)))
    for label, d in (exp.stage.get("image_dirs") or {}).items():
        out[str(label)] = Path(str(d)).expanduser().resolve()
    return out


def eq8_for(exp: Experiment, counts: list[int]) -> Eq8Bound:
    e = exp.stage["eq8"]  # Appendix E.3's constants (schema: lpld/config/schema.py, AnalyzeStage.eq8)
    return required_updates(
        batch_size=int(e["batch_size"]),
        counts=counts,
        T=float(e["T"]),
        delta=float(e["delta"]),
        eps=float(e["eps"]),
        C=float(e["C"]),
        tau=float(e["tau"]),
    )


def class_counts(targets: list[int], num_classes: int) -> list[int]:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).tolist()


def sample_per_class(targets: list[int], per_class: int | None, seed: int) -> list[int]:
    """Up to ``per_class`` indices of each class, drawn without replacement by a generator seeded with ``seed``."""
    t = torch.as_tensor(targets, dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    out: list[int] = []
    for c in torch.unique(t).tolist():
        idx = (t == c).nonzero(as_tuple=True)[0]
        if per_class is not None and idx.numel() > per_class:
            idx = idx[torch.randperm(idx.numel(), generator=g)[:per_class]].sort().values
        out += idx.tolist()
    return out


def _device(exp: Experiment) -> torch.device:
    acc = str(exp.trainer["accelerator"])
    return torch.device("cuda" if acc in ("gpu", "cuda", "auto") and torch.cuda.is_available() else "cpu")


@torch.no_grad()
def features_of(model: torch.nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Penultimate features (N, D) float32 of normalised inputs x (N, C, H, W), in batches."""
    from lpld.models import penultimate_features

    outs = [
        penultimate_features(model, x[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(outs)


def _normalize_uint8(images: torch.Tensor, exp: Experiment) -> torch.Tensor:
    from lpld.data.transforms import normalize

    return normalize(images.float() / 255.0, exp.dataset)


def _markdown(results: dict[str, Any], eq8: Eq8Bound, ipc: int) -> str:
    lines = [
        f"### Diversity of distilled data (IPC {ipc})",
        "",
        "Within-class feature cosine similarity (Eq. 4; mean ± std over classes; lower = more diverse) and MMD^2 "
        f"to real train features (Eq. 5, {results['mmd']['estimator']}, "
        f"Gaussian sigma = {results['mmd']['sigma']:.4g}).",
        "",
        "| data | images | cosine similarity | MMD^2 to real |",
        "|---|---|---|---|",
    ]
    for label, r in results["methods"].items():
        lines.append(
            f"| {label} | {r['num_images']} | {r['cosine_mean']:.3f} ± {r['cosine_std']:.3f} | {r['mmd2']:.4f} |"
        )
    rr = results["real"]
    lines.append(
        f"| real (full dataset sample) | {rr['num_images']} | {rr['cosine_mean']:.3f} ± {rr['cosine_std']:.3f} | - |"
    )
    lines += ["", "```", eq8.summary(), "```", ""]
    return "\n".join(lines)


@dataclass
class _Reference:
    """The real-image side of the comparison: teacher features, their diversity and the MMD settings."""

    feats: torch.Tensor  # (N, D) teacher features of the sampled real images
    num_images: int
    per_class: int | None
    cosine: Any  # within_class_cosine of the real features
    grid: torch.Tensor  # uint8 grid of the first real images of the shown classes
    show: list[int]  # classes shown in the grids
    grid_per_class: int
    gen: torch.Generator  # drives the MMD subsampling, shared by the bandwidth and every method in turn
    sigma: float
    estimator: str


def _eq8(exp: Experiment, out: Path) -> tuple[Eq8Bound, Any]:
    """Eq. 8 from the class counts (``stage.class_counts`` or the train set), written to ``eq8_B<B>.json``;
    returns the bound and the train set when it had to be built."""
    st, spec = exp.stage, dataset_spec(exp)
    train = None
    if st.get("class_counts") is not None:
        counts = [int(c) for c in st.class_counts]
    else:
        from lpld.data import build_dataset

        train = build_dataset(exp.dataset, "train")
        counts = class_counts(list(train.targets), spec.num_classes)
    eq8 = eq8_for(exp, counts)
    print(eq8.summary())
    eq8_file = out / f"eq8_B{eq8.batch_size}.json"
    atomic_write_json(eq8_file, {"dataset": spec.name, "class_counts": counts, **eq8.as_dict()})
    log.info("analyze: wrote %s", eq8_file)
    return eq8, train


def _reference(exp: Experiment, train: Any, teacher: torch.nn.Module, bs: int, device: torch.device) -> _Reference:
    """Sample the real images, compute their features, diversity and grid, and the MMD bandwidth."""
    st, spec, seed = exp.stage, dataset_spec(exp), int(exp.seed)
    per = st.get("real_per_class")
    idx = sample_per_class(list(train.targets), None if per is None else int(per), seed)
    real_y = torch.as_tensor([int(train.targets[i]) for i in idx], dtype=torch.long)
    gc, gpc = int(st["grid_classes"]), int(st["grid_per_class"])
    show = list(range(min(gc, spec.num_classes)))
    real_f, real_grid = real_features(exp, teacher, train, idx, show, gpc, bs, device)
    real_cos = within_class_cosine(real_f, real_y)
    gen = torch.Generator().manual_seed(seed)
    sigma = st.get("mmd_bandwidth")
    sigma = float(sigma) if sigma is not None else median_bandwidth(real_f, None, int(st["mmd_max_points"]), gen)
    estimator = str(st["mmd_estimator"])
    per_class = None if per is None else int(per)
    return _Reference(real_f, len(idx), per_class, real_cos, real_grid, show, gpc, gen, sigma, estimator)


def _analyze_method(
    exp: Experiment,
    label: str,
    d: Path,
    ref: _Reference,
    teacher: torch.nn.Module,
    teacher_fp: str,
    bs: int,
    device: torch.device,
    grids_dir: Path,
    class_names: list[str],
) -> tuple[dict[str, Any], torch.Tensor]:
    """Diversity (Fig. 3) and MMD of one method's distilled images against the real sample; writes its grids.

    Returns:
        (its entry of ``analysis.json``'s "methods", its class-rows grid).
    """
    st = exp.stage
    images, labels, manifest = load_distilled(
        d, expect_teacher_fingerprint=teacher_fp, allow_other_teacher=bool(st["allow_other_teacher"])
    )
    feats = features_of(teacher, _normalize_uint8(images, exp), bs, device)
    cos = within_class_cosine(feats, labels)
    m = mmd2(ref.feats, feats, sigma=ref.sigma, estimator=ref.estimator, generator=ref.gen)
    entry = {
        "dir": str(d),
        "method": manifest.get("method"),
        "num_images": int(images.shape[0]),
        "images_fingerprint": manifest.get("images_fingerprint"),
        "cosine_mean": cos.mean,
        "cosine_std": cos.std,
        "cosine_per_class": {str(k): v for k, v in cos.per_class.items()},
        "mmd2": m.mmd2,
    }
    grid = class_rows_grid(images, labels, ref.show, ref.grid_per_class)
    save_grid_png(grid, grids_dir / f"{label}.png")
    if bool(st["per_class_grids"]):
        for c, g in per_class_grids(images, labels).items():
            name = class_names[c] if c < len(class_names) else str(c)
            save_grid_png(g, grids_dir / label / f"{class_dir_name(c, name)}.png")
    log.info("analyze: %s cos %.4f ± %.4f, MMD^2 %.5f", label, cos.mean, cos.std, m.mmd2)
    return entry, grid


def run(exp: Experiment) -> dict[str, Any]:
    """Eq. 8 (``stage.mode=eq8``), or Eq. 8 plus diversity / MMD / grids of each method's images (``full``)."""
    st = exp.stage
    mode = str(st["mode"])
    if mode not in ("full", "eq8"):
        raise ConfigError(f"stage.mode must be 'full' or 'eq8', got '{mode}'")
    out = analysis_dir(exp)
    spec = dataset_spec(exp)
    eq8, train = _eq8(exp, out)
    if mode == "eq8":
        return {"out_dir": str(out), "eq8": eq8.as_dict()}

    from lpld.artifacts import teacher as teacher_artifact

    dirs = method_dirs(exp)
    if not dirs:
        raise ConfigError("nothing to analyse: set stage.methods=[lpld,...] or stage.image_dirs={label: /path}")
    teacher, teacher_fp = teacher_artifact.load(exp)
    device = _device(exp)
    teacher.to(device)
    bs = int(st["feature_batch_size"])
    if train is None:
        from lpld.data import build_dataset

        train = build_dataset(exp.dataset, "train")
    ref = _reference(exp, train, teacher, bs, device)
    results: dict[str, Any] = {
        "dataset": spec.name,
        "teacher": teacher_artifact.teacher_name(exp),
        "teacher_fingerprint": teacher_fp,
        "ipc": int(exp.ipc),
        "seed": int(exp.seed),
        "real": {
            "num_images": ref.num_images,
            "per_class": ref.per_class,
            "cosine_mean": ref.cosine.mean,
            "cosine_std": ref.cosine.std,
        },
        "mmd": {
            "estimator": ref.estimator,
            "sigma": ref.sigma,
            "bandwidth": "fixed" if st.get("mmd_bandwidth") else "median",
        },
        "methods": {},
        "eq8": eq8.as_dict(),
        "config": to_container(st),
    }
    grids_dir = out / "grids"
    grid_images: dict[str, torch.Tensor] = {}
    class_names = list(getattr(train, "classes", [str(c) for c in range(spec.num_classes)]))
    for label, d in dirs.items():
        if not (d / "manifest.json").exists():
            msg = f"no distilled images for '{label}' at {d}; run `python run.py stage=recover recover={label}` first"
            if str(st["missing"]) == "error":
                raise ArtifactError(msg)
            log.warning("analyze: skipping %s (%s)", label, msg)
            continue
        entry, grid_images[label] = _analyze_method(
            exp, label, d, ref, teacher, teacher_fp, bs, device, grids_dir, class_names
        )
        results["methods"][label] = entry
    if not results["methods"]:
        raise ArtifactError(
            "none of the requested distilled image folders exist: " + ", ".join(f"{k}: {v}" for k, v in dirs.items())
        )
    grid_images["real"] = ref.grid
    save_grid_png(grid_images["real"], grids_dir / "real.png")

    md = _markdown(results, eq8, int(exp.ipc))
    if (out / "analysis.json").exists():
        log.info("analyze: replacing the earlier analysis in %s", out)
    atomic_write_json(out / "analysis.json", results)
    atomic_write_bytes(out / "analysis.md", md.encode())
    print(md)
    _log_wandb(exp, results, grid_images)
    return {"out_dir": str(out), "results": results}


def real_features(
    exp: Experiment,
    teacher: torch.nn.Module,
    train: Any,
    idx: list[int],
    show: list[int],
    per_class: int,
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (len(idx), D) of the sampled real images, streamed in batches (never all pixels in memory),
    and the Fig. 2 style grid of the first ``per_class`` sampled images of the ``show`` classes."""
    feats: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    kept_y: list[int] = []
    for i0 in range(0, len(idx), batch_size):
        items = [train[i] for i in idx[i0 : i0 + batch_size]]
        x = torch.stack([it[0] for it in items])
        feats.append(features_of(teacher, x, batch_size, device))
        for (_, y), xi in zip(items, x):
            if int(y) in show and kept_y.count(int(y)) < per_class:
                kept.append(_to_uint8(xi[None], exp)[0])
                kept_y.append(int(y))
    if not feats:
        raise ConfigError("stage.real_per_class selected no real images; set it to a positive number or null (all)")
    grid = class_rows_grid(torch.stack(kept), torch.tensor(kept_y), show, per_class)
    return torch.cat(feats), grid


def _to_uint8(x: torch.Tensor, exp: Experiment) -> torch.Tensor:
    from lpld.data.transforms import denormalize

    return torch.round(denormalize(x, exp.dataset).clamp(0, 1) * 255).to(torch.uint8)


def _log_wandb(exp: Experiment, results: dict[str, Any], grids: dict[str, torch.Tensor]) -> None:
    logger = build_logger(exp, "analyze")
    try:
        if logger is None:
            return
        cols = ["data", "images", "cosine_mean", "cosine_std", "mmd2"]
        data = [
            [k, r["num_images"], r["cosine_mean"], r["cosine_std"], r["mmd2"]] for k, r in results["methods"].items()
        ]
        rr = results["real"]
        data.append(["real", rr["num_images"], rr["cosine_mean"], rr["cosine_std"], math.nan])
        if hasattr(logger, "log_table"):
            logger.log_table(key="analyze/diversity", columns=cols, data=data)
        if bool(exp.logger["log_images"]):
            for label, g in grids.items():
                log_images_uint8(logger, f"analyze/grid_{label}", g[None], caption=f"{label}: first classes x images")
    finally:
        finish_logger(logger)
