"""Any timm model by name: ``{name: timm, arch: <timm model name>}`` (e.g. a cross-architecture student
``student.arch=convnext_atto``: the registry's own names come first, any other name timm knows is built here).

timm builds the network with ``num_classes`` and ``in_chans`` (and ``img_size`` where the architecture takes
one, e.g. ViTs), so every dataset's class count and channels work; ``lpld_classifier`` is the module timm names
as the classifier (``get_classifier()``). Published weights come through :mod:`lpld.models.pretrained` (offline:
one clear message).
"""

from __future__ import annotations

from torch import nn

from lpld.errors import ConfigError
from lpld.models.pretrained import PretrainedWeightsError, timm_pretrained_overlay
from lpld.models.registry import register_model


def is_timm_model(name: str) -> bool:
    """Whether timm can build ``name`` (its registry, without downloading anything)."""
    import timm

    return bool(name) and timm.is_model(name)


def _classifier_name(model: nn.Module) -> str:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, m in model.named_modules():
        if m is head and isinstance(m, nn.Linear):
            return name
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"timm model {type(model).__name__} has no nn.Linear classifier; choose another arch")
    return linears[-1]


@register_model("timm", "any timm model by name (knob arch), built for the dataset's classes and channels")
def build_timm(num_classes: int, in_chans: int, img_size: int, pretrained: bool, *, arch: str = "") -> nn.Module:
    import timm

    if not is_timm_model(str(arch)):
        raise ConfigError(
            f"model arch {arch!r} is not a timm model name; choose one of timm.list_models() (e.g. convnext_atto, "
            "resnet10t) or a registered model (lpld.models.model_names())"
        )
    kwargs: dict = dict(num_classes=num_classes, in_chans=in_chans)
    if pretrained:
        overlay = timm_pretrained_overlay(str(arch), str(arch))
        if overlay is not None:
            kwargs["pretrained_cfg_overlay"] = overlay
    try:
        try:
            model = timm.create_model(str(arch), pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError:  # convolutional networks take any input size and no img_size argument
            model = timm.create_model(str(arch), pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise PretrainedWeightsError(
            f"could not load weights for timm model {arch}: {e}. Set pretrained=false, or a local checkpoint"
        ) from e
    model.lpld_classifier = _classifier_name(model)
    return model
