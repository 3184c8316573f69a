"""torchvision architectures: ResNet-18/50/101 (+ small-image stem), MobileNetV2, EfficientNet-B0, ShuffleNetV2.

The model definitions are torchvision's own; this module only adapts them:
    * ``in_chans != 3``: the first conv is rebuilt with ``in_chans`` input channels (same kernel,
      stride, padding). With pretrained weights its kernel is adapted from the RGB kernel: summed over
      RGB for one channel (a grey image equals R=G=B, so the response is unchanged), otherwise the RGB
      kernel is tiled over the channels and rescaled by ``3 / in_chans`` to keep the activation scale.
    * ``small_stem`` (the CIFAR/Tiny-ImageNet ResNet of SRe2L/RDED): conv1 becomes 3x3 stride 1
      padding 1 and the max-pool an ``nn.Identity``, so a 32 px input keeps a 32x32 map in layer1.
      With ``pretrained=true`` the body keeps the published weights and the new 3x3 conv1 is freshly
      initialised (a warning says so).
    * ``pretrained=true``: the published ImageNet-1k weights (``IMAGENET1K_V1``, the weights that
      ``pretrained=True`` gave in SRe2L / RDED / G-VBSM). When ``num_classes != 1000`` the final Linear
      is replaced by a freshly initialised ``nn.Linear(in_features, num_classes)``.

Every model works for any ``img_size`` >= 1 thanks to adaptive average pooling before the classifier
(tested down to 28 px).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.models as tvm
from torch import nn

from lpld.errors import ConfigError
from lpld.models.pretrained import torchvision_state_dict
from lpld.models.registry import register_model

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class TVArch:
    """How to build and adapt one torchvision architecture."""

    fn: Callable[..., nn.Module]
    weights: object  # torchvision weights enum member used for pretrained=true
    classifier: str  # dotted name of the final nn.Linear
    kaiming_convs: bool  # torchvision initialises this family's convs with kaiming_normal_(fan_out)


TV_ARCHS: dict[str, TVArch] = {
    "resnet18": TVArch(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "fc", True),
    "resnet50": TVArch(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, "fc", True),
    "resnet101": TVArch(tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1, "fc", True),
    "mobilenetv2": TVArch(tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1, "classifier.1", True),
    "efficientnet_b0": TVArch(tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, "classifier.1", True),
    "shufflenetv2": TVArch(tvm.shufflenet_v2_x0_5, tvm.ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1, "fc", False),
}


def _flag(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"model.{key} must be true or false, got {value!r}")
    return value


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _first_conv_name(model: nn.Module) -> str:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            return name
    raise RuntimeError(f"{type(model).__name__} has no Conv2d")


def adapt_rgb_kernel(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Map a pretrained RGB conv kernel (O, 3, kh, kw) to (O, in_chans, kh, kw) (see module docstring)."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_chans / weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def _init_conv(conv: nn.Conv2d, kaiming: bool) -> None:
    # match the init torchvision gives the rest of the network; otherwise keep PyTorch's default
    if kaiming:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


def _replace_first_conv(model: nn.Module, arch: TVArch, in_chans: int, pretrained: bool) -> None:
    name = _first_conv_name(model)
    old = model.get_submodule(name)
    new = nn.Conv2d(
        in_chans,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
    )
    if pretrained:
        with torch.no_grad():
            new.weight.copy_(adapt_rgb_kernel(old.weight, in_chans))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    else:
        _init_conv(new, arch.kaiming_convs)
    _set_submodule(model, name, new)


def _apply_small_stem(model: nn.Module, in_chans: int, name: str, pretrained: bool) -> None:
    if pretrained:
        warnings.warn(
            f"{name}: the small stem's 3x3 conv1 has no published weights; it is freshly initialised "
            "while the rest of the network keeps the pretrained weights",
            stacklevel=3,
        )
    conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    _init_conv(conv1, kaiming=True)
    model.conv1 = conv1
    model.maxpool = nn.Identity()


def build_torchvision(
    arch_name: str, num_classes: int, in_chans: int, pretrained: bool, small_stem: bool = False
) -> nn.Module:
    """Build ``TV_ARCHS[arch_name]`` adapted to ``num_classes`` / ``in_chans`` / stem (see module docstring)."""
    arch = TV_ARCHS[arch_name]
    if pretrained:
        # fetch (or fail fast) before spending time on the constructor
        state = torchvision_state_dict(arch.weights, arch_name)
        model = arch.fn(weights=None, num_classes=IMAGENET_CLASSES)
        model.load_state_dict(state)
        if num_classes != IMAGENET_CLASSES:
            old = model.get_submodule(arch.classifier)
            _set_submodule(model, arch.classifier, nn.Linear(old.in_features, num_classes))
    else:
        model = arch.fn(weights=None, num_classes=num_classes)
    if small_stem:
        _apply_small_stem(model, in_chans, arch_name, pretrained)
    elif in_chans != 3:
        _replace_first_conv(model, arch, in_chans, pretrained)
    model.lpld_classifier = arch.classifier
    return model


# --- registry entries (img_size is irrelevant to these fully-convolutional + adaptive-pool nets) ---


@register_model("resnet18", "torchvision ResNet-18 (small_stem=true: 3x3 stride-1 conv1, no max-pool)")
def build_resnet18(num_classes: int, in_chans: int, img_size: int, pretrained: bool, *, small_stem: bool = False):
    return build_torchvision("resnet18", num_classes, in_chans, pretrained, small_stem=_flag(small_stem, "small_stem"))


@register_model("resnet50", "torchvision ResNet-50 (small_stem=true: 3x3 stride-1 conv1, no max-pool)")
def build_resnet50(num_classes: int, in_chans: int, img_size: int, pretrained: bool, *, small_stem: bool = False):
    return build_torchvision("resnet50", num_classes, in_chans, pretrained, small_stem=_flag(small_stem, "small_stem"))


@register_model("resnet101", "torchvision ResNet-101 (small_stem=true: 3x3 stride-1 conv1, no max-pool)")
def build_resnet101(num_classes: int, in_chans: int, img_size: int, pretrained: bool, *, small_stem: bool = False):
    return build_torchvision("resnet101", num_classes, in_chans, pretrained, small_stem=_flag(small_stem, "small_stem"))


@register_model("resnet18_cifar", "ResNet-18 with the small-image stem (CIFAR / Tiny-ImageNet teachers)")
def build_resnet18_cifar(num_classes: int, in_chans: int, img_size: int, pretrained: bool):
    return build_torchvision("resnet18", num_classes, in_chans, pretrained, small_stem=True)


@register_model("resnet50_cifar", "ResNet-50 with the small-image stem")
def build_resnet50_cifar(num_classes: int, in_chans: int, img_size: int, pretrained: bool):
    return build_torchvision("resnet50", num_classes, in_chans, pretrained, small_stem=True)


@register_model("resnet101_cifar", "ResNet-101 with the small-image stem")
def build_resnet101_cifar(num_classes: int, in_chans: int, img_size: int, pretrained: bool):
    return build_torchvision("resnet101", num_classes, in_chans, pretrained, small_stem=True)


@register_model("mobilenetv2", "torchvision MobileNetV2 (width 1.0)")
def build_mobilenetv2(num_classes: int, in_chans: int, img_size: int, pretrained: bool):
    return build_torchvision("mobilenetv2", num_classes, in_chans, pretrained)


@register_model("efficientnet_b0", "torchvision EfficientNet-B0")
def build_efficientnet_b0(num_classes: int, in_chans: int, img_size: int, pretrained: bool):
    return build_torchvision("efficientnet_b0", num_classes, in_chans, pretrained)


@register_model("shufflenetv2", "torchvision ShuffleNetV2 x0.5 (the G-VBSM student/teacher)")
def build_shufflenetv2(num_classes: int, in_chans: int, img_size: int, pretrained: bool):
    return build_torchvision("shufflenetv2", num_classes, in_chans, pretrained)
