"""Deterministic artifact paths built from config values (never timestamps).

A later stage finds an earlier stage's output by recomputing the same path from the same
config keys. Layout under ``paths.artifacts``::

    <dataset>/<teacher>/teacher/            squeeze: last.ckpt (resume), teacher.pt (weights + fingerprint)
    <dataset>/<teacher>/stats/<mode>.pt     stats: class-wise BN statistics
    <dataset>/<teacher>/images/<method>_ipc<ipc>_seed<seed>/          recover: PNGs + manifest.json
    <dataset>/<teacher>/labels/<method>_ipc<ipc>_seed<seed>/<key>/    relabel: label store
    <dataset>/results/<sweep>.jsonl         student: one JSON record per finished run
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def _get(cfg: DictConfig, key: str, default=None):
    node = cfg
    for part in key.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node


def artifacts_root(cfg: DictConfig) -> Path:
    """Absolute artifacts root (relative config paths are resolved against the cwd)."""
    return Path(str(cfg.paths.artifacts)).expanduser().resolve()


def teacher_key(cfg: DictConfig) -> str:
    """Identity of the teacher: model name, plus a tag for published / external weights, plus
    ``-s<teacher_seed>`` for a teacher trained with a non-zero ``teacher_seed``."""
    name = str(cfg.model.name)
    tag = _get(cfg, "model.tag")
    if tag:
        name = f"{name}-{tag}"
    elif _get(cfg, "model.pretrained", False):
        return f"{name}-pretrained"
    tseed = int(_get(cfg, "teacher_seed", 0) or 0)
    if tseed and not _get(cfg, "model.checkpoint"):
        name = f"{name}-s{tseed}"
    return name


def dataset_dir(cfg: DictConfig) -> Path:
    return artifacts_root(cfg) / str(cfg.dataset.name)


def teacher_dir(cfg: DictConfig) -> Path:
    return dataset_dir(cfg) / teacher_key(cfg) / "teacher"


def teacher_weights_path(cfg: DictConfig) -> Path:
    """Final teacher weights written by squeeze (``model.checkpoint`` overrides where it is read)."""
    return teacher_dir(cfg) / "teacher.pt"


def stats_mode(cfg: DictConfig) -> str:
    """``exact``, ``official`` or ``ema`` (``lpld.data.recipe.stats_mode``: stage / recover key, else the recipe)."""
    from lpld.data.recipe import stats_mode as resolve

    return resolve(cfg)


def stats_path(cfg: DictConfig, mode: str | None = None) -> Path:
    mode = mode or stats_mode(cfg)
    return dataset_dir(cfg) / teacher_key(cfg) / "stats" / f"{mode}.pt"


def images_key(cfg: DictConfig) -> str:
    return f"{cfg.recover.name}_ipc{int(cfg.ipc)}_seed{int(cfg.seed)}"


def images_dir(cfg: DictConfig) -> Path:
    return dataset_dir(cfg) / teacher_key(cfg) / "images" / images_key(cfg)


def labels_root(cfg: DictConfig) -> Path:
    return dataset_dir(cfg) / teacher_key(cfg) / "labels" / images_key(cfg)


def results_dir(cfg: DictConfig) -> Path:
    return dataset_dir(cfg) / "results"
