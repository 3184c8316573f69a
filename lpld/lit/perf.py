"""GPU performance options of the trainer presets, and where they are applied.

The ``trainer.perf`` block of a preset (``conf/trainer/*.yaml``) holds:

* ``cudnn_benchmark``: let cuDNN time its convolution algorithms on the first batch of each shape
  (every lpld loop has fixed shapes, so the search is paid once);
* ``tf32``: TF32 tensor-core math for fp32 matmul/convolution on Ampere and newer (10-bit mantissa:
  faster, not IEEE fp32; set ``false`` for fp32-exact comparisons);
* ``channels_last``: NHWC weights (and hence activations) for the convolutional networks, the
  layout tensor cores want in bf16/fp16, and the faster one for oneDNN on a CPU (ConvNet-3, 28 px, batch 128,
  2 cores: a training step 0.35 s -> 0.28 s, a recover step 0.36 s -> 0.29 s, measured with /tmp-style
  interleaved timing; the ``cpu`` preset turns it on);
* ``compile_teacher`` / ``compile_student``: ``torch.compile`` (in place, ``nn.Module.compile``, so
  state-dict keys and checkpoints are unchanged) of the frozen teacher (stats, recover, relabel: the
  module's ``teacher``) or of the trained network (squeeze's teacher, the student: ``model``);
  ``compile_mode`` is passed to ``torch.compile``. Experimental: recover registers its BN hooks anew for
  each device batch, which retraces a compiled teacher, so ``compile_teacher`` does not pay off there.

``trainer.stage_precision`` maps a stage name to its Lightning precision, overriding
``trainer.precision`` for that stage (the GPU presets keep stats at ``32-true``). Stages with their
own precision knob (``recover.precision``, ``relabel.precision``) pass it explicitly.

Backend flags and ``torch.compile`` apply only when the trainer's device is CUDA. ``channels_last`` applies on
any device: it changes the memory layout, hence the summation order inside a convolution, so a CPU run with it on
and one with it off differ by float rounding; each is reproducible (same config, same bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lpld.config.precision import resolve_precision  # noqa: F401 - decided in the config layer


@dataclass(frozen=True)
class PerfOptions:
    """``trainer.perf`` of a preset (defaults: all off, i.e. plain PyTorch behaviour)."""

    cudnn_benchmark: bool = False
    tf32: bool = False
    channels_last: bool = False
    compile_teacher: bool = False
    compile_student: bool = False
    compile_mode: str | None = None

    @classmethod
    def from_cfg(cls, node: Any) -> PerfOptions:
        """From a config mapping (missing keys take the defaults; unknown keys are an error)."""
        if node is None:
            return cls()
        d = dict(node.items()) if hasattr(node, "items") else dict(node)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown trainer.perf key(s) {unknown}; valid: {sorted(names)}")
        return cls(**{k: (v if k == "compile_mode" else bool(v)) for k, v in d.items()})


def apply_backend_flags(opts: PerfOptions, accelerator: str) -> None:
    """Set cuDNN benchmark / TF32 for a GPU run (process-wide flags; nothing happens for a CPU run).

    Set on every trainer build, so consecutive stages in one process (``stage=pipeline``) each get
    their preset's values rather than whatever the previous stage left.
    """
    if str(accelerator) not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        return
    torch.backends.cudnn.benchmark = bool(opts.cudnn_benchmark)
    torch.backends.cuda.matmul.allow_tf32 = bool(opts.tf32)
    torch.backends.cudnn.allow_tf32 = bool(opts.tf32)


def prepare_model(model: nn.Module, channels_last: bool, compile_it: bool, compile_mode: str | None = None) -> None:
    """In place: NHWC parameters (4-D ones) and/or ``nn.Module.compile``; state-dict keys unchanged."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_it:
        model.compile(mode=compile_mode)


class GpuPerf(Callback):
    """Applies ``PerfOptions`` to a LightningModule's networks when the run is on a CUDA device.

    ``teacher`` (a frozen network) follows ``compile_teacher``; ``model`` (a trained one) follows
    ``compile_student``; ``channels_last`` applies to both.
    """

    def __init__(self, opts: PerfOptions):
        self.opts = opts

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        o = self.opts
        cuda = trainer.strategy.root_device.type == "cuda"
        if cuda:  # every rank's own process: a ddp_spawn rank does not inherit the flags build_trainer set
            apply_backend_flags(o, "cuda")
        for attr, comp in (("teacher", o.compile_teacher), ("model", o.compile_student)):
            net = getattr(pl_module, attr, None)
            if isinstance(net, nn.Module) and not getattr(net, "_lpld_perf_done", False):
                prepare_model(net, o.channels_last, comp and cuda, o.compile_mode)
                net._lpld_perf_done = True  # a second fit/validate on the same module does not redo it
