"""One builder per dataset ``type``: read the on-disk layout, return a dataset without transform."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpld.data.config import cfg_get, cfg_require, data_root, dataset_type
from lpld.data.datasets import (
    FileImageDataset,
    TensorImageDataset,
    decode_to_uint8,
    list_class_dirs,
    list_images,
    scan_class_folders,
)
from lpld.data.demo import DEMO_IMAGES, DEMO_LABELS, FMNIST_CLASSES, demo_split_indices
from lpld.data.errors import dataset_error, require_dir
from lpld.data.idx import find_idx_file, read_idx

Split = str  # "train" | "val"
Built = TensorImageDataset | FileImageDataset


def _idx_images_labels(kind: str, images_path: Path, labels_path: Path) -> tuple[torch.Tensor, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise dataset_error(
            kind,
            f"{images_path.name} {images.shape} and {labels_path.name} {labels.shape} do not match",
            "use an unmodified images/labels pair",
        )
    return torch.from_numpy(images).unsqueeze(1), labels  # (N, 1, 28, 28) uint8


def build_demo(ds_cfg: Any, split: Split) -> Built:
    """Fashion-MNIST t10k bundled with lpld, split 800/200 per class (``val_per_class``) into train/val."""
    images, labels = _idx_images_labels("demo", DEMO_IMAGES, DEMO_LABELS)
    train_idx, val_idx = demo_split_indices(labels, int(cfg_get(ds_cfg, "val_per_class", 200)))
    idx = torch.from_numpy(train_idx if split == "train" else val_idx)
    return TensorImageDataset(images[idx], labels[idx.numpy()].tolist(), FMNIST_CLASSES)


def build_fmnist(ds_cfg: Any, split: Split) -> Built:
    """Full Fashion-MNIST (60k train / 10k val = the official test set) from idx files, .gz or raw."""
    root = data_root(ds_cfg)
    dirs = [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    prefix = "train" if split == "train" else "t10k"
    found = [find_idx_file(dirs, f"{prefix}-{part}-ubyte") for part in ("images-idx3", "labels-idx1")]
    if None in found:
        raise dataset_error(
            "fmnist",
            f"no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] in {root} or {dirs[1]}",
            "set dataset.root=/path/to/fashion-mnist (or env LPLD_FMNIST)",
        )
    images, labels = _idx_images_labels("fmnist", found[0], found[1])
    return TensorImageDataset(images, labels.tolist(), FMNIST_CLASSES)


_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "val": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "labels": "labels",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "val": ["test"],
        "meta": ("meta", "fine_label_names"),
        "labels": "fine_labels",
    },
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for torchvision's CIFAR python batches that can only rebuild numpy arrays and builtins.

    torchvision's CIFAR format is a pickle, so reading it means unpickling; a plain ``pickle.load`` would run
    any code a tampered file names. Only the globals a CIFAR batch needs are resolved (numpy's array
    reconstruction, and ``_codecs.encode`` that protocol-2 pickles use for bytes); any other is refused.
    """

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references the Python global {module}.{name}")


def _unpickle(path: Path, kind: str = "cifar10") -> dict:
    # the CIFAR python batches are python-2 pickles; latin1 keeps their byte strings intact.
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise dataset_error(
            kind,
            f"{path} is not a CIFAR python batch ({e}); lpld only unpickles numpy arrays and plain containers "
            "from CIFAR files, since a pickle can run code",
            "replace the folder with torchvision's CIFAR download (delete it and set dataset.download=true)",
        ) from e
    if not isinstance(obj, dict):
        raise dataset_error(
            kind,
            f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict",
            "replace the folder with torchvision's CIFAR download (delete it and set dataset.download=true)",
        )
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def build_cifar(ds_cfg: Any, split: Split) -> Built:
    """CIFAR-10/100 from torchvision's python-pickle layout (downloaded by torchvision if ``download``)."""
    kind = dataset_type(ds_cfg)
    spec = _CIFAR[kind]
    root_value = cfg_get(ds_cfg, "root")
    if bool(cfg_get(ds_cfg, "download", False)) and root_value is not None:
        from torchvision import datasets as tvd

        Path(str(root_value)).expanduser().mkdir(parents=True, exist_ok=True)
        cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
        cls(str(Path(str(root_value)).expanduser()), train=split == "train", download=True)
    root = data_root(ds_cfg)
    folder = root / spec["folder"] if (root / spec["folder"]).is_dir() else root
    meta_name, names_key = spec["meta"]
    needed = [*spec[split], meta_name]
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise dataset_error(
            kind,
            f"missing {', '.join(missing)} in {folder}",
            "set dataset.root=/path (the directory holding " + spec["folder"] + "/), or dataset.download=true",
        )
    classes = [str(c) for c in _unpickle(folder / meta_name, kind)[names_key]]
    data, labels = [], []
    for name in spec[split]:
        batch = _unpickle(folder / name, kind)
        data.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels += [int(v) for v in batch[spec["labels"]]]
    return TensorImageDataset(torch.from_numpy(np.concatenate(data)), labels, classes)


def _mode(ds_cfg: Any) -> str:
    # build_dataset has checked channels is 1 or 3
    return "L" if int(cfg_require(ds_cfg, "channels")) == 1 else "RGB"


def _split_dir(ds_cfg: Any, split: Split) -> Path:
    kind = dataset_type(ds_cfg)
    key = "train_dir" if split == "train" else "val_dir"
    name = str(cfg_get(ds_cfg, key, "train" if split == "train" else "val"))
    return require_dir(kind, data_root(ds_cfg) / name, f"{split} directory", f"dataset.{key}=<name> or dataset.root")


def _finish(ds_cfg: Any, paths: list[str], targets: list[int], classes: list[str]) -> Built:
    mode = _mode(ds_cfg)
    if bool(cfg_get(ds_cfg, "in_memory", False)):
        images = decode_to_uint8(paths, mode, int(cfg_require(ds_cfg, "image_size")))
        return TensorImageDataset(images, targets, classes)
    return FileImageDataset(paths, targets, classes, mode=mode)


def build_imagefolder(ds_cfg: Any, split: Split) -> Built:
    """Class-folder trees ``<root>/<train_dir|val_dir>/<class>/*`` (ImageNet-1K/21K-P, CIFAR-10 JPEG, ...).

    Classes are the sorted folder names of the *train* split, so both splits share one label map;
    a val split with a different class set is an error rather than silently misaligned labels.
    """
    kind = dataset_type(ds_cfg)
    train_dir = _split_dir(ds_cfg, "train")
    classes = list_class_dirs(train_dir)
    if not classes:
        raise dataset_error(kind, f"no class folders in {train_dir}", "set dataset.root / dataset.train_dir")
    split_dir = train_dir
    if split == "val":
        split_dir = _split_dir(ds_cfg, "val")
        val_classes = list_class_dirs(split_dir)
        if val_classes != classes:
            only_t = sorted(set(classes) - set(val_classes))[:5]
            only_v = sorted(set(val_classes) - set(classes))[:5]
            raise dataset_error(
                kind,
                f"{split_dir} and {train_dir} hold different class folders "
                f"(only in train: {only_t}, only in val: {only_v})",
                "make both splits hold the same class folders",
            )
    paths, targets = scan_class_folders(kind, split_dir, classes)
    return _finish(ds_cfg, paths, targets, classes)


def build_tiny_imagenet(ds_cfg: Any, split: Split) -> Built:
    """Tiny-ImageNet: ``train/<wnid>/images/*``; val from ``val/val_annotations.txt`` (or val class folders).

    Classes are the sorted wnids of ``wnids.txt`` (the train folder names if it is absent).
    """
    root = data_root(ds_cfg)
    train_dir = _split_dir(ds_cfg, "train")
    wnids_file = root / "wnids.txt"
    if wnids_file.is_file():
        classes = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    else:
        classes = list_class_dirs(train_dir)
    if split == "train":
        sub = "images" if classes and (train_dir / classes[0] / "images").is_dir() else ""
        paths, targets = scan_class_folders("tiny_imagenet", train_dir, classes, sub=sub)
        return _finish(ds_cfg, paths, targets, classes)
    val_dir = _split_dir(ds_cfg, "val")
    ann = val_dir / "val_annotations.txt"
    if not ann.is_file():  # val already re-organised into class folders
        paths, targets = scan_class_folders("tiny_imagenet", val_dir, classes)
        return _finish(ds_cfg, paths, targets, classes)
    label_of = {w: i for i, w in enumerate(classes)}
    paths, targets = [], []
    images_dir = val_dir / "images"
    for line_no, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2 or fields[1] not in label_of:
            raise dataset_error(
                "tiny_imagenet",
                f"{ann}:{line_no}: expected '<file>\\t<wnid>...' with a wnid of wnids.txt, got {line!r}",
                "use the unmodified val_annotations.txt",
            )
        path = images_dir / fields[0]
        if not path.is_file():
            raise dataset_error("tiny_imagenet", f"{ann}:{line_no} names a missing file {path}", "restore val/images")
        paths.append(str(path))
        targets.append(label_of[fields[1]])
    if not paths:
        raise dataset_error("tiny_imagenet", f"{ann} lists no image", "use the unmodified val_annotations.txt")
    unannotated = len(list_images(images_dir)) - len(paths)
    if unannotated > 0:
        raise dataset_error(
            "tiny_imagenet", f"{unannotated} files in {images_dir} have no line in {ann}", "restore the annotations"
        )
    return _finish(ds_cfg, paths, targets, classes)


BUILDERS: dict[str, Callable[[Any, Split], Built]] = {
    "demo": build_demo,
    "fmnist": build_fmnist,
    "cifar10": build_cifar,
    "cifar100": build_cifar,
    "imagefolder": build_imagefolder,
    "tiny_imagenet": build_tiny_imagenet,
}
