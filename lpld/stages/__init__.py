"""Stage dispatch: ``stage=<name>`` runs ``lpld.stages.<name>.run(cfg)``.

Each stage module is imported lazily, so `python run.py stage=stats` does not pay for the
imports of the student stage, and a stage added later needs only its module and its
``conf/stage/<name>.yaml`` plus an entry in STAGES.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import random
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from lpld.config.schema import check_known_keys
from lpld.errors import ConfigError, user_error_types  # re-exported: ``from lpld.stages import ConfigError`` works

log = logging.getLogger("lpld")

# name -> one-line description (shown when an unknown stage is requested)
STAGES: dict[str, str] = {
    "squeeze": "train the teacher on the full real train set",
    "stats": "record class-wise BatchNorm statistics of the teacher",
    "recover": "synthesize the distilled images (lpld, sre2l, lpld_c, cda, rded, random_real)",
    "relabel": "generate the (pruned, quantized) soft-label store",
    "student": "train/evaluate a student on distilled images + stored labels",
    "storage": "print the storage accounting of a label store, or predict it for a config",
    "plan": "predicted memory per rank (host, GPU) and label-store size / files for a config and world size",
    "report": "turn results records into paper-shaped tables and a Pareto plot",
    "analyze": "diversity metrics (cosine similarity, MMD), Eq. 8, image grids",
    "pipeline": "squeeze -> stats -> recover -> relabel -> student over a small grid, then report",
}


# Whole-number keys: a float (ipc=2.5) or a non-number (ipc=abc) is refused naming the key, never truncated.
INT_KEYS = (
    "ipc",
    "seed",
    "teacher_seed",
    "dataset.num_classes",
    "dataset.image_size",
    "dataset.channels",
    "recover.iterations",
    "recover.jitter",
    "recover.classes_per_batch",
    "recover.class_start",
    "recover.class_end",
    "recover.group_classes",
    "quant.k",
    "student.epochs",
    "student.batch_size",
    "student.accumulate",
    "stage.epochs",
    "stage.batch_size",
    "relabel.epochs",
    "relabel.batch_size",
    "stage.chunk",
    "stage.val_every",
    "stage.ckpt_every",
)
DEBUG_ENV = ("LPLD_DEBUG", "HYDRA_FULL_ERROR")  # either set to 1: user errors keep their traceback


def check_config_types(cfg: DictConfig) -> None:
    """Refuse non-integer values of the whole-number keys (``INT_KEYS``), naming the key and an example fix.

    Raises:
        ConfigError: e.g. ``ipc=2.5`` or ``seed=abc``.
    """
    from omegaconf import OmegaConf

    for key in INT_KEYS:
        try:
            v = OmegaConf.select(cfg, key, default=None)
        except Exception:  # noqa: BLE001 - an unresolvable interpolation is reported where it is used
            continue
        if v is None or isinstance(v, bool) or isinstance(v, int):
            continue
        if isinstance(v, float) and v.is_integer():
            continue
        if isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()):
            continue
        hint = f"{key}={int(v)}" if isinstance(v, float) else f"{key}=10" if key in ("ipc", "quant.k") else f"{key}=0"
        raise ConfigError(f"{key}={v!r} is not a whole number; set {key}=<integer>, e.g. {hint}")


def _keys_with_value(cfg: DictConfig, value: str) -> list[str]:
    """Dotted keys of ``cfg`` whose value is the string ``value`` (to name the key of a failed conversion)."""
    from omegaconf import OmegaConf

    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        elif isinstance(node, str) and node == value:
            found.append(prefix[:-1])

    try:
        walk(OmegaConf.to_container(cfg, resolve=True), "")
    except Exception:  # noqa: BLE001 - best effort: fall back to the raw message
        walk(OmegaConf.to_container(cfg, resolve=False), "")
    return [k for k in found if not k.startswith("hydra.")]


_BAD_NUMBER = re.compile(r"(?:invalid literal for int\(\) with base \d+|could not convert string to float): '(.*)'")


def translate_error(e: BaseException, cfg: DictConfig | None = None) -> BaseException:
    """The user-facing error for ``e``: a failed number conversion names its config key; an OS write failure
    (disk full, read-only or forbidden folder) names the folder and the fix; anything else is returned as is."""
    from lpld.core.io import write_error

    if isinstance(e, ValueError) and not isinstance(e, ConfigError) and cfg is not None:
        m = _BAD_NUMBER.search(str(e))
        if m:
            keys = _keys_with_value(cfg, m.group(1))
            if keys:
                return ConfigError(
                    f"{', '.join(keys)}={m.group(1)!r} is not a number; set {keys[0]}=<number> on the command line"
                )
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM):
        out = write_error(e, e.filename or "the artifacts folder", "this stage")
        if out is not None:
            return out
    return e


def debug_requested() -> bool:
    return any(os.environ.get(k, "0") not in ("", "0") for k in DEBUG_ENV)


@contextmanager
def user_errors(cfg: DictConfig | None = None) -> Iterator[None]:
    """Turn user errors into one printed message and exit status 1 (``LPLD_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``
    re-raise them with their traceback); every other exception propagates unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - sorted below
        err = translate_error(e, cfg)
        if not isinstance(err, user_error_types()):
            raise
        if debug_requested():
            if err is e:
                raise
            raise err from e
        print(f"lpld error: {err}\n(set LPLD_DEBUG=1 to see the traceback)", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def log_once() -> None:
    """Print every log line once: Lightning's own loggers go through the root logger (Hydra's handlers) only.

    Lightning adds a console handler to the ``lightning`` logger when it is imported; imported after Hydra set
    up the root logger (as every stage does), each Lightning message is then printed twice, bare and through
    Hydra. With a root handler in place, the package handlers are removed and the messages propagate to it; a
    run without one (``hydra/job_logging=disabled``, the compose API) keeps Lightning's handlers.
    """
    if not logging.getLogger().hasHandlers():
        return
    import lightning  # noqa: F401 - its import adds the handlers removed here (later imports do not add more)
    import lightning.fabric  # noqa: F401
    import lightning.pytorch  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from the config's top-level ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def run_stage(cfg: DictConfig) -> Any:
    """Import and run the stage named by ``cfg.stage.name``; return what the stage returns
    (e.g. relabel's ``{"path": ...}``, which the pipeline hands to the student)."""
    name = str(cfg.stage.name)
    if name not in STAGES:
        valid = "\n".join(f"  {k:9s} {v}" for k, v in STAGES.items())
        raise ConfigError(f"unknown stage '{name}'. Valid stages (stage=<name>):\n{valid}")
    check_config_types(cfg)
    check_known_keys(cfg)
    seed_everything(int(cfg.seed))
    module = importlib.import_module(f"lpld.stages.{name}")
    return module.run(cfg)


def dispatch(cfg: DictConfig) -> float | None:
    """``run_stage`` for ``@hydra.main``: only a float result is returned (what Hydra sweepers optimise).

    Exceptions propagate (``run.py`` wraps this in :func:`user_errors` for the command line).
    """
    out = run_stage(cfg)
    return out if isinstance(out, float) else None
