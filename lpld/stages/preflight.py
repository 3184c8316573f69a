"""Checks every stage passes before it creates, moves or trains anything (called by ``lpld.stages.run_stage``).

* the knobs' ranges (``lpld.config.values``: seed, prune.ratio, stage.verify, num_workers, stage.chunk, a GPU
  trainer without a GPU);
* memory: the distilled images relabel and student hold (uint8, ``ipc`` x classes) must fit the memory of the
  device that holds them. ``stage=plan`` predicts the same figure (its "distilled images (uint8)" line); a config
  that cannot fit is refused with that prediction instead of dying in the allocator (``ipc=1000000``).
  The recover stage checks its device batches the same way (``lpld.stages.recover``).

Only certain lower bounds are compared with the memory available, so a config that fits is never refused; one
that fails in the allocator anyway is reported as one line by ``lpld.stages.translate_error``.
"""

from __future__ import annotations

from typing import Any

from lpld.config.precedence import node_get
from lpld.config.values import check_values
from lpld.errors import ConfigError

GIB = 1024**3
# stages that hold every distilled image in memory (as uint8) for the whole run
IMAGE_HOLDING_STAGES = ("relabel", "student")


def host_memory_available() -> int | None:
    """Bytes of host memory available to a new allocation (``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def device_memory(exp: Any) -> tuple[str, int | None]:
    """("GPU", total bytes of one visible GPU) for a GPU trainer with CUDA, else ("host", available bytes)."""
    acc = str(node_get(node_get(exp, "trainer"), "accelerator") or "cpu").lower()
    if acc in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            return "GPU", int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return "host", host_memory_available()


def check_fits(exp: Any, need: int, what: str, fix: str, source: str = "stage=plan predicts the same") -> None:
    """Refuse ``need`` bytes (a lower bound of what the stage allocates at once) that exceed the device's memory.

    Args:
        exp: the composed config (its trainer decides host or GPU).
        need: bytes the stage must hold at once.
        what: what those bytes are, for the message.
        fix: the knobs that lower them.
        source: where the prediction comes from, for the message.

    Raises:
        ConfigError: with the prediction, the memory available and the fix.
    """
    where, have = device_memory(exp)
    if have is None or need <= have:
        return
    stage = node_get(node_get(exp, "stage"), "name")
    raise ConfigError(
        f"ipc={node_get(exp, 'ipc')} does not fit in memory: stage={stage} must hold {what}, "
        f"{need / GIB:,.1f} GiB at once ({source}), but this machine has {have / GIB:,.1f} GiB "
        f"of {where} memory available; {fix}"
    )


def distilled_images_bytes(exp: Any) -> int | None:
    """uint8 bytes of every distilled image (ipc x classes x channels x size^2), None when the config lacks one."""
    ds = node_get(exp, "dataset")
    try:
        ipc, classes = int(node_get(exp, "ipc")), int(node_get(ds, "num_classes"))
        channels, size = int(node_get(ds, "channels")), int(node_get(ds, "image_size"))
    except (TypeError, ValueError):
        return None
    return ipc * classes * channels * size * size


def check_images_fit(exp: Any) -> None:
    """relabel / student hold every distilled image (uint8) in memory: refuse an ``ipc`` they cannot hold."""
    stage = str(node_get(node_get(exp, "stage"), "name"))
    if stage not in IMAGE_HOLDING_STAGES:
        return
    need = distilled_images_bytes(exp)
    if need is None:
        return
    check_fits(
        exp,
        need,
        f"every distilled image as uint8 (ipc x {node_get(node_get(exp, 'dataset'), 'num_classes')} classes)",
        "lower ipc, or run on a machine with more memory",
    )


def preflight(exp: Any) -> None:
    """The value and memory checks of this module, in order; raises ConfigError naming the key and the fix."""
    check_values(exp)
    if not exp.get("show", False):  # `show=true` runs nothing here: this machine's memory does not matter
        check_images_fit(exp)


__all__ = ["ConfigError", "check_fits", "check_images_fit", "device_memory", "preflight"]
