"""Resolved knobs of stage=recover (the distilled images' synthesis), validated once."""

from __future__ import annotations

from typing import Any

from lpld.config.precedence import Knobs, dataset_recipe, node_get
from lpld.config.schema import RecoverCda, RecoverOptimize, RecoverRded
from lpld.errors import ConfigError

# knobs an optimize method takes from recover.<key>, else dataset.recipe.recover.<key>, else the schema
RECIPE_KEYS = ("iterations", "lr", "alpha", "first_bn_multiplier", "tv_l2", "l2", "jitter", "betas")
CDA_SCHEDULES = ("step", "linear", "cosine")
RDED_STYLES = ("official", "lpld")  # official: RDED's square half-size crops | lpld


def methods() -> dict[str, dict[str, Any]]:
    """method name -> {kind, batching, classwise} (a view of lpld.core.recover_methods' registry)."""
    from lpld.core.recover_methods import get_recover_method, list_recover_methods

    return {m: get_recover_method(m).as_dict() for m in list_recover_methods()}


def recover_settings(cfg: Any) -> dict[str, Any]:
    """Resolved recover knobs (recover.<key> > ipc_table > dataset recipe > schema default), validated.

    Only the knobs that change the images are returned (the identity of the images); an optimisation-free
    method (rded, random_real) carries none of the optimisation knobs.

    Raises:
        ConfigError: unknown method, bad numbers, unsupported init, a bad CDA / RDED knob.
    """
    rc = cfg.recover
    name = str(rc.name)
    table = methods()
    if name not in table:
        raise ConfigError(f"unknown recover method '{name}'; choose recover=<{'|'.join(table)}>")
    ipc = int(cfg.ipc)
    if ipc < 1:
        raise ConfigError(f"ipc must be >= 1 (images per class), got {ipc}")
    meth = table[name]
    s: dict[str, Any] = {"name": name}
    if meth["kind"] == "optimize":
        s.update(_optimize(rc, dataset_recipe(cfg, "recover")))
    else:  # the optimisation knobs do not affect these methods, so they stay out of the identity
        s["precision"] = str(Knobs(rc, None, RecoverOptimize).get("precision"))
    if meth["kind"] == "optimize" and meth["batching"] == "slot":
        g = node_get(rc, "group_classes")
        s["group_classes"] = int(g) if g is not None else min(int(cfg.dataset.num_classes), 100)
        if s["group_classes"] < 1:
            raise ConfigError("recover.group_classes must be >= 1")
    if name == "cda":
        s["cda"] = _cda(node_get(rc, "cda"))
    if name == "rded":
        s["rded"] = _rded(node_get(rc, "rded"))
    return s


def _optimize(rc: Any, recipe: dict[str, Any]) -> dict[str, Any]:
    """The BN-matching optimisation knobs (Eq. 6, Appendix C), validated."""
    k = Knobs(rc, recipe, RecoverOptimize)
    s: dict[str, Any] = {key: k.plain(key) for key in RECIPE_KEYS}
    s["betas"] = [float(b) for b in s["betas"]]
    for key in ("iterations", "jitter"):
        s[key] = int(s[key])
    for key in ("lr", "alpha", "first_bn_multiplier", "tv_l2", "l2"):
        s[key] = float(s[key])
    # not recipe knobs: a recipe's rrc/flip/init/precision entry is not read
    node = Knobs(rc, None, RecoverOptimize)
    s["rrc_scale_min"] = float(node.get("rrc_scale_min"))
    s["rrc_scale_max"] = float(node.get("rrc_scale_max"))
    s["flip"] = bool(node.get("flip"))
    s["init"] = str(node.get("init"))
    s["precision"] = str(node.get("precision"))
    if s["iterations"] < 1 or s["lr"] <= 0 or s["jitter"] < 0:
        # 0 iterations would write the Gaussian-noise initialisation as finished distilled images
        bad = {key: s[key] for key in ("iterations", "lr", "jitter")}
        raise ConfigError(
            f"recover.iterations >= 1, recover.lr > 0 and recover.jitter >= 0 are required, got {bad}; set e.g. "
            "recover.iterations=1000 (for real images without synthesis use recover=random_real)"
        )
    if not 0 < s["rrc_scale_min"] <= s["rrc_scale_max"] <= 1:
        raise ConfigError("need 0 < recover.rrc_scale_min <= recover.rrc_scale_max <= 1")
    if s["init"] != "random":
        raise ConfigError(f"recover.init={s['init']} is not supported; the only initialisation is 'random' (Table 11)")
    return s


def _cda(node: Any) -> dict[str, Any]:
    d = RecoverCda().cda
    schedule, milestone = node_get(node, "schedule"), node_get(node, "milestone")
    out = {
        "schedule": str(d.schedule if schedule is None else schedule),
        "milestone": float(d.milestone if milestone is None else milestone),
    }
    if out["schedule"] not in CDA_SCHEDULES or not 0 <= out["milestone"] <= 1:
        raise ConfigError("recover.cda.schedule must be step|linear|cosine and recover.cda.milestone in [0, 1]")
    return out


def _rded(node: Any) -> dict[str, Any]:
    from lpld.data.config import to_plain

    d = RecoverRded().rded

    def get(key: str) -> Any:
        v = node_get(node, key)
        return getattr(d, key) if v is None else to_plain(v)

    cs = list(get("crop_scale"))
    out = {
        "factor": int(get("factor")),
        "candidates_per_class": int(get("candidates_per_class")),
        "crops_per_image": int(get("crops_per_image")),
        "crop_scale": [float(cs[0]), float(cs[1])],
        "style": str(get("style")),
    }
    if out["factor"] < 1 or out["crops_per_image"] < 1:
        raise ConfigError("recover.rded.factor and recover.rded.crops_per_image must be >= 1")
    if out["style"] not in RDED_STYLES:
        raise ConfigError(f"recover.rded.style must be official|lpld, got {out['style']!r}")
    return out
