"""Range checks of the knobs every stage reads, run before any work starts (``lpld.stages.preflight``).

The schema (``lpld.config.schema``) decides the *type* of a value; these checks decide whether a well-typed
value is usable, and name the key and a valid value, so that ``prune.ratio=1.0`` or ``seed=10**20`` is refused
as one line before a folder is created, instead of failing deep inside numpy, torch or Lightning.

    check_values(cfg)          every check below that applies to the composed config
    check_seed(cfg)            seed, teacher_seed in 0..2**32-1
    check_prune_ratio(cfg)     prune.ratio a number in [0, 1)
    check_verify(cfg)          stage.verify in fast|full|none
    check_num_workers(cfg)     trainer.num_workers, stage.num_workers >= 0
    check_chunk(cfg)           stage.chunk >= 1
    check_accelerator(cfg)     trainer=gpu (or ddp) needs a visible CUDA GPU
"""

from __future__ import annotations

import math
from typing import Any

from lpld.config.precedence import node_get
from lpld.errors import ConfigError

# Lightning's seed_everything (student, squeeze), numpy's legacy seeding and PYTHONHASHSEED (inherited by every
# subprocess: DDP ranks, DataLoader workers) all take an unsigned 32-bit seed; torch alone would take 64 bits.
SEED_MAX = 2**32 - 1
SEED_KEYS = ("seed", "teacher_seed")
VERIFY_MODES = ("fast", "full", "none")  # lpld.core.label_store.LabelStore.open
GPU_ACCELERATORS = ("gpu", "cuda")
# stages that build a Lightning Trainer (the others only read files or print predictions)
TRAINER_STAGES = ("squeeze", "stats", "recover", "relabel", "student", "pipeline")


def _whole(v: Any) -> int | None:
    """``v`` as an int when it is a whole number (int, integral float, digit string), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return None
    return None


def check_seed(cfg: Any) -> None:
    """``seed`` / ``teacher_seed`` in 0..2**32-1 (a non-integer is refused by the type check first)."""
    for key in SEED_KEYS:
        v = _whole(node_get(cfg, key))
        if v is not None and not 0 <= v <= SEED_MAX:
            raise ConfigError(
                f"{key}={v} is out of range: seeds must be in 0..{SEED_MAX} (2**32-1, what Lightning, numpy and "
                f"PYTHONHASHSEED accept); set {key}=<0..{SEED_MAX}>, e.g. {key}=0"
            )


def check_prune_ratio(cfg: Any) -> None:
    """``prune.ratio`` is a number in [0, 1): the share of the relabel schedule's batches dropped."""
    prune = node_get(cfg, "prune")
    v = node_get(prune, "ratio")
    if v is None:
        return
    hint = "prune=<1x|2x|10x|20x|40x|100x> or prune.ratio=<r> with 0 <= r < 1 (10x: prune.ratio=0.9)"
    try:
        r = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"prune.ratio={v!r} is not a number; set {hint}") from None
    if isinstance(v, bool) or not math.isfinite(r) or not 0.0 <= r < 1.0:
        raise ConfigError(
            f"prune.ratio={v!r} is outside [0, 1) (the share of label batches dropped: 1 keeps none); set {hint}"
        )


def check_verify(cfg: Any) -> None:
    """``stage.verify`` (student, storage) in fast|full|none."""
    v = node_get(node_get(cfg, "stage"), "verify")
    if v is not None and str(v) not in VERIFY_MODES:
        raise ConfigError(
            f"stage.verify={v!r} is not a label-store check; set stage.verify=<{'|'.join(VERIFY_MODES)}> "
            "(fast: sizes, headers and sampled checksums; full: every byte; none: no check)"
        )


def check_num_workers(cfg: Any) -> None:
    """``trainer.num_workers`` and ``stage.num_workers`` are whole numbers >= 0 (``stage.num_workers`` may be null)."""
    for node, key in ((node_get(cfg, "trainer"), "trainer.num_workers"), (node_get(cfg, "stage"), "stage.num_workers")):
        v = node_get(node, "num_workers")
        if v is None:
            continue
        n = _whole(v)
        if n is None or n < 0:
            raise ConfigError(
                f"{key}={v!r} must be a whole number >= 0 (DataLoader worker processes; 0 loads in the main "
                f"process); set {key}=0"
            )


def check_chunk(cfg: Any) -> None:
    """``stage.chunk`` (relabel: stored batches between commits) is a whole number >= 1."""
    v = node_get(node_get(cfg, "stage"), "chunk")
    if v is None:
        return
    n = _whole(v)
    if n is None or n < 1:
        raise ConfigError(
            f"stage.chunk={v!r} must be a whole number >= 1 (stored batches written between two commits of the "
            "label store; a killed run resumes from the last commit); set stage.chunk=32"
        )


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def check_accelerator(cfg: Any) -> None:
    """A GPU trainer preset (``trainer=gpu``, ``ddp``, ``ddp_spawn``) on a machine without a visible CUDA GPU is
    refused before the stage moves, writes or trains anything (only for stages that build a Trainer)."""
    stage = str(node_get(node_get(cfg, "stage"), "name"))
    acc = node_get(node_get(cfg, "trainer"), "accelerator")
    if node_get(cfg, "show"):  # `show=true` runs nothing: describing a GPU job from a laptop is what it is for
        return
    if stage not in TRAINER_STAGES or acc is None or str(acc).lower() not in GPU_ACCELERATORS:
        return
    if not cuda_visible():
        raise ConfigError(
            f"trainer=gpu (trainer.accelerator={acc}) needs a CUDA GPU; none is visible on this machine "
            "(torch.cuda.is_available() is False: check CUDA_VISIBLE_DEVICES and the driver); use trainer=cpu "
            "(trainer=ddp_cpu for several CPU processes)"
        )


def check_values(cfg: Any) -> None:
    """Every range check of this module (each one is a no-op for a key the config does not have).

    Raises:
        ConfigError: naming the key, its value and a valid value.
    """
    check_seed(cfg)
    check_prune_ratio(cfg)
    check_verify(cfg)
    check_num_workers(cfg)
    check_chunk(cfg)
    check_accelerator(cfg)
