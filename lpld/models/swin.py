"""Swin-Transformer-V2 tiny (timm ``swinv2_tiny_window8_256``) at the dataset's image size.

timm builds the network for ``img_size`` (patch 4, four stages; each patch merging halves the map,
padding an odd side), so stage ``i`` sees a ``ceil(img_size / 4 / 2**i)`` square map. A window larger
than a map is clamped to it (full attention, no shift); a window that does not tile a map is handled
by timm with zero padding. ``window_size: null`` (auto) avoids that padding: it picks the largest
window <= 8 that tiles every stage map that is larger than the window, e.g. (window -> windows used)

    img_size 28  -> maps 7,4,2,1     -> 8 -> 7,4,2,1 (clamped)   img_size 32  -> 8,4,2,1    -> 8 -> 8,4,2,1
    img_size 64  -> maps 16,8,4,2    -> 8 -> 8,8,4,2             img_size 96  -> 24,12,6,3  -> 6 -> 6,6,6,3
    img_size 224 -> maps 56,28,14,7  -> 7 -> 7,7,7,7             img_size 256 -> 64,32,16,8 -> 8 (published)

and falls back to 8 (with padding) when only window 1 would tile (e.g. 36 px: maps 9,5,3,2). Any
``img_size >= 4`` works (a multiple of 4 is best: the stride-4 patch conv drops ``img_size % 4`` edge
pixels); inputs must then be exactly ``img_size`` square (timm's strict size check). Swin-V2's log-spaced continuous
position bias lets the published window-8 weights load at other window sizes (``pretrained=true``).
Swin has LayerNorm, not BatchNorm: it cannot be the teacher of BN-matching recovery.
"""

from __future__ import annotations

import math

import timm
from torch import nn

from lpld.errors import ConfigError
from lpld.models.pretrained import PretrainedWeightsError, timm_pretrained_overlay
from lpld.models.registry import register_model

TIMM_NAME = "swinv2_tiny_window8_256"
PATCH_SIZE = 4
NUM_STAGES = 4
MAX_WINDOW = 8


def stage_resolutions(img_size: int) -> list[int]:
    """Side of the token map entering each of the four stages."""
    sides = [img_size // PATCH_SIZE]
    for _ in range(NUM_STAGES - 1):
        sides.append(math.ceil(sides[-1] / 2))
    return sides


def auto_window_size(img_size: int, max_window: int = MAX_WINDOW) -> int:
    """Largest window <= ``max_window`` tiling every stage map larger than it (see module docstring)."""
    sides = stage_resolutions(img_size)
    for w in range(max_window, 1, -1):
        if all(s <= w or s % w == 0 for s in sides):
            return w
    return max_window


@register_model("swinv2_tiny", "timm Swin-V2 tiny (swinv2_tiny_window8_256) built for the dataset image size")
def build_swinv2_tiny(
    num_classes: int, in_chans: int, img_size: int, pretrained: bool, *, window_size: int | None = None
) -> nn.Module:
    if img_size < PATCH_SIZE:
        raise ConfigError(f"swinv2_tiny needs img_size >= {PATCH_SIZE} (patch size), got {img_size}")
    if window_size is None:
        window_size = auto_window_size(img_size)
    elif isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ConfigError(f"model.window_size must be a positive int or null (auto), got {window_size!r}")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size, window_size=window_size)
    if pretrained:
        overlay = timm_pretrained_overlay(TIMM_NAME, "swinv2_tiny")
        if overlay is not None:
            kwargs["pretrained_cfg_overlay"] = overlay
        try:
            model = timm.create_model(TIMM_NAME, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:  # download / file / key errors from timm or the hub
            raise PretrainedWeightsError(
                f"could not load weights for swinv2_tiny ({TIMM_NAME}): {e}. Set model.pretrained=false, "
                "or model.checkpoint=/path/to/teacher.pt"
            ) from e
    else:
        model = timm.create_model(TIMM_NAME, pretrained=False, **kwargs)
    model.lpld_classifier = "head.fc"
    return model
