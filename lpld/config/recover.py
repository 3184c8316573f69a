"""Resolved knobs of stage=recover (the distilled images' synthesis), validated once.

Generic over the recover-method registry (``lpld.core.recover_methods``): every field of the method's knob
dataclass is resolved by the one precedence rule (``lpld.config.precedence``; the dataset recipe applies to
recipe knobs only), and the method turns them into its validated settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lpld.config.frozen import memoized
from lpld.config.precedence import Knobs, node_get, section_recipe
from lpld.core.recover_methods import get_recover_method, list_recover_methods
from lpld.errors import ConfigError


def methods() -> dict[str, dict[str, Any]]:
    """method name -> {kind, batching, classwise} (a view of lpld.core.recover_methods' registry)."""
    return {m: get_recover_method(m).as_dict() for m in list_recover_methods()}


@memoized("recover")
def recover_settings(cfg: Any) -> dict[str, Any]:
    """Resolved recover knobs (recover.<key> > the dataset's ``recipe.recover_by_method.<method>`` > ipc_table >
    dataset recipe > schema default), validated.

    Only the knobs that change the images are returned (the identity of the images, chosen by the method);
    an optimisation-free method (rded, random_real) carries none of the optimisation knobs.

    Raises:
        ConfigError: unknown method, bad numbers, a knob the method refuses.
    """
    rc = cfg.recover
    meth = get_recover_method(str(rc.name))  # unknown: ConfigError naming recover=<every method>
    ipc = int(cfg.ipc)
    if ipc < 1:
        raise ConfigError(f"ipc must be >= 1 (images per class), got {ipc}")
    schema = meth.knobs
    has_recipe = any("recipe" in f.metadata for f in dataclasses.fields(schema))
    knobs = resolve_knobs(rc, method_recipe(cfg, str(rc.name)) if has_recipe else None, schema)
    n = node_get(cfg.dataset, "num_classes")  # None while unset (imagefolder: read from the tree later)
    return {**meth.settings(knobs, None if n is None else int(n)), **image_storage_settings(knobs)}


def image_storage_settings(knobs: dict[str, Any]) -> dict[str, Any]:
    """How the images are stored (issue 20): ``image_format`` (jpeg | png), ``quantize`` (truncate | round) and,
    for JPEG, ``jpeg_quality``. Part of the images' identity (a PNG folder never answers for a JPEG one).

    ``png`` + ``round`` (lpld before, the switch) returns nothing: folders written before issue 20 hold exactly that,
    their manifests have none of these keys (``lpld.core.images.image_settings`` reads absence as png + round), and
    the switch finds them under their old keys.

    Raises:
        ConfigError: an unknown format or quantization, or a quality outside 1..95 (PIL's useful range).
    """
    from lpld.core.images import IMAGE_FORMATS, QUANTIZE_MODES

    fmt, q = str(knobs.get("image_format", "jpeg")), str(knobs.get("quantize", "truncate"))
    if fmt not in IMAGE_FORMATS:
        raise ConfigError(f"recover.image_format must be {'|'.join(IMAGE_FORMATS)}, got {fmt!r}")
    if q not in QUANTIZE_MODES:
        raise ConfigError(f"recover.quantize must be {'|'.join(QUANTIZE_MODES)}, got {q!r}")
    if (fmt, q) == ("png", "round"):
        return {}
    out: dict[str, Any] = {"image_format": fmt, "quantize": q}
    if fmt == "jpeg":
        quality = int(knobs.get("jpeg_quality", 75))
        if not 1 <= quality <= 95:
            raise ConfigError(f"recover.jpeg_quality must be in 1..95 (PIL's default is 75), got {quality}")
        out["jpeg_quality"] = quality
    return out


def method_recipe(cfg: Any, method: str) -> dict[str, Any]:
    """The dataset's recover recipe for ``method``: ``recipe.recover`` with its ``ipc_table`` entry, and
    ``recipe.recover_by_method.<method>`` over both (a baseline's own official recipe on this dataset, e.g. SRe2L's
    Tiny ``--r-bn 1``; issue 20). The command line (``recover.<key>``) still wins."""
    from lpld.data.config import to_plain

    base = dict(section_recipe(cfg.dataset, cfg.get("ipc"), "recover"))
    table = to_plain(node_get(node_get(node_get(cfg, "dataset"), "recipe"), "recover_by_method")) or {}
    base.update({k: v for k, v in (table.get(method) or {}).items() if v is not None})
    return base


def resolve_knobs(node: Any, recipe: dict[str, Any] | None, schema: type) -> dict[str, Any]:
    """Every field of the dataclass ``schema`` from ``node`` by the precedence rule, as plain Python.

    A recipe knob (``recipe_knob``) that ``node`` leaves unset takes ``recipe``'s value, else its fallback; any
    other knob takes the schema default. A nested dataclass field is resolved field by field (no recipe).
    """
    from lpld.data.config import to_plain

    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(nested):
            out[f.name] = resolve_knobs(node_get(node, f.name), None, type(nested))
        else:
            out[f.name] = to_plain(Knobs(node, recipe if "recipe" in f.metadata else None, schema).get(f.name))
    return out
