"""Datasets for lpld: ``build_dataset(cfg.dataset, "train"|"val")`` for every supported layout.

Dataset types (the ``type`` key of conf/dataset/*.yaml): demo (bundled Fashion-MNIST t10k), fmnist,
cifar10, cifar100, imagefolder (ImageNet-1K/21K-P, CIFAR-10 JPEG, any class-folder tree), tiny_imagenet.
"""

from __future__ import annotations

from typing import Any

from lpld.data.archive import extract_archive
from lpld.data.builders import BUILDERS
from lpld.data.config import cfg_get, cfg_require, dataset_type
from lpld.data.datasets import FileImageDataset, TensorImageDataset
from lpld.data.errors import LAYOUTS, DatasetError, dataset_error
from lpld.data.recipe import recipe
from lpld.data.transforms import eval_transform

SPLITS = ("train", "val")

__all__ = [
    "BUILDERS",
    "DatasetError",
    "FileImageDataset",
    "LAYOUTS",
    "SPLITS",
    "TensorImageDataset",
    "build_dataset",
    "extract_archive",
    "recipe",
]


def build_dataset(ds_cfg: Any, split: str, transform: Any = None) -> TensorImageDataset | FileImageDataset:
    """The ``split`` of the dataset described by ``ds_cfg``, yielding ``(image tensor, int label)``.

    Args:
        ds_cfg: the dataset config (``exp.dataset``, or a plain dict) with at least
            type/name, num_classes, channels, image_size, mean, std and, except for demo, root.
        split: "train" or "val" (val is the official test/val set where the dataset has one).
        transform: maps a PIL image / uint8 (C, H, W) tensor to a tensor; None = eval transform
            (resize + center-crop to image_size, normalised with mean/std).

    Returns:
        a Dataset with ``.targets: list[int]``, ``.classes: list[str]`` (label i is classes[i]) and
        ``.transform``; in-memory datasets also hold ``.images`` (N, C, H, W) uint8.

    Raises:
        DatasetError: unknown type/split, missing root or split directory, empty class folder,
            class count or channel count different from the config.
    """
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    kind = dataset_type(ds_cfg)
    if kind not in BUILDERS:
        raise DatasetError(f"unknown dataset type {kind!r}; valid: {sorted(BUILDERS)} (set dataset.type)")
    expected = int(cfg_require(ds_cfg, "num_classes"))  # checked before scanning a possibly huge tree
    channels = int(cfg_require(ds_cfg, "channels"))
    if channels not in (1, 3):
        raise DatasetError(f"dataset.channels={channels} is not supported; set dataset.channels to 1 or 3")
    tf = transform if transform is not None else eval_transform(ds_cfg)  # validates mean/std/size first
    ds = BUILDERS[kind](ds_cfg, split)
    if len(ds.classes) != expected:
        root = cfg_get(ds_cfg, "root", "(bundled)")
        raise dataset_error(
            kind,
            f"found {len(ds.classes)} classes for the {split} split of '{cfg_get(ds_cfg, 'name', kind)}' "
            f"under {root}, expected {expected} (dataset.num_classes)",
            f"set dataset.num_classes={len(ds.classes)} if that is the intended dataset, "
            "else point dataset.root=/path at the full tree",
        )
    if ds.channels != channels:
        raise dataset_error(
            kind,
            f"'{cfg_get(ds_cfg, 'name', kind)}' images have {ds.channels} channel(s) but dataset.channels={channels}",
            f"set dataset.channels={ds.channels} (and give mean/std {ds.channels} values)",
        )
    ds.transform = tf
    return ds
