"""Name -> builder registry and ``build_model``, the one way every stage constructs a network.

A builder is a function ``builder(num_classes, in_chans, img_size, pretrained, **knobs) -> nn.Module``
registered with ``@register_model("name")``. Its keyword-only parameters (with defaults) are the
architecture knobs a ``conf/model/<name>.yaml`` may set; any other key in the model config is
rejected so that a typo never silently builds a different network.

Every built model carries two plain attributes:
    ``lpld_model_name``   the registry name it was built from;
    ``lpld_classifier``   dotted module name of its final ``nn.Linear`` (used by
                          :func:`lpld.models.features.penultimate_features`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lpld.errors import ConfigError
from lpld.models.checkpoint import load_model_checkpoint

log = logging.getLogger("lpld")

# Keys every model config has; everything else is an architecture knob of the named builder.
COMMON_KEYS = ("name", "pretrained", "checkpoint", "tag")

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One registry entry: the builder and the knobs (keyword-only args) it accepts, with defaults."""

    name: str
    builder: Builder
    knobs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


MODEL_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str = "") -> Callable[[Builder], Builder]:
    """Decorator adding ``builder`` to :data:`MODEL_REGISTRY` under ``name``.

    The builder must take ``(num_classes, in_chans, img_size, pretrained)`` positionally and its
    architecture knobs as keyword-only parameters with defaults.
    """

    def deco(builder: Builder) -> Builder:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice ({MODEL_REGISTRY[name].builder} and {builder})")
        params = inspect.signature(builder).parameters.values()
        knobs = {}
        for p in params:
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                if p.default is inspect.Parameter.empty:
                    raise ValueError(f"knob {p.name!r} of model builder {name!r} needs a default")
                knobs[p.name] = p.default
        MODEL_REGISTRY[name] = ModelEntry(name=name, builder=builder, knobs=knobs, description=description)
        return builder

    return deco


def model_names() -> list[str]:
    """Sorted registry names (the valid values of ``model.name``)."""
    return sorted(MODEL_REGISTRY)


def _to_dict(model_cfg: Any) -> dict[str, Any]:
    """Plain dict from any mapping (a dict, a section of the frozen experiment)."""
    if isinstance(model_cfg, Mapping):
        return dict(model_cfg)
    raise TypeError(f"model config must be a mapping, got {type(model_cfg).__name__}")


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive int, got {value!r}")
    return value


def build_model(model_cfg: Any, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """Build the network named by ``model_cfg["name"]``.

    Args:
        model_cfg: a mapping with ``name`` (registry key), ``pretrained`` (bool: load the
            published ImageNet-1k weights; with ``num_classes != 1000`` the classifier is replaced by a
            freshly initialised one), ``checkpoint`` (path to a local ``torch.save`` file, or null;
            when set it is loaded after building and ``pretrained`` downloads nothing), ``tag`` (only
            used by artifact paths) and the builder's architecture knobs.
        num_classes: classifier outputs.
        in_chans: input channels (1 for Fashion-MNIST; the first conv is rebuilt for it).
        img_size: square input side in pixels the model will see, ``x: (B, in_chans, img_size, img_size)``.

    Returns:
        The model (train mode, CPU, float32) with ``lpld_model_name`` and ``lpld_classifier`` set.

    Raises:
        ConfigError: unknown name (the message lists valid names), unknown knob, bad value.
        PretrainedWeightsError: ``pretrained=true`` but the weights are neither cached nor downloadable.
        ModelCheckpointError: checkpoint missing, unreadable, or not matching the architecture.
    """
    cfg = _to_dict(model_cfg)
    name = cfg.get("name")
    if name not in MODEL_REGISTRY:
        raise ConfigError(f"unknown model.name={name!r}; valid names: {', '.join(model_names())}")
    entry = MODEL_REGISTRY[name]
    num_classes = _positive_int(num_classes, "num_classes")
    in_chans = _positive_int(in_chans, "in_chans")
    img_size = _positive_int(img_size, "img_size")

    unknown = sorted(set(cfg) - set(COMMON_KEYS) - set(entry.knobs))
    if unknown:
        accepted = ", ".join(list(COMMON_KEYS) + sorted(entry.knobs))
        raise ConfigError(f"model {name!r} does not accept key(s) {unknown}; accepted keys: {accepted}")
    pretrained = cfg.get("pretrained", False)
    if not isinstance(pretrained, bool):
        raise ConfigError(f"model.pretrained must be true or false, got {pretrained!r}")
    checkpoint = cfg.get("checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str | Path):
        raise ConfigError(f"model.checkpoint must be a path or null, got {checkpoint!r}")
    knobs = {k: cfg.get(k, default) for k, default in entry.knobs.items()}

    if checkpoint is not None and pretrained:
        # the checkpoint overwrites every weight, so downloading the published ones would be wasted
        log.info("model.checkpoint is set: skipping the pretrained download for %s", name)
        pretrained = False
    model = entry.builder(num_classes, in_chans, img_size, pretrained, **knobs)
    model.lpld_model_name = name
    if not isinstance(getattr(model, "lpld_classifier", None), str):
        raise RuntimeError(f"builder of {name!r} did not set model.lpld_classifier")
    if checkpoint is not None:
        desc = f"{name!r} (num_classes={num_classes}, in_chans={in_chans}, img_size={img_size}, knobs={knobs})"
        load_model_checkpoint(model, checkpoint, desc)
    return model
