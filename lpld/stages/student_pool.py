"""Student stage, label pool: which stored batches the student trains on (all of them for random pruning, the
batches a pruning metric keeps otherwise), what the pool achieves against the full schedule, and its bytes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lpld.core import quant
from lpld.core.label_pool import pool_size, select_pool
from lpld.core.prune_metrics import batch_score, per_sample_scores

log = logging.getLogger("lpld")


def score_store(store: Any, metric: str, image_labels: torch.Tensor) -> np.ndarray:
    """(M,) per-batch scores of a pruning metric: the mean per-sample score of each stored batch."""
    from lpld.lit.student_module import cutmix_share

    man = store.manifest
    mode, c, out = str(man["quant"]["mode"]), int(man["num_classes"]), int(man["aug"]["out_size"])
    gen_t = float(man["quant"].get("temperature", 1.0))
    scores = np.empty(len(store), dtype=np.float64)
    for i in range(len(store)):
        b = store.read(i)
        probs = None if mode == "hard" else quant.decode(b, mode, 1.0, c, gen_temperature=gen_t)
        s = per_sample_scores(
            metric,
            image_labels[b.index],
            probs=probs,
            logits=b.logits.float() if b.logits is not None else None,
            hard=b.hard,
            cut_lambda=cutmix_share(b.aug, out),
        )
        scores[i] = batch_score(s)
    return scores


@dataclass
class Pool:
    rows: np.ndarray  # store rows of the label pool
    label_bytes: int  # accounting total of the pooled batches (labels + augmentation records)
    label_only_bytes: int  # of which soft/hard label arrays
    target_ratio: float
    achieved: dict[str, Any] | None = None  # label_store.achieved_ratio of the pool against the full schedule


def _achieved(store: Any, kept: int, ratio: float, name: str) -> dict[str, Any]:
    """The pruning the pool really achieves (kept stored batches / batches of the full schedule), checked.

    A ratio the schedule cannot reach within ``RATIO_REFUSE`` is refused (ArtifactError naming the fix);
    within it but off by more than ``RATIO_WARN`` the run goes on with a warning, and the record carries
    the achieved ratio and factor next to the requested ones.
    """
    from lpld.core.label_store import achieved_ratio

    man = store.manifest
    units = int(man["epochs"]) * int(man["batches_per_epoch"])
    what = f"the label schedule ({man['epochs']} epochs x {man['batches_per_epoch']} batches)"
    if ratio <= 0 and kept == units:
        return {"ratio": 0.0, "factor": 1.0, "requested_factor": 1.0, "off": False}
    # the student's pool draws stored batches (the improved label pool): batch units, unless the store is per epoch
    out = achieved_ratio(units, kept, ratio, name, what, str(man["prune"].get("granularity", "batch")))
    if out["off"]:
        log.warning(
            "prune=%s asks for %.1fx but the pool keeps %d of %d stored batches: %.2fx; the record says so "
            "(prune.achieved_factor)",
            name,
            out["requested_factor"],
            kept,
            units,
            out["factor"],
        )
    return out


def build_pool(store: Any, image_labels: torch.Tensor, metric: dict[str, Any], prune: Any, seed: int) -> Pool:
    """The label pool (all stored batches for random; metric-selected batches otherwise).

    Args:
        store: the opened label store; image_labels: (N,) class of each distilled image;
        metric: ``metric_settings``; prune: the prune section (name, ratio); seed: the run's seed.
    """
    from lpld.core.label_store import accounting, array_layout

    m = metric
    man = store.manifest
    acc = man["accounting"]
    ratio = float(prune.get("ratio", 0.0)) if prune is not None else 0.0
    if m["name"] == "random":
        return Pool(
            np.arange(len(store), dtype=np.int64),
            int(acc["total"]),
            int(acc["labels_bytes"]),
            float(man["prune"]["ratio"]),
            _achieved(store, len(store), float(man["prune"]["ratio"]), str(man["prune"]["name"])),
        )
    src_ratio = float(man["prune"]["ratio"])
    if src_ratio > 0:
        log.warning(
            "metric=%s selects from a store already pruned at %s (metric.source_prune=%s)",
            m["name"],
            man["prune"]["name"],
            m["source_prune"],
        )
    keep = pool_size(len(store), ratio)
    achieved = _achieved(store, keep, ratio, str(prune.get("name")))
    log.info("scoring %d stored batches by %s to keep %d (%s order)", len(store), m["name"], keep, m["order"])
    scores = score_store(store, m["name"], image_labels)
    rows = select_pool(scores, keep, m["order"], m["drop_easy"], m["drop_hard"], seed=int(seed))
    offs = np.asarray(store.arrays["row_offsets"], dtype=np.int64)
    n_rows = int((offs[rows + 1] - offs[rows]).sum())
    kept = accounting(array_layout(store.spec, len(rows), n_rows))
    return Pool(rows, int(kept["total"]), int(kept["labels_bytes"]), ratio, achieved)


def full_store_bytes(store: Any) -> int:
    """Accounting total of the 1x, unquantized store of the same images / schedule / augmentation."""
    import dataclasses

    from lpld.core.quant import QuantConfig
    from lpld.core.storage_accounting import predict_store

    spec = dataclasses.replace(store.spec, prune_name="1x", prune_ratio=0.0, quant=QuantConfig("none"))
    return int(predict_store(spec)["total"])
