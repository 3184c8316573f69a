"""Bad-input table (issue 14): each case's message names the offending key or file and the fix.

Fast: cases call the resolvers, loaders and checkers the stages call, not the command line.
"""

from __future__ import annotations

import copy
import errno
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from lpld.config.compose import compose as compose_overrides
from lpld.config.schema import check_known_keys
from lpld.core.images import class_dir_name, image_hashes, images_fingerprint, load_distilled, save_png
from lpld.core.io import ArtifactError, atomic_torch_save, atomic_write_json
from lpld.core.label_store import LabelStore, done_bitmap, prepare
from lpld.core.quant import QuantConfig
from lpld.data.errors import DatasetError
from lpld.stages import ConfigError, run_stage, translate_error

from .helpers import META, build_store, compose_cfg, copy_store, flip_byte, npy_data_offset, spec


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    cfg = compose_cfg(["stage=recover", "logger=none", f"paths.root={root}", "dataset=demo", "recover=sre2l"], raw=True)
    store = build_store(root / "store")
    imgs = root / "images"
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        for j in range(2):
            save_png(
                imgs / class_dir_name(c, f"c{c}") / f"{j:05d}.png",
                torch.randint(0, 256, (3, 4, 4), generator=g, dtype=torch.uint8),
            )
    atomic_write_json(
        imgs / "manifest.json",
        {
            "complete": True,
            "teacher_fingerprint": "t0",
            "images_fingerprint": images_fingerprint(imgs),
            "file_hashes": image_hashes(imgs),
        },
    )
    return {"root": root, "cfg": cfg, "store": store, "images": imgs}


def with_(cfg, **updates):
    """A copy of cfg with dotted keys set (values as a command line would give them)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for k, v in updates.items():
            OmegaConf.update(out, k.replace("__", "."), v, merge=False, force_add=True)
    return out


def recover_settings(cfg):
    from lpld.config import recover_settings

    return recover_settings(cfg)


def class_range(cfg):
    from lpld.stages.recover import class_range as cr

    return cr(cfg, recover_settings(cfg))


def student_settings(cfg, **man):
    from lpld.stages.student import student_settings as ss

    return ss(cfg, {"epochs": 3, "granularity": "batch", "quant": {"mode": "none"}, **man})


def metric_settings(cfg):
    from lpld.stages.student import metric_settings as ms

    return ms(cfg)


def corrupt_store(ctx, tmp, edit: Callable[[Path], None], verify="fast", read=False):
    path = copy_store(ctx["store"], tmp / "s")
    edit(path)
    st = LabelStore.open(path, verify=verify)
    if read:
        for i in range(len(st)):
            st.read(i)


def edit_manifest(path: Path, **kv):
    man = json.loads((path / "manifest.json").read_text())
    man.update(kv)
    (path / "manifest.json").write_text(json.dumps(man))


def truncate(f: Path, keep: int | None = None):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2 if keep is None else keep])


def images_copy(ctx, tmp, edit: Callable[[Path], None], **kw):
    import shutil

    d = tmp / "imgs"
    shutil.copytree(ctx["images"], d)
    edit(d)
    return load_distilled(d, **kw)


def first_png(d: Path) -> Path:
    return sorted(d.rglob("*.png"))[0]


def flip_middle(f: Path):
    flip_byte(f, f.stat().st_size // 2)


def os_error(code: int, name: str):
    return translate_error(OSError(code, errno.errorcode[code], name))


def stats_file(tmp: Path, fp: str = "other") -> Path:
    p = tmp / "exact.pt"
    atomic_torch_save(
        p,
        {"layers": [], "mean": [], "var": [], "count": torch.ones(2), "teacher_fingerprint": fp, "mode": "exact"},
    )
    return p


def raise_(e: BaseException):
    raise e


def load_stats(p, fp=None):
    from lpld.core.bnstats import load_classwise_stats

    return load_classwise_stats(p, fp)


def teacher_file(tmp: Path, blob=None, raw: bytes | None = None):
    from lpld.artifacts import teacher as teacher_artifact

    p = tmp / "teacher.pt"
    if raw is not None:
        p.write_bytes(raw)
    else:
        atomic_torch_save(p, blob)
    return teacher_artifact.read(p)


def bad_image(tmp: Path, data: bytes, name="x.jpg"):
    from lpld.data.datasets import load_image

    p = tmp / name
    p.write_bytes(data)
    return load_image(p, "RGB")


def jpeg_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def dataset(**kw):
    from lpld.data import build_dataset

    base = {
        "type": "imagefolder",
        "name": "x",
        "num_classes": 2,
        "channels": 3,
        "image_size": 8,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "train_dir": "train",
        "val_dir": "val",
    }
    return build_dataset({**base, **kw}, "train")


def stage_names(cfg, name):
    c = copy.deepcopy(cfg)
    with open_dict(c):
        c.stage.name = name
    return run_stage(c)


def small_spec(**kw):
    return spec(**kw)


# (id, call(ctx, tmp), exception type, substrings the message must hold: the key or file, and the fix)
CASES: list[tuple[str, Callable, type, list[str]]] = [
    # config types: the key and an example value
    ("ipc=abc", lambda c, t: check_known_keys(with_(c["cfg"], ipc="abc")), ConfigError, ["ipc='abc'", "ipc=10"]),
    ("ipc=2.5", lambda c, t: check_known_keys(with_(c["cfg"], ipc=2.5)), ConfigError, ["ipc=2.5", "ipc=2"]),
    ("seed=abc", lambda c, t: check_known_keys(with_(c["cfg"], seed="abc")), ConfigError, ["seed='abc'", "seed="]),
    ("seed=1.5", lambda c, t: check_known_keys(with_(c["cfg"], seed=1.5)), ConfigError, ["seed=1.5", "seed=1"]),
    (
        "teacher_seed=x",
        lambda c, t: check_known_keys(with_(c["cfg"], teacher_seed="x")),
        ConfigError,
        ["teacher_seed='x'", "teacher_seed=<integer>"],
    ),
    (
        "quant.k=2.5",
        lambda c, t: compose_overrides(["quant.k=2.5"]),
        ConfigError,
        ["quant.k=2.5", "quant.k=2"],
    ),
    (
        "student.epochs=ten",
        lambda c, t: compose_overrides(["student.epochs=ten"]),
        ConfigError,
        ["student.epochs='ten'", "student.epochs=<integer>"],
    ),
    (
        "recover.iterations=1.5",
        lambda c, t: compose_overrides(["recover.iterations=1.5"]),
        ConfigError,
        ["recover.iterations=1.5", "recover.iterations=1"],
    ),
    (
        "dataset.image_size=big",
        lambda c, t: compose_overrides(["dataset.image_size=big"]),
        ConfigError,
        ["dataset.image_size='big'", "dataset.image_size=<integer>"],
    ),
    (
        "recover.lr=fast (float conversion)",
        lambda c, t: raise_(
            translate_error(
                # the recipe is a plain mapping: a string reaches the resolver, whose float() names no key
                ValueError("could not convert string to float: 'fast'"),
                with_(c["cfg"], dataset__recipe__recover__lr="fast"),
            )
        ),
        ConfigError,
        ["dataset.recipe.recover.lr='fast'", "dataset.recipe.recover.lr=<number>"],
    ),
    ("stage=bogus", lambda c, t: stage_names(c["cfg"], "bogus"), ConfigError, ["bogus", "stage=<name>"]),
    # recover knobs
    (
        "recover.iterations=0",
        lambda c, t: recover_settings(with_(c["cfg"], recover__iterations=0)),
        ConfigError,
        ["recover.iterations", "recover.iterations=1000"],
    ),
    (
        "recover.lr=0",
        lambda c, t: recover_settings(with_(c["cfg"], recover__lr=0)),
        ConfigError,
        ["recover.lr", "recover.iterations=1000"],
    ),
    (
        "recover=bogus",
        lambda c, t: recover_settings(with_(c["cfg"], recover__name="bogus")),
        ConfigError,
        ["bogus", "recover=<"],
    ),
    ("ipc=0", lambda c, t: recover_settings(with_(c["cfg"], ipc=0)), ConfigError, ["ipc", ">= 1"]),
    (
        "recover.rrc_scale_min=2",
        lambda c, t: recover_settings(with_(c["cfg"], recover__rrc_scale_min=2.0)),
        ConfigError,
        ["recover.rrc_scale_min", "<= 1"],
    ),
    (
        "recover.init=zeros",
        lambda c, t: recover_settings(with_(c["cfg"], recover__init="zeros")),
        ConfigError,
        ["recover.init=zeros", "random"],
    ),
    (
        "recover.class_end=999",
        lambda c, t: class_range(with_(c["cfg"], recover__class_end=999)),
        ConfigError,
        ["recover.class_end", "recover.class_end <= 10"],
    ),
    (
        "recover.group_classes=0",
        lambda c, t: recover_settings(with_(c["cfg"], recover__group_classes=0)),
        ConfigError,
        ["recover.group_classes", ">= 1"],
    ),
    # quantization and pruning
    ("quant.k=0", lambda c, t: QuantConfig("mr", 0).validate(10), ValueError, ["quant.k=0", "quant.k=9"]),
    ("quant.k=C", lambda c, t: QuantConfig("ms", 10).validate(10), ValueError, ["quant.k=10", "1..9"]),
    (
        "quant.temperature=0",
        lambda c, t: QuantConfig("ms", 3, 0.0).validate(10),
        ValueError,
        ["quant.temperature", "> 0"],
    ),
    (
        "prune=100x on 10 batches",
        lambda c, t: prepare(t / "p", small_spec(prune_name="100x", prune_ratio=0.99), META),
        ArtifactError,
        ["prune=100x", "lower ratio"],
    ),
    ("relabel relabel.epochs=0", lambda c, t: small_spec(epochs=0), ValueError, ["epochs > 0", "relabel.epochs"]),
    # label store artifacts
    ("no store", lambda c, t: LabelStore.open(t / "nope"), ArtifactError, ["nope", "run stage=relabel"]),
    (
        "incomplete store",
        lambda c, t: corrupt_store(c, t, lambda p: edit_manifest(p, complete=False)),
        ArtifactError,
        ["incomplete", "rerun stage=relabel with the same"],
    ),
    (
        "truncated logits.npy",
        lambda c, t: corrupt_store(c, t, lambda p: truncate(p / "logits.npy")),
        ArtifactError,
        ["logits.npy", "stage.overwrite=true"],
    ),
    (
        "flipped logits byte",
        lambda c, t: corrupt_store(
            c, t, lambda p: flip_byte(p / "logits.npy", npy_data_offset(p / "logits.npy") + 5), verify="none", read=True
        ),
        ArtifactError,
        ["logits.npy", "stored batch 0", "stage.overwrite=true"],
    ),
    (
        "old store format",
        lambda c, t: corrupt_store(c, t, lambda p: edit_manifest(p, format="lpld-label-store/1")),
        ArtifactError,
        ["lpld-label-store/1", "stage.overwrite=true"],
    ),
    (
        "corrupt manifest.json",
        lambda c, t: corrupt_store(c, t, lambda p: (p / "manifest.json").write_text("{")),
        ArtifactError,
        ["manifest.json", "stage.overwrite=true"],
    ),
    (
        "bad npy header",
        lambda c, t: corrupt_store(c, t, lambda p: flip_byte(p / "crops.npy", 0)),
        ArtifactError,
        ["crops.npy", "stage.overwrite=true"],
    ),
    (
        "store of another config",
        lambda c, t: prepare(copy_store(c["store"], t / "s"), small_spec(seed=4), META),
        ArtifactError,
        ["seed", "stage.overwrite=true"],
    ),
    (
        "corrupt progress file",
        lambda c, t: (
            prepare(t / "s", small_spec(), META),
            (t / "s" / "progress.0.npy").write_bytes(b"junk"),
            done_bitmap(t / "s", 10),
        ),
        ArtifactError,
        ["progress.0.npy", "delete it"],
    ),
    (
        "store for another spec (student)",
        lambda c, t: LabelStore.open(c["store"]).check_spec(small_spec(epochs=8)),
        ArtifactError,
        ["epochs", "run stage=relabel"],
    ),
    # distilled images
    ("no images", lambda c, t: load_distilled(t / "none"), ArtifactError, ["manifest.json", "stage=recover"]),
    (
        "incomplete images",
        lambda c, t: images_copy(
            c,
            t,
            lambda d: atomic_write_json(
                d / "manifest.json", {**json.loads((d / "manifest.json").read_text()), "complete": False}
            ),
        ),
        ArtifactError,
        ["incomplete", "stage=recover"],
    ),
    (
        "images of another teacher",
        lambda c, t: images_copy(c, t, lambda d: None, expect_teacher_fingerprint="t1"),
        ArtifactError,
        ["t0", "stage.allow_other_teacher=true"],
    ),
    (
        "changed PNG",
        lambda c, t: images_copy(c, t, lambda d: flip_middle(first_png(d))),
        ArtifactError,
        ["0000_c0/00000.png", "recover.overwrite=true"],
    ),
    (
        "truncated PNG",
        lambda c, t: images_copy(c, t, lambda d: truncate(first_png(d), 40)),
        ArtifactError,
        ["0000_c0/00000.png", "recover.overwrite=true"],
    ),
    (
        "extra PNG",
        lambda c, t: images_copy(
            c, t, lambda d: save_png(d / "0001_c1" / "00009.png", torch.zeros(3, 4, 4, dtype=torch.uint8))
        ),
        ArtifactError,
        ["0001_c1/00009.png", "recover.overwrite=true"],
    ),
    # stats and teachers
    (
        "stats of another teacher",
        lambda c, t: load_stats(stats_file(t), "mine"),
        ArtifactError,
        ["other", "recover.allow_other_teacher=true"],
    ),
    ("no stats", lambda c, t: load_stats(t / "none.pt"), ArtifactError, ["none.pt", "stage=stats"]),
    (
        "truncated teacher.pt",
        lambda c, t: teacher_file(t, raw=b"PK\x03\x04trunc"),
        ArtifactError,
        ["teacher.pt", "rerun stage=squeeze with stage.overwrite=true"],
    ),
    (
        "teacher.pt without state_dict",
        lambda c, t: teacher_file(t, blob={"weights": torch.zeros(1)}),
        ArtifactError,
        ["teacher.pt", "rerun stage=squeeze with stage.overwrite=true"],
    ),
    # data
    ("truncated JPEG", lambda c, t: bad_image(t, jpeg_bytes()[:60]), DatasetError, ["x.jpg", "Replace it"]),
    ("not an image", lambda c, t: bad_image(t, b"hello", "y.png"), DatasetError, ["y.png", "Replace it"]),
    ("dataset.root missing", lambda c, t: dataset(root=str(t / "nodata")), DatasetError, ["nodata", "dataset.root"]),
    (
        "dataset.channels=2",
        lambda c, t: dataset(root=str(t), channels=2),
        DatasetError,
        ["dataset.channels=2", "1 or 3"],
    ),
    # student knobs
    (
        "student.loss=foo",
        lambda c, t: student_settings(with_(c["cfg"], student__loss="foo")),
        ConfigError,
        ["student.loss='foo'", "valid:"],
    ),
    (
        "student.accumulate=0",
        lambda c, t: student_settings(with_(c["cfg"], student__accumulate=0)),
        ConfigError,
        ["student.accumulate", ">= 1"],
    ),
    (
        "metric=bogus",
        lambda c, t: metric_settings(with_(c["cfg"], metric__name="bogus")),
        ConfigError,
        ["metric='bogus'", "valid:"],
    ),
    # the file system
    (
        "disk full",
        lambda c, t: raise_(os_error(errno.ENOSPC, "/a/b")),
        ArtifactError,
        ["/a/b", "is full", "paths.artifacts"],
    ),
    (
        "read-only folder",
        lambda c, t: raise_(os_error(errno.EROFS, "/ro/x")),
        ArtifactError,
        ["/ro/x", "writable", "paths.artifacts="],
    ),
    (
        "forbidden folder",
        lambda c, t: raise_(os_error(errno.EACCES, "/root/x")),
        ArtifactError,
        ["/root/x", "paths.artifacts="],
    ),
]


def test_the_table_has_at_least_40_cases():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_message_names_key_or_file_and_fix(ctx, tmp_path, case):
    _, call, exc, needles = case
    with pytest.raises(exc) as ei:
        call(ctx, tmp_path)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in: {msg}"
