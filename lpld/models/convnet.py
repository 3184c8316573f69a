"""ConvNet-D of the dataset-distillation literature (ConvNet-3 by default).

``depth`` blocks of conv3x3(width, padding 1) -> norm -> ReLU -> AvgPool2d(2), then one linear
classifier over the flattened map. The classifier's input size follows from ``img_size``: each pool
floors the side, e.g. 28 px -> 14 -> 7 -> 3 (3x3x128 features), 32 px -> 4x4, 64 px -> 8x8.

Norms: ``batch`` (BatchNorm2d; default, needed for BN-statistics matching), ``instance``
(GroupNorm(width, width, affine=True), i.e. instance norm with a learnable affine as used in the
DC/DM literature), ``none``.
"""

from __future__ import annotations

import torch
from torch import nn

from lpld.errors import ConfigError
from lpld.models.registry import register_model

NORMS = ("batch", "instance", "none")


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(width)
    if kind == "instance":
        return nn.GroupNorm(width, width, affine=True)
    return nn.Identity()


class ConvNet(nn.Module):
    """ConvNet-D.

    Args:
        num_classes: classifier outputs.
        in_chans: input channels.
        img_size: input side; fixes the classifier's input size.
        width: channels of every conv.
        depth: number of conv blocks (each halves the side).
        norm: one of ``NORMS``.
    """

    def __init__(
        self, num_classes: int, in_chans: int, img_size: int, width: int = 128, depth: int = 3, norm: str = "batch"
    ):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"model.norm={norm!r} is not one of {NORMS}")
        for key, v in (("width", width), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.{key} must be a positive int, got {v!r}")
        side = img_size
        blocks = []
        for i in range(depth):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(in_chans if i == 0 else width, width, kernel_size=3, padding=1),
                    _norm(norm, width),
                    nn.ReLU(inplace=True),
                    nn.AvgPool2d(kernel_size=2, stride=2),
                )
            )
            side //= 2
        if side < 1:
            raise ConfigError(
                f"ConvNet with depth={depth} needs img_size >= {2**depth}, got {img_size}; lower model.depth"
            )
        self.features = nn.Sequential(*blocks)
        self.feat_side = side
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, img_size, img_size) -> logits (B, num_classes)."""
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("convnet", "ConvNet-D (default ConvNet-3, width 128) of the dataset-distillation literature")
def build_convnet(
    num_classes: int,
    in_chans: int,
    img_size: int,
    pretrained: bool,
    *,
    width: int = 128,
    depth: int = 3,
    norm: str = "batch",
) -> nn.Module:
    if pretrained:
        raise ConfigError("convnet has no published weights; set model.pretrained=false (or use model.checkpoint)")
    model = ConvNet(num_classes, in_chans, img_size, width=width, depth=depth, norm=norm)
    model.lpld_classifier = "classifier"
    return model
