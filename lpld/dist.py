"""Rank-0 decisions for stages run by N processes: who decides, who writes, when others may read.

Three ways run N processes (README "Multi-GPU and clusters"):

* **spawn** (``trainer=ddp_spawn`` / ``ddp_cpu``): the stage body runs once, in the launching
  process; only the Trainer's loop runs in the spawned ranks. Nothing here is collective.
* **per-rank launch** (``torchrun ... trainer=ddp``, ``srun`` / ``hydra/launcher=slurm`` with
  ``trainer=ddp``): every rank runs the whole stage body. Before the Trainer exists there is no
  process group, so ``ensure_group`` creates the default one from the launcher's environment
  (gloo for CPU tensors, plus NCCL for CUDA tensors when the accelerator is a GPU); Lightning then
  finds it initialised and uses it as is.
* **Lightning's own re-launch** (``python run.py ... trainer=ddp`` without torchrun): rank 0 runs
  the stage body and re-runs the command for ranks 1.. from inside its first Trainer. Those
  children start after rank 0 has decided and created everything, so they *follow*: they make no
  collective call before their Trainer (rank 0 is already inside it) and take ``follow`` as the
  decision. After a Trainer has run, every process holds the group and decisions are collective.

Every decision goes through :func:`decide`: rank 0 computes it (checks, creates directories),
the result (or rank 0's exception) is broadcast, so all ranks take the same branch and a rank-0
error stops every rank with the same message instead of a hang. :func:`barrier` follows every
rank-0 write that another rank reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

log = logging.getLogger("lpld")
T = TypeVar("T")

# exception type returned by `decide` on ranks > 0 when rank 0 raised something unpicklable
_UNPICKLABLE = RuntimeError


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def _int_env(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                continue
    return None


def env_rank() -> int:
    """Global rank from the launcher's environment: ``RANK`` (torchrun), ``SLURM_PROCID`` (srun),
    ``LOCAL_RANK`` (Lightning's re-launch on one node); 0 when none is set."""
    r = _int_env("RANK", "SLURM_PROCID")
    if r is None:
        local = _int_env("LOCAL_RANK")
        node = _int_env("NODE_RANK", "GROUP_RANK") or 0
        world = _int_env("WORLD_SIZE") or 1
        nodes = max(1, _int_env("SLURM_NNODES", "NUM_NODES") or 1)
        r = None if local is None else node * max(1, world // nodes) + local
    return int(r or 0)


def env_world() -> int:
    """World size from the environment (``WORLD_SIZE``, else ``SLURM_NTASKS``), 1 when unset."""
    return int(_int_env("WORLD_SIZE", "SLURM_NTASKS") or 1)


def rank() -> int:
    """This process's global rank (the process group's when initialised, else the environment's)."""
    return int(tdist.get_rank()) if is_initialized() else env_rank()


def world_size() -> int:
    return int(tdist.get_world_size()) if is_initialized() else 1


def launch_mode() -> str:
    """``group`` (a process group exists), ``torchrun``, ``slurm`` (per-rank launches without a group yet),
    ``child`` (a rank > 0 re-launched by Lightning, before its Trainer) or ``single``."""
    if is_initialized():
        return "group"
    if os.environ.get("TORCHELASTIC_RUN_ID") and env_world() > 1:
        return "torchrun"
    ntasks = _int_env("SLURM_NTASKS") or 1
    if ntasks > 1 and os.environ.get("SLURM_PROCID") is not None and os.environ.get("SLURM_JOB_NAME") != "bash":
        return "slurm"
    if (_int_env("LOCAL_RANK") or 0) > 0 or (_int_env("NODE_RANK") or 0) > 0:
        return "child"
    return "single"


def ensure_group(accelerator: str = "cpu") -> str:
    """Create the default process group for a per-rank launch that has none yet; returns the launch mode.

    Backend: ``gloo`` on CPU; ``cpu:gloo,cuda:nccl`` for a GPU accelerator, so decisions (small CPU
    objects) go over gloo and Lightning's gradient all-reduce over NCCL in the same group.
    """
    mode = launch_mode()
    if mode not in ("torchrun", "slurm"):
        return mode
    if mode == "slurm":
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = SLURMEnvironment()
        os.environ.setdefault("MASTER_ADDR", env.main_address)
        os.environ.setdefault("MASTER_PORT", str(env.main_port))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size()))
        os.environ.setdefault("RANK", str(env.global_rank()))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank()))
    gpu = str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if gpu else "gloo"
    if gpu:
        torch.cuda.set_device(_int_env("LOCAL_RANK") or 0)
    tdist.init_process_group(backend, rank=env_rank(), world_size=env_world(), timeout=group_timeout())
    log.info("process group (%s) initialised: rank %d of %d", backend, env_rank(), env_world())
    return "group"


def group_timeout() -> timedelta:
    """Timeout of every collective: ``LPLD_DIST_TIMEOUT_MIN`` minutes, 120 by default (rank 0 may hash a whole label
    store in finalize while the other ranks wait at a barrier; torch's and Lightning's default is 30 minutes)."""
    return timedelta(minutes=float(os.environ.get("LPLD_DIST_TIMEOUT_MIN", "120") or 120))


def trainer_strategy(name: str) -> Any:
    """The Trainer's ``strategy`` argument for a preset's strategy name.

    A DDP strategy (``ddp``, ``ddp_spawn``, ``ddp_find_unused_parameters_true`` ...) is built as Lightning builds it
    from the name, plus :func:`group_timeout`: under ddp_spawn and Lightning's own re-launch Lightning creates the
    process group itself, with its 30-minute default. Any other name (``auto``, fsdp ...) is passed through.
    """
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    if name not in StrategyRegistry or not issubclass(StrategyRegistry[name]["strategy"], DDPStrategy):
        return name
    entry = StrategyRegistry[name]
    return entry["strategy"](**entry["init_params"], timeout=group_timeout())


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_initialized():
        tdist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled; identity without a process group)."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def decide(fn: Callable[[], T], follow: Any = None, accelerator: str = "cpu") -> T:
    """Run ``fn`` on rank 0 only, give its result to every rank; re-raise rank 0's exception everywhere.

    Args:
        fn: the decision (may create directories / write files: it runs on rank 0 only).
        follow: what a re-launched child (``launch_mode() == "child"``) takes without asking (rank 0
            decided and wrote before launching it); e.g. ``"resume"``.
        accelerator: the trainer preset's accelerator (backend choice in ``ensure_group``).
    """
    mode = ensure_group(accelerator)
    if mode == "child":
        return follow
    if not is_initialized():
        return fn()
    out: Any
    if tdist.get_rank() == 0:
        try:
            out = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - forwarded to every rank, then re-raised
            out = ("err", e)
    else:
        out = None
    try:
        out = broadcast(out)
    except Exception as e:  # noqa: BLE001 - an exception that does not pickle
        raise _UNPICKLABLE(f"rank 0 failed and its error could not be sent to rank {rank()}: {e}") from e
    # the write (if any) happened on rank 0 before the broadcast: everyone may read it now
    kind, val = out
    if kind == "err":
        raise val
    return val


def accelerator_of(cfg: Any) -> str:
    """The trainer preset's accelerator name (``cpu`` when the config has none)."""
    t = cfg.get("trainer") if hasattr(cfg, "get") else None
    return str(t.get("accelerator", "cpu")) if t is not None else "cpu"


def planned_world_size(cfg: Any) -> int:
    """Processes the trainer preset will run: devices x nodes (``devices=-1``: every visible GPU).

    Known before any process group exists, so stages can size per-rank work (and refuse a world size
    that does not divide the recipe's batch) before launching.
    """
    t = cfg.trainer
    devices = t.get("devices", 1)
    if isinstance(devices, str):
        devices = int(devices) if devices.lstrip("-").isdigit() else -1
    if isinstance(devices, int) and devices > 0:
        n = devices
    elif isinstance(devices, int):
        n = max(1, torch.cuda.device_count()) if str(t.get("accelerator", "cpu")) != "cpu" else 1
    else:
        n = len(devices)
    return n * int(t.get("num_nodes", 1) or 1)


def per_rank_batch(global_batch: int, world: int, key: str, unit: str = "one optimizer step over all ranks") -> int:
    """``global_batch / world``, refusing a world size that does not divide it (the recipe stays global).

    Args:
        global_batch: the recipe's batch (what one optimizer step consumes over all ranks).
        world: number of processes.
        key: the config key of the batch size, named in the error.
        unit: what one global batch is (named in the error).
    """
    if world < 1 or global_batch % world:
        ok = [w for w in range(1, min(global_batch, 64) + 1) if global_batch % w == 0]
        raise ValueError(
            f"{key}={global_batch} is the global batch ({unit}) and must be divisible "
            f"by the world size {world}; use trainer.devices (x trainer.num_nodes) in {ok}, or set {key} to a "
            f"multiple of {world}"
        )
    return global_batch // world


_SPAWN_STRATEGIES = ("spawn", "fork", "notebook")  # strategies whose ranks Lightning starts in-process


def relaunches_per_rank(cfg: Any) -> bool:
    """The trainer preset makes Lightning re-run the command for ranks 1.. (``ddp``, ``auto`` on several devices,
    fsdp / deepspeed): more than one process planned and no spawn / fork strategy."""
    strategy = str(cfg.trainer.get("strategy", "auto") or "auto")
    return planned_world_size(cfg) > 1 and not any(s in strategy for s in _SPAWN_STRATEGIES)


def require_launcher(cfg: Any, what: str) -> None:
    """Refuse to run ``what`` under Lightning's own re-launch (``python run.py ... trainer=ddp``, no torchrun/srun).

    The re-launched children start inside rank 0's *first* Trainer and run the command from its beginning: a
    command that runs several Trainers one after the other (``stage=pipeline``) would make them start its first
    step while rank 0 is in a later one, cross-match collectives and hang until the timeout. Ranks started by a
    launcher (torchrun, srun) or spawned ones (``trainer=ddp_spawn``) run every step together.

    Raises:
        ConfigError: several processes are planned, the strategy re-launches the command, and no launcher started
            this process; the message names the torchrun command to use.
    """
    import shlex
    import sys

    from lpld.errors import ConfigError

    if not relaunches_per_rank(cfg) or launch_mode() in ("torchrun", "slurm", "group"):
        return
    t = cfg.trainer
    nodes = int(t.get("num_nodes", 1) or 1)
    per_node = planned_world_size(cfg) // nodes
    script = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == "run.py" else "run.py"
    args = " ".join(shlex.quote(str(o)) for o in (getattr(cfg, "overrides", None) or []))
    launcher = f"torchrun --nproc_per_node={per_node}"
    if nodes > 1:
        launcher += f" --nnodes={nodes} --node_rank=<this node> --master_addr=<node 0>"
    raise ConfigError(
        f"{what} with trainer.strategy={t.get('strategy')} on {planned_world_size(cfg)} processes needs its ranks "
        f"started by a launcher (Lightning's own re-launch restarts every rank at the first step and hangs): run "
        f"`{launcher} {script} {args}` (or srun with one task per device), or use trainer=ddp_spawn"
    )
