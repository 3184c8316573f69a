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
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from lpld.config.frozen import Experiment
from lpld.errors import ConfigError, user_error_types  # re-exported: ``from lpld.stages import ConfigError`` works

log = logging.getLogger("lpld")

# name -> one-line description (shown when an unknown stage is requested)
STAGES: dict[str, str] = {
    "squeeze": "train the teacher on the full real train set",
    "stats": "record class-wise BatchNorm statistics of the teacher",
    "recover": "make the distilled images with recover=<method> (registry: lpld.core.recover_methods)",
    "relabel": "generate the (pruned, quantized) soft-label store",
    "student": "train/evaluate a student on distilled images + stored labels",
    "storage": "print the storage accounting of a label store, or predict it for a config",
    "plan": "predicted memory per rank (host, GPU) and label-store size / files for a config and world size",
    "report": "turn results records into paper-shaped tables and a Pareto plot",
    "analyze": "diversity metrics (cosine similarity, MMD), Eq. 8, image grids",
    "pipeline": "squeeze -> stats -> recover -> relabel -> student over a small grid, then report",
    "show": "print the resolved experiment of stage.of and the artifacts it reads / writes (nothing runs)",
    "artifacts": "list the artifacts of a dataset: key values, complete or not (stage.kind=images: one kind)",
}


DEBUG_ENV = ("LPLD_DEBUG", "HYDRA_FULL_ERROR")  # either set to 1: user errors keep their traceback


def config_strings(cfg: Any) -> list[tuple[str, str]]:
    """(dotted key, value) of every string value of ``cfg`` (resolved; the raw values if resolving fails)."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        elif isinstance(node, str):
            found.append((prefix[:-1], node))

    walk(_plain_config(cfg) or {}, "")
    return [(k, v) for k, v in found if not k.startswith("hydra.")]


def _keys_with_value(cfg: DictConfig, value: str) -> list[str]:
    """Dotted keys of ``cfg`` whose value is the string ``value`` (to name the key of a failed conversion)."""
    return [k for k, v in config_strings(cfg) if v == value]


_BAD_NUMBER = re.compile(r"(?:invalid literal for int\(\) with base \d+|could not convert string to float): '(.*)'")


def translate_error(e: BaseException, cfg: DictConfig | None = None) -> BaseException:
    """The user-facing error for ``e``: a failed number conversion names its config key; an OS write failure
    (disk full, read-only or forbidden folder) names the folder and the fix; the errors of
    :mod:`lpld.stages.error_text` (worker-wrapped, report, missing user file, unsafe pickle, out of memory, no GPU)
    become user errors; anything else (a bug) is returned as is and keeps its traceback."""
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
    from lpld.stages.error_text import translate  # workers, reports, missing user files, pickles, OOM, no GPU

    return translate(e, _plain_config(cfg)) or e


def _plain_config(cfg: Any) -> dict[str, Any] | None:
    """The config's values as plain python for an error message (best effort: raw values if resolving fails), so
    the error texts below dispatch never see the Hydra config."""
    if cfg is None or isinstance(cfg, Experiment):
        return None if cfg is None else cfg.to_dict()
    if isinstance(cfg, dict):
        return cfg
    from omegaconf import OmegaConf

    for resolve in (True, False):
        try:
            return OmegaConf.to_container(cfg, resolve=resolve)  # type: ignore[return-value]
        except Exception:  # noqa: BLE001 - an unresolvable interpolation: try the raw values
            continue
    return None


def debug_requested() -> bool:
    return any(os.environ.get(k, "0") not in ("", "0") for k in DEBUG_ENV)


# Exit status of a stage stopped by SIGTERM: 128 + 15, what a shell reports for a process killed by SIGTERM, so
# a scheduler (SLURM at the time limit or on preemption) sees a failure, never success.
SIGTERM_EXIT = 128 + signal.SIGTERM


class StageInterrupted(BaseException):
    """Raised by lpld's SIGTERM handler in the main thread (a BaseException: no ``except Exception`` of a stage
    swallows it); :func:`user_errors` turns it into one line and exit status :data:`SIGTERM_EXIT`."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise StageInterrupted(signum)


def _interrupted(e: BaseException) -> bool:
    """``e`` is a SIGTERM stop: ours, or Lightning's ``SIGTERMException`` (a ``SystemExit`` whose code is None,
    i.e. status 0, if it reached the interpreter)."""
    if isinstance(e, StageInterrupted):
        return True
    try:
        from lightning.pytorch.utilities.exceptions import SIGTERMException
    except ImportError:  # pragma: no cover - lightning is a dependency
        return False
    return isinstance(e, SIGTERMException)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the stage runs, SIGTERM raises :class:`StageInterrupted` in the main thread.

    Inside a Trainer, Lightning's own handler runs first (it chains ours): it forwards the signal to the ranks it
    launched and, under SLURM, keeps the ``SLURMEnvironment`` auto-requeue that Lightning enables by default
    (``SLURMEnvironment(auto_requeue=True)`` is detected from the SLURM variables, and build_trainer leaves the
    plugin alone: the requeue signal saves and requeues the job, the requeued job reruns the same command and
    resumes from last.ckpt). Without ours, SIGTERM in ``trainer.predict`` (recover, relabel) would be ignored and
    in ``fit`` / ``test`` would end the process with status 0.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Failed jobs of this process's multirun: (job number, overrides, message), summarised by MultirunFailed.
_MULTIRUN_FAILURES: list[tuple[int, list[str], str]] = []


def _multirun_job() -> tuple[int, list[str]] | None:
    """(job number, overrides) when this process runs the jobs of a Hydra multirun in-process, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not launched through @hydra.main (compose API, tests)
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return int(hc.job.get("num", 0) or 0), list(hc.overrides.task)


class MultirunFailed(CompactHydraException):
    """A user error in one job of a multirun: Hydra records the job as failed and runs the others, then raises the
    first failure, which Hydra prints without a traceback (a CompactHydraException): the list of all failed jobs."""

    def __str__(self) -> str:
        lines = [f"  job {n} ({' '.join(o) or 'no overrides'}): {m}" for n, o, m in _MULTIRUN_FAILURES]
        if not lines:  # raised in another process (a launcher plugin): its own message
            return f"lpld error: {self.args[0] if self.args else 'a multirun job failed'}"
        return (
            f"lpld error: {len(lines)} multirun job(s) failed (the other jobs ran to the end); fix these and rerun "
            "them (finished jobs are reused):\n" + "\n".join(lines)
        )


@contextmanager
def user_errors(cfg: DictConfig | None = None) -> Iterator[None]:
    """Turn user errors into one printed message and exit status 1 (``LPLD_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``
    re-raise them with their traceback); every other exception propagates unchanged.

    A SIGTERM while the stage runs prints one line naming the stage and exits with :data:`SIGTERM_EXIT` (143).
    In a Hydra multirun run in this process, a user error fails only its job: the other jobs run, and the
    multirun ends with the list of failed jobs and exit status 1.
    """
    stage = str(cfg.stage.get("name", "?")) if cfg is not None and cfg.get("stage") is not None else "?"
    try:
        with _sigterm_raises():
            yield
    except BaseException as e:  # noqa: BLE001 - sorted below
        if _interrupted(e):
            slurm = (
                " (SLURM: resubmit the job; with `#SBATCH --signal=SIGUSR1@90` Lightning's auto-requeue requeues it)"
                if os.environ.get("SLURM_JOB_ID")
                else ""
            )
            print(
                f"lpld error: stage {stage} was interrupted (SIGTERM, exit status {SIGTERM_EXIT}); rerun the same "
                f"command to resume (finished work and the last checkpoint are kept){slurm}",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(SIGTERM_EXIT) from None
        if not isinstance(e, Exception):
            raise
        err = translate_error(e, cfg)
        if not isinstance(err, user_error_types()):
            raise
        if debug_requested():
            if err is e:
                raise
            raise err from e
        print(f"lpld error: {err}\n(set LPLD_DEBUG=1 to see the traceback)", file=sys.stderr, flush=True)
        job = _multirun_job()
        if job is not None:
            _MULTIRUN_FAILURES.append((job[0], job[1], str(err)))
            raise MultirunFailed(str(err)) from None
        raise SystemExit(1) from None


def log_once() -> None:
    """Print every log line once: Lightning's own loggers go through the root logger (Hydra's handlers) only.

    Lightning adds a console handler to the ``lightning`` logger when it is imported; imported after Hydra set
    up the root logger (as every stage does), each Lightning message is then printed twice, bare and through
    Hydra. With a root handler in place, the package handlers are removed and the messages propagate to it; a
    run without one (``hydra/job_logging=disabled``, the compose API) keeps Lightning's handlers.

    Then the console is made quiet (:func:`lpld.lit.display.quiet_console`): Lightning's tips and accelerator
    lines, known library warnings and wandb's chatter are shown only with ``LPLD_DEBUG=1``.
    """
    from lpld.lit.display import quiet_console

    if not logging.getLogger().hasHandlers():
        quiet_console()
        return
    import lightning  # noqa: F401 - its import adds the handlers removed here (later imports do not add more)
    import lightning.fabric  # noqa: F401
    import lightning.pytorch  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    quiet_console()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from the config's top-level ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def check_dataset_normalisation(exp: Experiment) -> None:
    """Refuse a non-finite ``dataset.mean`` / ``dataset.std`` or a std <= 0 (it would train a NaN teacher and write
    NaN statistics), naming the key.

    Raises:
        ConfigError: e.g. ``dataset.mean=[nan]`` or ``dataset.std=[0,0.2,0.2]``.
    """
    import math

    for key in ("mean", "std"):
        v = exp.select(f"dataset.{key}")
        if v is None:
            continue
        values = list(v) if isinstance(v, (list, tuple)) else [v]
        for i, x in enumerate(values):
            try:
                f = float(x)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"dataset.{key}[{i}]={x!r} is not a number; set dataset.{key}=[<one number per channel>]"
                ) from None
            if not math.isfinite(f) or (key == "std" and f <= 0):
                need = "a finite number > 0" if key == "std" else "a finite number"
                raise ConfigError(
                    f"dataset.{key}[{i}]={x!r} must be {need}; set dataset.{key}=[<one value per channel>] (the "
                    "dataset's per-channel pixel statistics in [0, 1]), or drop the override to use the dataset's own"
                )


def run_stage(cfg: DictConfig | Experiment) -> Any:
    """Validate and freeze the composed config (:func:`lpld.config.experiment.experiment_of`; an Experiment the
    pipeline composed is taken as is), then import and run the stage named by ``stage.name`` on that frozen
    experiment; return what the stage returns (e.g. relabel's ``{"path": ...}``, which the pipeline hands to the
    student). Nothing below this function sees the Hydra config."""
    from lpld.config.experiment import experiment_of

    name = str(cfg.stage.name)
    if name not in STAGES:
        valid = "\n".join(f"  {k:9s} {v}" for k, v in STAGES.items())
        raise ConfigError(f"unknown stage '{name}'. Valid stages (stage=<name>):\n{valid}")
    exp = cfg if isinstance(cfg, Experiment) else experiment_of(cfg)  # unknown keys, untyped values: one line
    check_dataset_normalisation(exp)
    importlib.import_module("lpld.stages.preflight").preflight(exp)  # value ranges and memory, before any work
    seed_everything(exp.seed)
    if exp.show and name != "show":  # `<any command> show=true`: describe it, run nothing
        from lpld.stages.show import show, target_overrides

        return show(exp, target_overrides(exp, None))
    module = importlib.import_module(f"lpld.stages.{name}")
    out = module.run(exp)
    _index_written(exp)
    return out


def _index_written(exp: Experiment) -> None:
    """Rank 0, after a stage finished: record the values behind the keys it wrote (lpld.artifacts.catalog), so a
    later run that misses an artifact is told the closest existing one and what differs."""
    writes_nothing = ("show", "artifacts", "pipeline", "plan", "report")  # the pipeline's steps index themselves
    if int(os.environ.get("RANK", "0")) != 0 or str(exp.stage.name) in writes_nothing:
        return
    from lpld.artifacts.catalog import record_written

    record_written(exp)


def dispatch(cfg: DictConfig) -> float | None:
    """``run_stage`` for ``@hydra.main``: only a float result is returned (what Hydra sweepers optimise).

    Exceptions propagate (``run.py`` wraps this in :func:`user_errors` for the command line).
    """
    out = run_stage(cfg)
    return out if isinstance(out, float) else None
