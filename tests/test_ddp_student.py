"""Under DDP the student broadcasts no data buffers per step (2 gloo processes, ddp_spawn)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

pytestmark = pytest.mark.slow


class CountBroadcast(Callback):
    """Counts the bytes DDP broadcasts (buffers from rank 0) during each training step, per rank.

    DDP re-broadcasts every module buffer before each forward (``broadcast_buffers=True``) through
    ``DistributedDataParallel._distributed_broadcast_coalesced``; gradients go through all-reduce
    and are not counted. Runs in each spawned rank; writes ``bcast.<rank>.json``.
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.bytes, self.steps, self.active = 0, 0, False

    def setup(self, trainer, pl_module, stage):
        from torch.nn.parallel import DistributedDataParallel as DDP

        real = DDP._distributed_broadcast_coalesced
        cb = self

        def counting(ddp, tensors, buffer_size, authoritative_rank=0):
            if cb.active:
                cb.bytes += sum(t.numel() * t.element_size() for t in tensors)
            return real(ddp, tensors, buffer_size, authoritative_rank)

        DDP._distributed_broadcast_coalesced = counting

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.active = False
        self.steps += 1

    def on_train_end(self, trainer, pl_module):
        model_buffers = sum(b.numel() * b.element_size() for b in pl_module.model.buffers())
        data = pl_module.images_u8.numel() + pl_module.image_labels.numel() * 8
        rec = {"bytes": self.bytes, "steps": self.steps, "model_buffers": model_buffers, "data": data}
        (Path(self.out_dir) / f"bcast.{trainer.global_rank}.json").write_text(json.dumps(rec))


def test_no_per_step_broadcast_of_images_or_labels(tmp_path):
    from conftest import compose_cfg
    from test_student import base_overrides, prepare_store

    from lpld.stages import student

    prepare_store(tmp_path)
    cfg = compose_cfg(["stage=student", *base_overrides(tmp_path), "trainer=ddp_cpu", "stage.results_name=bcast"])
    student.extra_callbacks[:] = [CountBroadcast(str(tmp_path))]
    try:
        student.run(cfg)
    finally:
        student.extra_callbacks.clear()
    for r in (0, 1):
        rec = json.loads((tmp_path / f"bcast.{r}.json").read_text())
        assert rec["steps"] > 0 and rec["data"] > 0
        # exactly the model's own BatchNorm running statistics each step (DDP's default broadcast_buffers; this
        # also shows the counter sees DDP's broadcasts), never the images or labels (+2400 B per step before)
        assert rec["bytes"] == rec["steps"] * rec["model_buffers"], rec
        assert rec["data"] > rec["model_buffers"], "the test needs an image set larger than the BN buffers"
