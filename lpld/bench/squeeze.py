"""Squeeze (teacher training) benchmark: ``squeeze_over_fwdbwd`` (ratio measured in the same run).

One teacher epoch as ``stage=squeeze`` runs it (the stage's own loaders: ``EpochSeededDataset`` over the demo
train split with the training transform, decoded and augmented in this process; ``ClassifierModule`` under a
Lightning Trainer: cross-entropy, logging, SGD + cosine schedule) divided by a plain forward + backward + SGD
step of the same model on the same number of already-augmented batches held in memory, measured right after
each squeeze epoch. ConvNet-3 (width 128) on the bundled Fashion-MNIST demo at 28 px, batch 128 (the default
job's teacher). Reported: the median over the epochs after the first of (squeeze epoch / the plain epoch next to
it). Times are CPU seconds of this process (``time.process_time``), which other jobs inflate far less than wall
time; the target (<= 1.3, as the student's) is the overhead the stage may add to the arithmetic.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from lpld.bench.student import EpochTimer, _clock


def _plain_epoch(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    t0 = _clock()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _clock() - t0


def run(quick: bool = False) -> dict[str, float]:
    import lightning as L

    from lpld.config import squeeze_settings
    from lpld.config.experiment import compose_experiment
    from lpld.lit.classifier import ClassifierModule
    from lpld.models import build_model
    from lpld.stages.common import dataset_spec, to_container
    from lpld.stages.squeeze import _dataloaders

    epochs = 3 if quick else 4
    tmp = Path(tempfile.mkdtemp(prefix="lpld-bench-squeeze-"))
    cfg = compose_experiment(["stage=squeeze", "logger=none", "trainer.num_workers=0", f"paths.root={tmp}"])
    st = squeeze_settings(cfg)
    train_dl, _ = _dataloaders(cfg, st, int(st["batch_size"]))
    n_batches = 12 if quick else 40
    ds = dataset_spec(cfg)
    model_cfg = to_container(cfg.model)
    module = ClassifierModule(
        model_cfg, ds.num_classes, ds.channels, ds.image_size, {**st, "epochs": epochs}, st["label_smoothing"]
    )
    batches = []
    for i, b in enumerate(train_dl):  # the same augmented batches, held in memory for the plain loop
        if i == n_batches:
            break
        batches.append(b)
    torch.manual_seed(0)
    plain_model = build_model(model_cfg, num_classes=ds.num_classes, in_chans=ds.channels, img_size=ds.image_size)
    timer = EpochTimer(lambda: _plain_epoch(plain_model, batches))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_train_batches=n_batches,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=train_dl)
    ratios = timer.ratios()
    return {
        "squeeze_over_fwdbwd": float(statistics.median(ratios)),
        "squeeze_epoch_s": float(statistics.median(timer.times[1:])),
        "squeeze_plain_epoch_s": float(statistics.median(timer.plain[1:])),
    }
