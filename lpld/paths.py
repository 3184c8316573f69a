"""Backward-compatible names for artifact paths; the artifacts themselves are :mod:`lpld.artifacts`."""

from __future__ import annotations

from lpld.artifacts import images, labels, results, stats, teacher  # noqa: F401
from lpld.artifacts.base import dataset_dir  # noqa: F401
from lpld.artifacts.base import root as artifacts_root  # noqa: F401
from lpld.artifacts.teacher import teacher_name as teacher_key  # noqa: F401 - the readable name (records, logs)
from lpld.config.stats import stats_mode  # noqa: F401

teacher_dir, teacher_weights_path, stats_path, images_key, images_dir = (
    teacher.dir,
    teacher.path,
    stats.path,
    images.key,
    images.path,
)
results_dir = results.dir


def labels_root(cfg):  # noqa: ANN001, ANN201 - the folder of this config's images' label stores
    return labels.path(cfg).parent
