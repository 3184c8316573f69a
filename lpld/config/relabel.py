"""Resolved knobs of the label store (the ``relabel`` group): one resolver for every stage that writes or finds
the store (relabel, storage, student, pipeline, plan), so producer and consumer agree by construction."""

from __future__ import annotations

from typing import Any

from lpld.config.precedence import Knobs, dataset_recipe, node_get
from lpld.config.schema import RelabelConf
from lpld.core.augment import CUTOUT_FILLS, MIX_MODES
from lpld.core.pruning import DROP_LAST_MODES
from lpld.errors import ConfigError

RECORD_MODES = ("explicit", "seed")
ENSEMBLES = ("mean_logits", "mean_probs")


def relabel_settings(cfg: Any) -> dict[str, Any]:
    """The relabel knobs: ``relabel.<key>`` > dataset ``recipe.student`` (+ ipc_table) > schema default.

    The store replays the student's schedule, so epochs, batch size and the augmentation fall back to the
    student recipe. ``epochs`` / ``batch_size`` may stay None here (a dataset without a student recipe);
    building the store's spec refuses that, naming the fix.

    Raises:
        ConfigError: an unknown record mode, mix, ensemble or drop_last value.
    """
    from lpld.data.config import to_plain

    k = Knobs(node_get(cfg, "relabel"), dataset_recipe(cfg, "student"), RelabelConf)
    teachers = to_plain(k.get("teachers"))
    out = {
        "epochs": _opt_int(k.get("epochs")),
        "batch_size": _opt_int(k.get("batch_size")),
        "record_mode": str(k.get("record_mode")),
        "mix": str(k.get("mix")),
        "rrc_scale": [float(v) for v in k.plain("rrc_scale")],
        "rrc_ratio": [float(v) for v in k.plain("rrc_ratio")],
        "flip": bool(k.get("flip")),  # the recipe's (in21k: false), else true
        "cutmix_alpha": float(k.get("cutmix_alpha")),
        "cutout_factor": float(k.get("cutout_factor")),
        # issue 12: RDED's ShufflePatches (experiment=table8_rded: 2) and the official 21K random Cutout colour
        "cutout_fill": str(k.get("cutout_fill")),
        "shuffle_patches": int(k.get("shuffle_patches")),
        "drop_last": _drop_last(k.get("drop_last")),
        "teachers": list(teachers) if teachers else None,
        "ensemble": str(k.get("ensemble")),
        "ensemble_rescale": bool(k.get("ensemble_rescale")),
        "precision": str(k.get("precision")),
    }
    checks = (("record_mode", RECORD_MODES), ("mix", MIX_MODES), ("ensemble", ENSEMBLES), ("cutout_fill", CUTOUT_FILLS))
    for key, valid in checks:
        if out[key] not in valid:
            raise ConfigError(f"relabel {key} must be {'|'.join(valid)}, got {out[key]!r} (relabel.{key}=...)")
    return out


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _drop_last(v: Any) -> str:
    """auto | true | false (YAML reads true/false as booleans)."""
    s = str(v).lower()
    if s not in DROP_LAST_MODES:
        raise ConfigError(f"relabel.drop_last must be auto|true|false, got {v!r}")
    return s


def quant_settings(cfg: Any) -> dict[str, Any]:
    """The label quantization: mode, k and the temperature ``ms`` stores probabilities at.

    ``quant.temperature: null`` (ms) = the student's KD temperature (``student.temperature`` > recipe > schema);
    none / mr / hard keep 1.0, unused, so that it does not split store identities.
    """
    from lpld.config.schema import StudentConf
    from lpld.core.quant import list_label_codecs

    q = node_get(cfg, "quant")
    mode = str(node_get(q, "mode") or node_get(q, "name") or "none")
    if mode not in list_label_codecs():
        raise ConfigError(f"unknown quant mode {mode!r}; choose quant=<{'|'.join(list_label_codecs())}>")
    k = int(node_get(q, "k") or 0)
    temp = 1.0
    if mode == "ms":
        t = node_get(q, "temperature")
        if t is None:
            t = Knobs(node_get(cfg, "student"), dataset_recipe(cfg, "student"), StudentConf).get("temperature")
        temp = float(t)
    return {"mode": mode, "k": k if mode in ("mr", "ms") else 0, "temperature": temp}
