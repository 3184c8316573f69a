"""Resolved knobs of the label store (the ``relabel`` group): one resolver for every stage that writes or finds
the store (relabel, storage, student, pipeline, plan), so producer and consumer agree by construction."""

from __future__ import annotations

from typing import Any

from lpld.config.frozen import memoized
from lpld.config.precedence import Knobs, node_get, section_recipe
from lpld.config.schema import RelabelConf
from lpld.core.augment import CUTOUT_FILLS, MIX_MODES
from lpld.core.pruning import DROP_LAST_MODES
from lpld.errors import ConfigError

RECORD_MODES = ("explicit", "seed")
ENSEMBLES = ("mean_logits", "mean_probs")


@memoized("relabel")
def relabel_settings(cfg: Any) -> dict[str, Any]:
    """The relabel knobs: ``relabel.<key>`` > dataset ``recipe.student`` (+ ipc_table) > schema default.

    The store replays the student's schedule, so epochs, batch size and the augmentation fall back to the
    student recipe. ``epochs`` / ``batch_size`` may stay None here (a dataset without a student recipe);
    building the store's spec refuses that, naming the fix.

    Raises:
        ConfigError: an unknown record mode, mix, ensemble or drop_last value.
    """
    from lpld.data.config import to_plain

    k = Knobs(cfg.get("relabel"), section_recipe(cfg.dataset, cfg.get("ipc"), "student"), RelabelConf)
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
    """swap | auto | true | false (YAML reads true/false as booleans)."""
    s = str(v).lower()
    if s not in DROP_LAST_MODES:
        raise ConfigError(f"relabel.drop_last must be {'|'.join(DROP_LAST_MODES)}, got {v!r}")
    return s


@memoized("quant")
def quant_settings(cfg: Any) -> dict[str, Any]:
    """The label quantization: the codec (``quant.mode``) and the knobs it declares (``LabelCodec.params``).

    ``k`` / ``temperature`` are read from ``quant.<key>``, any other knob from ``quant.params.<key>``; a knob the
    codec does not declare keeps its default (k 0, temperature 1.0), unused, so that it does not split store
    identities. ``temperature: null`` = the student's KD temperature (``student.temperature`` > recipe > schema);
    another unset knob takes the codec's default, or is refused naming the key.

    Returns:
        ``{mode, k, temperature}`` plus ``params`` (the codec's own knobs) when it has any: ``QuantConfig(**out)``.

    Raises:
        ConfigError: an unknown mode, an unknown ``quant.params`` key, or a knob that is unset or of the wrong type.
    """
    from lpld.config.schema import StudentConf
    from lpld.core.quant import COMMON_PARAMS, get_label_codec, list_label_codecs
    from lpld.data.config import to_plain

    q = cfg.get("quant")
    mode = str(node_get(q, "mode") or node_get(q, "name") or "none")
    if mode not in list_label_codecs():
        raise ConfigError(f"unknown quant mode {mode!r}; choose quant=<{'|'.join(list_label_codecs())}>")
    codec = get_label_codec(mode)
    given = to_plain(node_get(q, "params")) or {}
    unknown = sorted(set(given) - set(codec.params))
    if unknown:
        own = [n for n in codec.params if n not in COMMON_PARAMS]
        raise ConfigError(
            f"quant={mode} has no parameter {', '.join(f'quant.params.{n}' for n in unknown)}; "
            f"its parameters are {own or 'none'}"
        )
    out: dict[str, Any] = {"mode": mode, "k": 0, "temperature": 1.0}
    params: dict[str, Any] = {}
    for name, decl in codec.params.items():
        common = name in COMMON_PARAMS
        key = f"quant.{name}" if common else f"quant.params.{name}"
        v = node_get(q, name) if common else given.get(name)
        if v is None and name == "temperature":
            v = Knobs(cfg.get("student"), section_recipe(cfg.dataset, cfg.get("ipc"), "student"), StudentConf).get(
                "temperature"
            )
        if v is None:
            v = decl.default
        if v is None:
            raise ConfigError(f"quant={mode} needs {key} ({decl.help}); set {key}=<value>")
        try:
            v = decl.type(v) if decl.type is not bool or isinstance(v, bool) else str(v).lower() == "true"
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {decl.type.__name__} ({decl.help}), got {v!r}") from None
        (out if common else params)[name] = v
    if params:
        out["params"] = params
    return out
