"""Dataset layer: every loader on a tiny on-disk tree, the demo split, transforms, configs, errors."""

from __future__ import annotations

import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lpld.data import DatasetError, build_dataset, extract_archive, recipe
from lpld.data.demo import DEMO_IMAGES, DEMO_LABELS, DEMO_SPLIT_SEED, FMNIST_CLASSES, demo_split_indices
from lpld.data.idx import read_idx, write_idx
from lpld.data.transforms import denormalize, eval_transform, normalize, normalize_params, train_transform

CONF = Path(__file__).resolve().parents[1] / "conf"
DATASET_YAMLS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))


def _cfg(**kw) -> dict:
    base = {"name": "t", "channels": 3, "image_size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    base.update(kw)
    return base


def _expected_pixels(img_u8: np.ndarray, mean, std) -> torch.Tensor:
    """Independent reference of the eval transform for an image already at image_size: (C, H, W)."""
    x = torch.from_numpy(img_u8.astype(np.float32) / 255.0)
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _folder_tree(root: Path, split: str, classes: dict[str, int], size: int = 8, ext: str = ".png", seed: int = 0):
    """Write ``classes[name]`` random images per class under root/split/name; return {path: array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name, n in classes.items():
        for i in range(n):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            p = root / split / name / f"{i:03d}{ext}"
            _write_png(p, arr)
            written[str(p)] = arr
    return written


# ----------------------------------------------------------------------------- idx / fmnist


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    arr = np.random.default_rng(1).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / f"a{suffix}", arr)
    back = read_idx(tmp_path / f"a{suffix}")
    assert back.dtype == np.uint8 and np.array_equal(back, arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04" + bytes(10))
    with pytest.raises(DatasetError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    raw = (tmp_path / f"a{suffix}").read_bytes()
    if not suffix:
        (tmp_path / "short").write_bytes(raw[:-3])
        with pytest.raises(DatasetError, match="truncated"):
            read_idx(tmp_path / "short")


def test_idx_reads_real_fashion_mnist_header():
    labels = read_idx(DEMO_LABELS)
    assert labels.shape == (10000,) and np.array_equal(np.bincount(labels), [1000] * 10)


def _fmnist_files(d: Path, suffix: str, rng) -> dict[str, np.ndarray]:
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", 30), ("t10k", 20)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        write_idx(d / f"{prefix}-images-idx3-ubyte{suffix}", imgs)
        write_idx(d / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[prefix] = (imgs, labels)
    return out


@pytest.mark.parametrize("layout", ["flat_gz", "torchvision_raw"])
def test_fmnist_loader(tmp_path, layout):
    rng = np.random.default_rng(2)
    d = tmp_path if layout == "flat_gz" else tmp_path / "FashionMNIST" / "raw"
    data = _fmnist_files(d, ".gz" if layout == "flat_gz" else "", rng)
    cfg = {"name": "fmnist", "type": "fmnist", "num_classes": 10, "channels": 1, "image_size": 28}
    cfg.update(mean=[0.3], std=[0.4], root=str(tmp_path))
    for split, key in (("train", "train"), ("val", "t10k")):
        ds = build_dataset(cfg, split)
        imgs, labels = data[key]
        assert len(ds) == len(labels) and ds.targets == labels.tolist()
        assert ds.classes == FMNIST_CLASSES
        x, y = ds[3]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == int(labels[3])
        torch.testing.assert_close(x, _expected_pixels(imgs[3][None], [0.3], [0.4]))


def test_fmnist_missing_files_and_root(tmp_path):
    cfg = {"name": "fmnist", "type": "fmnist", "num_classes": 10, "channels": 1, "image_size": 28}
    cfg.update(mean=[0.3], std=[0.4], root=str(tmp_path))
    with pytest.raises(DatasetError, match=r"(?s)train-images-idx3-ubyte.*dataset\.root=.*FashionMNIST/raw"):
        build_dataset(cfg, "train")
    cfg["root"] = str(tmp_path / "nope")
    with pytest.raises(DatasetError, match="dataset root not found"):
        build_dataset(cfg, "val")
    cfg["root"] = None
    with pytest.raises(DatasetError, match=r"dataset\.root"):
        build_dataset(cfg, "val")


# ----------------------------------------------------------------------------- cifar


def _cifar_tree(root: Path, kind: str, rng) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write CIFAR python batches (torchvision's layout) with a few images each; return split -> (data, labels)."""
    if kind == "cifar10":
        folder, n_cls, label_key = root / "cifar-10-batches-py", 10, "labels"
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(n_cls)], "num_vis": 3072})
    else:
        folder, n_cls, label_key = root / "cifar-100-python", 100, "fine_labels"
        files = {"train": ["train"], "val": ["test"]}
        meta = ("meta", {"fine_label_names": [f"f{i:02d}" for i in range(n_cls)], "coarse_label_names": ["x"] * 20})
    folder.mkdir(parents=True)
    out = {}
    for split, names in files.items():
        datas, labels = [], []
        for name in names:
            n = 4
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            lab = rng.integers(0, n_cls, n).tolist()
            batch = {"batch_label": name, label_key: lab, "data": data, "filenames": [f"{i}.png" for i in range(n)]}
            if kind == "cifar100":
                batch["coarse_labels"] = [0] * n
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f, protocol=2)
            datas.append(data)
            labels += lab
        out[split] = (np.concatenate(datas), labels)
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f, protocol=2)
    return out


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_loader_matches_torchvision(tmp_path, kind, monkeypatch):
    from torchvision import datasets as tvd

    written = _cifar_tree(tmp_path, kind, np.random.default_rng(3))
    n_cls = 10 if kind == "cifar10" else 100
    cfg = _cfg(name=kind, type=kind, num_classes=n_cls, image_size=32, root=str(tmp_path), download=False)
    tv_cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
    # torchvision checks the md5 of the official files; our tiny fakes share only the format.
    monkeypatch.setattr(tv_cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)
    for split in ("train", "val"):
        ds = build_dataset(cfg, split, transform=lambda x: x)
        ref = tv_cls(str(tmp_path), train=split == "train", download=False)
        assert len(ds) == len(written[split][1]) == len(ref)
        assert ds.targets == list(ref.targets) == written[split][1]
        assert ds.classes == list(ref.classes)
        img, y = ds[3]
        assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and y == ref.targets[3]
        assert np.array_equal(img.permute(1, 2, 0).numpy(), ref.data[3])  # torchvision: (N, 32, 32, 3)
    x, _ = build_dataset(cfg, "val")[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_cifar_missing_batches(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    cfg = _cfg(name="cifar10", type="cifar10", num_classes=10, image_size=32, root=str(tmp_path))
    with pytest.raises(DatasetError, match=r"(?s)missing data_batch_1.*dataset\.download=true"):
        build_dataset(cfg, "train")


# ----------------------------------------------------------------------------- image folders


def test_imagefolder_loader(tmp_path):
    counts = {"cat": 3, "ant": 2, "bee": 4}
    tr = _folder_tree(tmp_path, "train", counts)
    va = _folder_tree(tmp_path, "val", {"cat": 1, "ant": 2, "bee": 1}, seed=1)
    cfg = _cfg(type="imagefolder", num_classes=3, root=str(tmp_path), train_dir="train", val_dir="val")
    for in_memory in (False, True):
        cfg["in_memory"] = in_memory
        train = build_dataset(cfg, "train")
        assert train.classes == ["ant", "bee", "cat"]  # sorted folder names
        assert train.targets == [0] * 2 + [1] * 4 + [2] * 3
        val = build_dataset(cfg, "val")
        assert val.targets == [0, 0, 1, 2] and val.classes == train.classes
        # item 2 = first "bee" image: pixels survive (PNG is lossless) through the eval transform
        x, y = train[2]
        assert y == 1
        torch.testing.assert_close(
            x, _expected_pixels(tr[str(tmp_path / "train/bee/000.png")].transpose(2, 0, 1), [0.5] * 3, [0.25] * 3)
        )
        x, y = val[3]
        torch.testing.assert_close(
            x, _expected_pixels(va[str(tmp_path / "val/cat/000.png")].transpose(2, 0, 1), [0.5] * 3, [0.25] * 3)
        )
    # in-memory decode fits other sizes to image_size like the eval transform does
    cfg.update(in_memory=True, image_size=4, mean=[0.5] * 3, std=[0.25] * 3)
    small = build_dataset(cfg, "train")
    assert small.images.shape == (9, 3, 4, 4) and small[0][0].shape == (3, 4, 4)


def test_imagefolder_grayscale_and_jpeg(tmp_path):
    _folder_tree(tmp_path, "tr", {"a": 2, "b": 1}, ext=".jpg")
    (tmp_path / "tr" / "b" / "notes.txt").write_text("not an image")
    _folder_tree(tmp_path, "te", {"a": 1, "b": 1}, ext=".JPEG")
    cfg = _cfg(type="imagefolder", num_classes=2, channels=1, mean=[0.5], std=[0.5], root=str(tmp_path))
    cfg.update(train_dir="tr", val_dir="te")
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 3 and len(val) == 2 and train[0][0].shape == (1, 8, 8)
    cfg["in_memory"] = True
    assert build_dataset(cfg, "val").images.shape == (2, 1, 8, 8)


def test_imagefolder_errors(tmp_path):
    _folder_tree(tmp_path, "train", {"a": 1, "b": 1, "c": 1})
    cfg = _cfg(type="imagefolder", num_classes=5, root=str(tmp_path), train_dir="train", val_dir="val")
    with pytest.raises(DatasetError) as e:
        build_dataset(cfg, "train")
    msg = str(e.value)
    assert "found 3 classes" in msg and "expected 5" in msg and "dataset.num_classes=3" in msg
    assert "<root>/<train_dir>/<class_name>/" in msg  # the expected layout is printed
    cfg["num_classes"] = 3
    with pytest.raises(DatasetError, match=r"(?s)val directory not found.*dataset\.val_dir"):
        build_dataset(cfg, "val")
    _folder_tree(tmp_path, "val", {"a": 1, "b": 1, "d": 1})
    with pytest.raises(DatasetError, match=r"only in train: \['c'\], only in val: \['d'\]"):
        build_dataset(cfg, "val")
    (tmp_path / "train" / "e").mkdir()
    cfg["num_classes"] = 4
    with pytest.raises(DatasetError, match=r"train/e holds no image file"):
        build_dataset(cfg, "train")
    with pytest.raises(DatasetError, match=r"train directory not found"):
        build_dataset({**cfg, "train_dir": "training"}, "train")
    with pytest.raises(DatasetError, match=r"(?s)1 channel\(s\) but dataset.channels=3.*dataset.channels=1"):
        build_dataset(_cfg(type="demo", num_classes=10), "val")  # greyscale data, RGB config
    with pytest.raises(DatasetError, match="dataset.channels to 1 or 3"):
        build_dataset({**cfg, "channels": 4, "mean": [0.5] * 4, "std": [0.5] * 4}, "train")
    generic = _yaml_cfg("imagefolder", root=str(tmp_path))  # num_classes: ??? in the yaml
    with pytest.raises(DatasetError, match=r"no value for 'num_classes'; set dataset.num_classes="):
        build_dataset(generic, "train")
    with pytest.raises(DatasetError, match="unknown dataset type"):
        build_dataset({**cfg, "type": "mnist"}, "train")
    with pytest.raises(DatasetError, match="split must be"):
        build_dataset(cfg, "test")
    with pytest.raises(DatasetError, match="mean/std have 1/3 entries"):
        build_dataset({**cfg, "mean": [0.5]}, "train")


def _yaml_cfg(name: str, **over):
    from conftest import compose_cfg

    # the preset as Hydra composes it (schema)
    cfg = compose_cfg([f"dataset={name}", "paths.data=/nonexistent"], raw=True)
    for k, v in over.items():
        cfg.dataset[k] = v
    return cfg.dataset


@pytest.mark.parametrize(
    "name,train_dir,val_dir", [("in1k", "train", "val"), ("in21k", "imagenet21k_train", "imagenet21k_val")]
)
def test_imagenet_configs_on_class_folders(tmp_path, name, train_dir, val_dir):
    wnids = ["n01440764", "n01443537", "n01484850"]
    _folder_tree(tmp_path, train_dir, dict.fromkeys(wnids, 2), size=40, ext=".JPEG")
    _folder_tree(tmp_path, val_dir, dict.fromkeys(wnids, 1), size=40, ext=".JPEG")
    ds_cfg = _yaml_cfg(name, root=str(tmp_path))
    expected = 1000 if name == "in1k" else 10450
    with pytest.raises(DatasetError, match=f"found 3 classes.*expected {expected}"):
        build_dataset(ds_cfg, "train")
    ds_cfg = {**ds_cfg, "num_classes": 3}
    train = build_dataset(ds_cfg, "train", train_transform(ds_cfg))
    val = build_dataset(ds_cfg, "val")
    assert train.classes == wnids and train.targets == [0, 0, 1, 1, 2, 2] and val.targets == [0, 1, 2]
    assert train[0][0].shape == (3, 224, 224) and val[0][0].shape == (3, 224, 224)


def _tiny_tree(root: Path) -> dict[str, str]:
    wnids = ["n02124075", "n01443537", "n04067472"]  # deliberately unsorted in wnids.txt
    (root).mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    _folder_tree(root, "train", {f"{w}/images": 2 for w in wnids}, size=64, ext=".JPEG")
    for w in wnids:  # the real train folders also hold a boxes file next to images/
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    val_labels = {"val_0.JPEG": wnids[2], "val_1.JPEG": wnids[0], "val_2.JPEG": wnids[1], "val_3.JPEG": wnids[2]}
    for f in val_labels:
        _write_png(root / "val" / "images" / f, np.zeros((64, 64, 3), np.uint8))
    lines = [f"{f}\t{w}\t0\t0\t63\t63" for f, w in val_labels.items()]
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return val_labels


def test_tiny_imagenet_loader(tmp_path):
    val_labels = _tiny_tree(tmp_path)
    ds_cfg = _yaml_cfg("tiny", root=str(tmp_path), num_classes=3)
    train, val = build_dataset(ds_cfg, "train"), build_dataset(ds_cfg, "val")
    assert train.classes == ["n01443537", "n02124075", "n04067472"] == val.classes
    assert train.targets == [0, 0, 1, 1, 2, 2]
    assert val.targets == [val.classes.index(w) for w in val_labels.values()] == [2, 1, 0, 2]
    assert val[0][0].shape == (3, 64, 64)
    assert Path(val.paths[1]).name == "val_1.JPEG"
    with pytest.raises(DatasetError, match=r"(?s)found 3 classes.*expected 200.*val_annotations\.txt"):
        build_dataset(_yaml_cfg("tiny", root=str(tmp_path)), "train")
    # an annotation naming an unknown wnid, and an image without annotation, are errors
    ann = tmp_path / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_9.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="val_annotations.txt:5"):
        build_dataset(ds_cfg, "val")
    ann.write_text("\n".join(ann.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(DatasetError, match="1 files in .* have no line"):
        build_dataset(ds_cfg, "val")


# ----------------------------------------------------------------------------- demo


def test_demo_split_deterministic_stratified_disjoint_complete():
    labels = read_idx(DEMO_LABELS)
    train_idx, val_idx = demo_split_indices(labels, 200)
    assert len(train_idx) == 8000 and len(val_idx) == 2000
    assert np.intersect1d(train_idx, val_idx).size == 0
    assert np.array_equal(np.union1d(train_idx, val_idx), np.arange(10000))
    assert np.array_equal(np.bincount(labels[train_idx]), [800] * 10)
    assert np.array_equal(np.bincount(labels[val_idx]), [200] * 10)
    # the salt matters (the split is not, e.g., "the last 200 of each class") ...
    other_train, _ = demo_split_indices(labels, 200, seed=DEMO_SPLIT_SEED + 1)
    assert not np.array_equal(other_train, train_idx)
    # ... and the split does not depend on any RNG state
    torch.manual_seed(123)
    np.random.seed(5)
    again_train, again_val = demo_split_indices(labels, 200)
    assert np.array_equal(again_train, train_idx) and np.array_equal(again_val, val_idx)

    images = torch.from_numpy(read_idx(DEMO_IMAGES))
    cfg = _yaml_cfg("demo")
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert train.classes == FMNIST_CLASSES and len(train) == 8000 and len(val) == 2000
    assert train.targets == labels[train_idx].tolist() and val.targets == labels[val_idx].tolist()
    assert torch.equal(train.images[:, 0], images[torch.from_numpy(train_idx)])
    assert torch.equal(val.images[:, 0], images[torch.from_numpy(val_idx)])
    x, y = val[7]
    assert x.shape == (1, 28, 28) and y == int(labels[val_idx[7]])
    with pytest.raises(DatasetError, match="val_per_class"):
        demo_split_indices(labels, 1000)


# ----------------------------------------------------------------------------- transforms


def test_normalize_denormalize_round_trip_and_reference():
    cfg = _cfg(mean=[0.1, 0.2, 0.3], std=[0.5, 0.25, 2.0])
    x = torch.rand(2, 3, 5, 5)
    y = normalize(x, cfg)
    torch.testing.assert_close(y[:, 1], (x[:, 1] - 0.2) / 0.25)
    torch.testing.assert_close(denormalize(y, cfg), x)
    torch.testing.assert_close(denormalize(normalize(x[0], cfg), cfg), x[0])
    assert normalize_params(cfg) == ((0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    with pytest.raises(DatasetError):
        normalize(torch.rand(2, 1, 5, 5), cfg)


def test_eval_transform_same_for_pil_and_uint8_tensor():
    cfg = _cfg(image_size=8)
    arr = np.random.default_rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a = eval_transform(cfg)(Image.fromarray(arr))
    b = eval_transform(cfg)(torch.from_numpy(arr).permute(2, 0, 1))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, _expected_pixels(arr.transpose(2, 0, 1), [0.5] * 3, [0.25] * 3))
    big = eval_transform(_cfg(image_size=8, eval_crop_ratio=0.5))(torch.zeros(3, 40, 30, dtype=torch.uint8))
    assert big.shape == (3, 8, 8)


def test_train_transforms():
    img = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (3, 8, 8), dtype=np.uint8))
    # no padding and no flip: the pad-crop pipeline must reduce to the eval transform
    plain = train_transform(_cfg(train_aug="pad_crop_flip", crop_padding=0, hflip=False))
    torch.testing.assert_close(plain(img), eval_transform(_cfg())(img))
    aug = train_transform(_cfg(crop_padding=2))
    torch.manual_seed(0)
    outs = [aug(img) for _ in range(8)]
    torch.manual_seed(0)
    assert all(torch.equal(o, aug(img)) for o in outs)  # reproducible from the seed
    assert any(not torch.equal(o, outs[0]) for o in outs)  # and actually random
    rrc = train_transform(_cfg(image_size=48))
    assert rrc(torch.zeros(3, 60, 70, dtype=torch.uint8)).shape == (3, 48, 48)
    with pytest.raises(DatasetError, match="train_aug"):
        train_transform(_cfg(train_aug="autoaugment"))


# ----------------------------------------------------------------------------- archive


def test_extract_archive_idempotent(tmp_path):
    src = tmp_path / "src"
    _folder_tree(src, "train", {"a": 2})
    tar_path = tmp_path / "x.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(src / "train", arcname="train")
    dest = extract_archive(tar_path, tmp_path / "data" / "x")
    assert sorted(p.name for p in (dest / "train" / "a").iterdir()) == ["000.png", "001.png"]
    stamp = (dest / "train" / "a" / "000.png").stat().st_mtime_ns
    (dest / "train" / "a" / "000.png").write_bytes(b"changed")  # a second call must not re-extract
    assert extract_archive(tar_path, dest) == dest
    assert (dest / "train" / "a" / "000.png").read_bytes() == b"changed" and stamp > 0
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="was not extracted"):
        extract_archive(tar_path, tmp_path / "other")
    with pytest.raises(DatasetError, match="archive not found"):
        extract_archive(tmp_path / "missing.tar.gz", tmp_path / "y")
    assert not any(p.name.startswith(".x.") for p in (tmp_path / "data").iterdir())  # no temp dir left


# ----------------------------------------------------------------------------- configs


REQUIRED = {"name", "type", "num_classes", "channels", "image_size", "mean", "std", "root", "train_dir", "val_dir"}
REQUIRED |= {"in_memory", "download", "recipe"}
RECIPE_KEYS = {
    "squeeze": {"epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum"},
    "recover": {"iterations", "lr", "alpha", "first_bn_multiplier", "tv_l2", "l2", "jitter"},
    "student": {"epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "warmup_epochs", "scheduler"}
    | {"temperature", "label_smoothing", "mix"},
}


def test_dataset_yamls_compose_with_hydra(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = tmp_path / "conf"
    shutil.copytree(CONF / "dataset", conf / "dataset")
    shutil.copytree(CONF / "paths", conf / "paths")
    (conf / "config.yaml").write_text("defaults:\n  - dataset: demo\n  - paths: default\n  - _self_\n")
    monkeypatch.setenv("LPLD_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("LPLD_CIFAR10_JPG", "/somewhere/cifar10-jpg")
    assert {"demo", "fmnist", "cifar10", "cifar100", "cifar10_jpg", "imagefolder", "in1k", "tiny", "in21k"} <= set(
        DATASET_YAMLS
    )
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert compose("config").dataset.name == "demo"
        for name in DATASET_YAMLS:
            over = [f"dataset={name}"] + (["dataset.num_classes=7"] if name == "imagefolder" else [])
            cfg = compose("config", overrides=over)
            ds = OmegaConf.to_container(cfg.dataset, resolve=True)
            assert REQUIRED <= set(ds), name
            assert len(ds["mean"]) == len(ds["std"]) == ds["channels"], name
            for section, keys in RECIPE_KEYS.items():
                assert keys <= set(ds["recipe"][section]), (name, section)
            assert ds["recipe"]["student"]["mix"] in ("cutmix", "cutout", "none")
            assert ds["recipe"]["student"]["optimizer"] in ("adamw", "sgd")
            if name == "demo":
                assert ds["root"] is None
            elif name == "cifar10_jpg":
                assert ds["root"] == "/somewhere/cifar10-jpg" and ds["val_dir"] == "test"
            else:
                assert ds["root"].startswith(str(tmp_path / "d")), name
            if name.startswith("cifar"):
                assert ds["download"] is False
        jpg = compose("config", overrides=["dataset=cifar10_jpg"]).dataset
        monkeypatch.delenv("LPLD_CIFAR10_JPG")
        assert jpg.root == str(tmp_path / "d" / "cifar10-jpg")


def test_paper_recipes_match_appendix_c():
    in1k, tiny, in21k = (_yaml_cfg(n) for n in ("in1k", "tiny", "in21k"))
    assert {k: recipe(in1k, "recover")[k] for k in ("iterations", "lr", "alpha")} == {
        "iterations": 4000,
        "lr": 0.25,
        "alpha": 0.01,
    }
    s = recipe(in1k, "student")
    assert (s["optimizer"], s["lr"], s["batch_size"], s["epochs"], s["mix"], s["temperature"]) == (
        "adamw",
        1e-3,
        128,
        300,
        "cutmix",
        20.0,
    )
    assert [recipe(tiny, "recover")[k] for k in ("iterations", "lr", "alpha")] == [4000, 0.1, 0.05]
    s = recipe(tiny, "student")
    assert (s["optimizer"], s["lr"], s["momentum"], s["weight_decay"], s["batch_size"], s["epochs"]) == (
        "sgd",
        0.2,
        0.9,
        1e-4,
        64,
        100,
    )
    assert s["warmup_epochs"] == 5
    assert [recipe(in21k, "recover")[k] for k in ("iterations", "lr", "alpha")] == [2000, 0.05, 0.25]
    s = recipe(in21k, "student")
    assert (s["lr"], s["weight_decay"], s["batch_size"], s["epochs"], s["label_smoothing"], s["mix"]) == (
        0.002,
        0.01,
        32,
        300,
        0.2,
        "cutout",
    )


def test_recipe_ipc_table():
    cfg = {"recipe": {"student": {"epochs": 5, "batch_size": 64, "opt": {"lr": 1.0, "wd": 2.0}}}}
    cfg["recipe"]["ipc_table"] = {1: {"student": {"batch_size": 10}}, 50: {"student": {"opt": {"lr": 0.5}}}}
    assert recipe(cfg, "student")["batch_size"] == 64
    assert recipe(cfg, "student", ipc=1)["batch_size"] == 10
    assert recipe(cfg, "student", ipc=10)["batch_size"] == 10  # largest threshold <= ipc
    got = recipe(cfg, "student", ipc=100)
    assert got["batch_size"] == 64 and got["opt"] == {"lr": 0.5, "wd": 2.0}  # nested merge
    assert recipe(cfg, "recover", ipc=1) == {}
    assert recipe(cfg, "student")["batch_size"] == 64  # the config itself was not mutated
    with pytest.raises(DatasetError):
        recipe(cfg, "relabel")
    demo = _yaml_cfg("demo")
    assert recipe(demo, "student", ipc=1)["batch_size"] == 10 and recipe(demo, "recover", ipc=10)["iterations"] == 200
