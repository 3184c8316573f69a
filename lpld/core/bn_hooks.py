"""Forward hooks that capture the input of every BatchNorm layer of any architecture.

Used by the class-wise statistics pass (stats) and by the BN-matching loss (recover), so no
model definition is ever copied: any torchvision/timm/own model with BatchNorm layers works.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """All BatchNorm modules of ``model`` in registration (= forward, for sequential nets) order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BN_TYPES)]


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32: fp16/bf16 activations (autocast) are upcast, fp32/fp64 pass unchanged.

    The stats pass records fp32/fp64 statistics and recover matches them in fp32, so whatever the
    trainer's precision, what leaves a hook is never half precision. The cast is differentiable, so
    recover's gradient still flows to the images.
    """
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast for ``device_type`` if it is on (a no-op context elsewhere, e.g. on ``meta``)."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type without autocast support
        on = False
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


class BNInputHooks:
    """Context manager: ``hooks.inputs[i]`` is the input to BN layer i from the last forward.

    Args:
        model: any module containing BatchNorm layers.
        on_input: optional callback ``(layer_index, x)`` called inside the hook instead of
            storing, for consumers that reduce immediately (the stats pass) to save memory.

    The stored tensors keep their autograd graph (recover differentiates through them). Inputs reach
    ``inputs`` / ``on_input`` in float32 or wider (:func:`as_float32`), and ``on_input`` runs with
    autocast disabled, so statistics are fp32/fp64 whatever the trainer's precision.
    """

    def __init__(self, model: nn.Module, on_input: Callable[[int, torch.Tensor], None] | None = None):
        self.layers = bn_layers(model)
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no BatchNorm layers; BN statistics need a BN model "
                "(e.g. model=convnet with model.norm=batch, or a ResNet)"
            )
        self.names = [n for n, _ in self.layers]
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self._on_input = on_input
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _make_hook(self, i: int):
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = as_float32(args[0])
            if self._on_input is not None:
                with _autocast_off(x.device.type):  # the consumer's reductions run in fp32/fp64, never bf16
                    self._on_input(i, x)
            else:
                self.inputs[i] = x

        return hook

    def __enter__(self) -> BNInputHooks:
        self._handles = [m.register_forward_hook(self._make_hook(i)) for i, (_, m) in enumerate(self.layers)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.inputs = [None] * len(self.layers)
