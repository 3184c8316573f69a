"""Shared test setup: quiet, offline, deterministic, small thread count."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LPLD_NO_RICH", "1")
os.environ.setdefault("LPLD_CONF", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf"))

import torch  # noqa: E402

import lpld.config  # noqa: E402,F401 - registers the typed config schemas before any test composes the tree

# Tests use tiny tensors: one thread avoids thread-pool overhead dominating (measured 0.6 s vs 2 ms).
torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def compose_cfg(overrides: list[str], config_name: str = "config", config_dir: Path = CONF, raw: bool = False):
    """Compose the real config tree (Hydra compose API) with overrides, frozen into the Experiment a stage runs on
    (``overrides`` recorded as its command line); ``raw=True``: the composed Hydra config itself (what dispatch
    validates and freezes: config-layer tests)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    if raw or config_name != "config":
        return cfg
    from lpld.config.experiment import freeze

    return freeze(cfg, list(overrides))


def frozen(cfg, **mutations):
    """A hand-built config (an OmegaConf node or a dict holding only the groups a test needs) as the frozen
    Experiment a stage runs on; ``mutations`` set dotted keys (``stage__name="x"`` sets ``stage.name``)."""
    from omegaconf import OmegaConf

    from lpld.config.frozen import Experiment

    if isinstance(cfg, Experiment):
        exp = cfg
    else:
        values = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        values.setdefault("ipc", 10)
        values.setdefault("seed", 0)
        exp = Experiment.from_mapping(values)
    return exp.with_values({k.replace("__", "."): v for k, v in mutations.items()}) if mutations else exp


def write_image_tree(
    root: Path,
    n_classes: int,
    per_class: int,
    size: int = 8,
    channels: int = 3,
    seed: int = 0,
    splits: tuple[str, ...] = ("train", "val"),
) -> Path:
    """A tiny class-folder tree (PNG) whose classes are separable by mean colour/brightness."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(n_classes):
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = c * 255 // max(1, n_classes - 1)
                arr = np.clip(base + rng.normal(0, 20, (size, size, channels)), 0, 255).astype(np.uint8)
                img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode="L" if channels == 1 else "RGB")
                img.save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def tiny_tree(tmp_path):
    return write_image_tree(tmp_path / "data", n_classes=4, per_class=6)


def tiny_overrides(tmp_path: Path, data_root: Path, n_classes: int = 4, size: int = 8) -> list[str]:
    """Overrides for a seconds-long run on a tiny imagefolder tree with a narrow ConvNet."""
    return [
        "dataset=imagefolder",
        f"dataset.root={data_root}",
        f"dataset.num_classes={n_classes}",
        f"dataset.image_size={size}",
        "dataset.channels=3",
        "model=convnet",
        "model.width=8",
        "logger=none",
        f"paths.root={tmp_path}",
        "trainer.num_workers=0",
    ]


def tiny_chain_overrides(tmp: Path, *extra: str) -> list[str]:
    """A 4-class, 8-px imagefolder tree under ``tmp/data`` (made once) and the overrides of a seconds-long chain:
    random-real images (ipc 3), a 2-epoch student schedule of batch 4."""
    root = tmp / "data"
    if not root.exists():
        write_image_tree(root, n_classes=4, per_class=6, size=8)
    return [
        *tiny_overrides(tmp, root, n_classes=4, size=8),
        "ipc=3",
        "recover=random_real",
        "dataset.recipe.student.epochs=2",
        "dataset.recipe.student.batch_size=4",
        "dataset.recipe.student.rrc_scale=[0.5,1.0]",
        *extra,
    ]


def make_tiny_chain(tmp: Path, *extra: str) -> tuple[Path, list[str]]:
    """A random teacher (saved where squeeze would), random-real images and their 1x label store, in process
    (a few seconds); returns (tmp, overrides) for the stages that follow (student, show, report ...)."""
    import torch

    from lpld.artifacts import teacher
    from lpld.core.io import atomic_torch_save, fingerprint_state_dict
    from lpld.stages import run_stage
    from lpld.stages.common import build_teacher_model

    ov = tiny_chain_overrides(tmp, *extra)
    cfg = compose_cfg(["stage=squeeze", *ov])
    torch.manual_seed(0)
    state = build_teacher_model(cfg).state_dict()
    atomic_torch_save(teacher.path(cfg), {"state_dict": state, "fingerprint": fingerprint_state_dict(state), "val": {}})
    run_stage(compose_cfg(["stage=recover", *ov]))
    run_stage(compose_cfg(["stage=relabel", *ov]))
    return tmp, ov


def run_cli(tmp_path: Path, *args: str, **env: str):
    """``python run.py logger=none paths.root=<tmp> <args>`` in ``tmp_path`` as a user would type it (no debug
    variables, no rich bars, W&B off); ``env`` adds variables. Returns the CompletedProcess."""
    import subprocess
    import sys

    e = {k: v for k, v in os.environ.items() if k not in ("LPLD_DEBUG", "HYDRA_FULL_ERROR")}
    e.update(LPLD_NO_RICH="1", WANDB_MODE="disabled", **env)
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), "logger=none", f"paths.root={tmp_path}", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=e,
    )
