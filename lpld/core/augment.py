"""Relabel augmentation: draw it from a seed, record it, replay it bit-identically.

The FKD-style relabel stage (SRe2L family, LPLD Sec. 3.3 / Table 21) labels each student batch
after the augmentation the student will see: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3)
+ horizontal flip per image, then CutMix per batch (ImageNet-1K) or Cutout per image
(ImageNet-21K), or no mixing. Two optional switches reproduce other official pipelines:
``shuffle_patches`` (RDED's ShufflePatches, before the crop; LPLD Table 8) and ``cutout_fill="random"``
(the official ImageNet-21K Cutout colour). To train on the stored labels the student must rebuild exactly
the tensor the teacher saw, so every random choice is

* drawn from a per-batch seed (``batch_seed(seed, epoch, batch)``) with numpy's PCG64, which
  is platform independent, so a batch's augmentation depends only on (seed, epoch, batch),
  not on the rank that computed it nor on where an interrupted run resumed; and
* applied by a deterministic function of the record (``apply``): crop + resize is one batched
  gather-based bilinear resize (``resized_crop``: the sampling of torchvision's resized_crop /
  ``F.interpolate(mode="bilinear", align_corners=False)`` on the crop, antialiasing off; crops are
  never larger than the source, so with out_size = image size antialiasing would not act).

Deviations from the official code, on purpose:
    * a short last batch gets its own augmentation (the official loader reuses the last
      sample's crop for the missing entries);
    * Cutout fills with 0 in the normalized input space (the dataset mean colour) by default;
      ``cutout_fill="random"`` is the official 21K fill (a uniform RGB colour in 0..255 per image,
      ``CutoutPILWithCoords``), stored as uint8 and normalized like a pixel of that colour;
    * ShufflePatches draws its permutations with the batch's PCG64 stream (RDED uses Python's
      ``random.shuffle`` per image): the same distribution, uniform and independent per image and axis.

Coordinates convention: crops are (top, left, height, width) in source pixels; the CutMix
box and Cutout boxes are (y1, x1, y2, x2), half-open, in output pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

MIX_MODES = ("cutmix", "cutout", "none")
CUTOUT_FILLS = ("zero", "random")
# switches whose default leaves ``to_dict`` (and thereby every store identity and key) as it was before they existed
_OPTIONAL_DEFAULTS = {"shuffle_patches": 0, "cutout_fill": "zero", "fill_mean": None, "fill_std": None}

# Domain tags separate the random streams of different purposes that share the user seed.
_TAG_AUG = 0x41554721  # "AUG!"
_TAG_PERM = 0x5045524D  # "PERM"


@dataclass(frozen=True)
class AugConfig:
    """Augmentation applied before labelling.

    Attributes:
        out_size: side of the (square) augmented output, usually the dataset image size.
        scale: RandomResizedCrop area range (fraction of the source area).
        ratio: RandomResizedCrop aspect-ratio range (w / h).
        flip: random horizontal flip with p = 0.5.
        mix: "cutmix" (one partner permutation, lambda and box per batch), "cutout" (one box per
            image, filled per ``cutout_fill``) or "none".
        cutmix_alpha: Beta(alpha, alpha) for the CutMix lambda.
        cutout_factor: Cutout box side as a fraction of the output side.
        shuffle_patches: 0 = off; f >= 2: RDED's ShufflePatches(f) before the crop -- the source is cut
            into f column strips and f row strips of side (H // f, W // f) (a remainder is dropped, as
            RDED's code does), each image's column strips and row strips permuted independently.
        cutout_fill: "zero" (0 in normalized space) or "random" (an RGB colour 0..255 per image).
        fill_mean, fill_std: the input normalization (``to_model_input``), needed by "random" to turn the
            pixel colour into the normalized value; None otherwise.
    """

    out_size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = True
    mix: str = "cutmix"
    cutmix_alpha: float = 1.0
    cutout_factor: float = 0.5
    shuffle_patches: int = 0
    cutout_fill: str = "zero"
    fill_mean: tuple[float, ...] | None = None
    fill_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mix not in MIX_MODES:
            raise ValueError(f"aug mix must be one of {MIX_MODES}, got {self.mix!r}")
        self._check_switches()
        if self.out_size <= 0 or self.out_size > 65535:
            raise ValueError(f"aug out_size must be in 1..65535, got {self.out_size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"aug scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"aug ratio must satisfy 0 < lo <= hi, got {self.ratio}")

    def _check_switches(self) -> None:
        """Validate ``shuffle_patches`` and ``cutout_fill`` (the patch side is checked against the source in draw)."""
        f = self.shuffle_patches
        if not (f == 0 or 2 <= f <= 255):
            raise ValueError(f"aug shuffle_patches must be 0 (off) or 2..255 patches per side, got {f}")
        if f and self.out_size // f < f:  # lpld crops to the source side; draw checks the source itself
            raise ValueError(f"aug shuffle_patches={f} needs images of at least {f * f} px a side, got {self.out_size}")
        if self.cutout_fill not in CUTOUT_FILLS:
            raise ValueError(f"aug cutout_fill must be one of {CUTOUT_FILLS}, got {self.cutout_fill!r}")
        has_norm = self.fill_mean is not None or self.fill_std is not None
        if self.cutout_fill == "zero" and has_norm:
            raise ValueError("aug fill_mean / fill_std are only used by cutout_fill=random")
        if self.cutout_fill == "random":
            if self.mix != "cutout":
                raise ValueError(f"aug cutout_fill=random needs mix=cutout, got mix={self.mix!r}")
            if not has_norm or len(self.fill_mean or ()) != len(self.fill_std or ()) or not self.fill_mean:
                raise ValueError("aug cutout_fill=random needs fill_mean and fill_std of one value per channel")

    @property
    def fill_norm(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) that turn a random Cutout colour into the normalized input value, or None (zero fill)."""
        if self.cutout_fill != "random":
            return None
        return tuple(self.fill_mean), tuple(self.fill_std)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        for k, default in _OPTIONAL_DEFAULTS.items():
            if d[k] == default:
                del d[k]  # off: the dict (store identity, key) is the one written before the switch existed
            elif isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugConfig:
        d = dict(d)
        d["scale"], d["ratio"] = tuple(float(v) for v in d["scale"]), tuple(float(v) for v in d["ratio"])
        for k in ("fill_mean", "fill_std"):
            if d.get(k) is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)


@dataclass
class AugRecord:
    """Everything needed to replay one batch's augmentation.

    Attributes:
        crops: (B, 4) int64 (top, left, height, width) of each RandomResizedCrop, source pixels.
        flips: (B,) bool, horizontal flip after the crop.
        mix: "cutmix" | "cutout" | "none".
        mix_index: (B,) int64 CutMix partner position inside the batch, or None.
        lam: CutMix lambda as drawn from Beta(alpha, alpha) (the pasted area follows the clipped box).
        box: (4,) int64 CutMix box (y1, x1, y2, x2) in output pixels, or None.
        cutout: (B, 4) int64 Cutout boxes (y1, x1, y2, x2) in output pixels, or None.
        cutout_rgb: (B, C) uint8 Cutout colour per image (``cutout_fill="random"``), or None (zero fill).
        fill_norm: (mean, std) of the input normalization, set with ``cutout_rgb`` (``AugConfig.fill_norm``).
        patch_perm: (B, 2, f) int64 ShufflePatches order, or None: ``[:, 0]`` row strips, ``[:, 1]``
            column strips; output strip j shows source strip ``patch_perm[..., j]``.
    """

    crops: torch.Tensor
    flips: torch.Tensor
    mix: str = "none"
    mix_index: torch.Tensor | None = None
    lam: float | None = None
    box: torch.Tensor | None = None
    cutout: torch.Tensor | None = field(default=None)
    cutout_rgb: torch.Tensor | None = None
    fill_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    patch_perm: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    def equals(self, other: AugRecord) -> bool:
        """Exact equality of every parameter (lambda compared at float32, its stored precision)."""

        def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))

        lam_same = (self.lam is None and other.lam is None) or (
            self.lam is not None and other.lam is not None and np.float32(self.lam) == np.float32(other.lam)
        )
        return (
            self.mix == other.mix
            and torch.equal(self.crops, other.crops)
            and torch.equal(self.flips, other.flips)
            and same(self.mix_index, other.mix_index)
            and same(self.box, other.box)
            and same(self.cutout, other.cutout)
            and same(self.cutout_rgb, other.cutout_rgb)
            and self.fill_norm == other.fill_norm
            and same(self.patch_perm, other.patch_perm)
            and lam_same
        )


def record_to(rec: AugRecord, device: torch.device | str, non_blocking: bool = False) -> AugRecord:
    """A copy of ``rec`` whose per-image tensors live on ``device``; the CutMix box stays on the host.

    ``apply`` slices with the box, which needs Python ints: reading them from a device tensor would
    block the host on every batch. The per-image parts (crops, flips, partner index, Cutout boxes)
    are what the device math reads, so they move (with the Cutout colours and patch orders).
    """

    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=non_blocking)

    box = None if rec.box is None else rec.box.cpu()
    return AugRecord(
        crops=mv(rec.crops),
        flips=mv(rec.flips),
        mix=rec.mix,
        mix_index=mv(rec.mix_index),
        lam=rec.lam,
        box=box,
        cutout=mv(rec.cutout),
        cutout_rgb=mv(rec.cutout_rgb),
        fill_norm=rec.fill_norm,
        patch_perm=mv(rec.patch_perm),
    )


def switch_fields(
    mix: str, shuffle_patches: Any, cutout_fill: Any, mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """``AugConfig`` keyword arguments of the two optional switches, resolved one way for every config path.

    Args:
        mix: the resolved mix mode; a random Cutout colour exists only with ``cutout``, so any other mix keeps
            the plain (zero-fill) identity.
        shuffle_patches: None or 0 (off) or f; cutout_fill: None / "zero" or "random".
        mean, std: the dataset normalization the images are fed with (``to_model_input``).
    """
    fill = str(cutout_fill or "zero") if mix == "cutout" else "zero"
    norm = fill == "random"
    return {
        "shuffle_patches": int(shuffle_patches or 0),
        "cutout_fill": fill,
        "fill_mean": tuple(float(v) for v in mean) if norm else None,
        "fill_std": tuple(float(v) for v in std) if norm else None,
    }


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The 63-bit seed of one batch's augmentation, a pure function of (seed, epoch, batch)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, _TAG_AUG, int(epoch), int(batch)])
    return int(state.generate_state(1, np.uint64)[0]) & 0x7FFFFFFFFFFFFFFF


def epoch_permutation(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """The order of the distilled images in one student epoch: (N,) int64 permutation."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, _TAG_PERM, int(epoch)])
    return np.random.Generator(np.random.PCG64(ss)).permutation(num_images).astype(np.int64)


def batch_indices(seed: int, epoch: int, batch: int, num_images: int, batch_size: int) -> torch.Tensor:
    """Distilled-image indices of batch ``batch`` of epoch ``epoch``: (B,) int64 (last batch may be short)."""
    perm = epoch_permutation(seed, epoch, num_images)
    return torch.from_numpy(perm[batch * batch_size : (batch + 1) * batch_size].copy())


def _rrc_params(rng: np.random.Generator, n: int, h: int, w: int, cfg: AugConfig) -> np.ndarray:
    """Vectorised RandomResizedCrop.get_params (10 attempts, then the central fallback).

    Returns:
        (n, 4) int64 (top, left, height, width).
    """
    attempts = 10
    area = float(h * w)
    target = area * rng.uniform(cfg.scale[0], cfg.scale[1], size=(n, attempts))
    log_r = rng.uniform(math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), size=(n, attempts))
    ar = np.exp(log_r)
    cw = np.rint(np.sqrt(target * ar)).astype(np.int64)
    ch = np.rint(np.sqrt(target / ar)).astype(np.int64)
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.argmax(axis=1)
    any_ok = ok.any(axis=1)
    rows = np.arange(n)
    ch, cw = ch[rows, first], cw[rows, first]
    # central fallback, as torchvision: clamp the aspect ratio into the allowed range
    in_ratio = w / h
    if in_ratio < cfg.ratio[0]:
        fw, fh = w, int(round(w / cfg.ratio[0]))
    elif in_ratio > cfg.ratio[1]:
        fh, fw = h, int(round(h * cfg.ratio[1]))
    else:
        fw, fh = w, h
    ch = np.where(any_ok, ch, fh)
    cw = np.where(any_ok, cw, fw)
    u_top, u_left = rng.random(n), rng.random(n)
    top = np.where(any_ok, np.floor(u_top * (h - ch + 1)).astype(np.int64), (h - fh) // 2)
    left = np.where(any_ok, np.floor(u_left * (w - cw + 1)).astype(np.int64), (w - fw) // 2)
    return np.stack([top, left, ch, cw], axis=1).astype(np.int64)


def _clip_box(cy: np.ndarray, cx: np.ndarray, bh: int, bw: int, size: int) -> np.ndarray:
    y1, y2 = np.clip(cy - bh // 2, 0, size), np.clip(cy + bh // 2, 0, size)
    x1, x2 = np.clip(cx - bw // 2, 0, size), np.clip(cx + bw // 2, 0, size)
    return np.stack([y1, x1, y2, x2], axis=-1).astype(np.int64)


def shuffled_hw(cfg: AugConfig, src_hw: tuple[int, int]) -> tuple[int, int]:
    """(H', W') of the image the crop is drawn on: the source, or its ShufflePatches reassembly.

    RDED's ``ShufflePatches.shuffle_weight`` cuts strips of side ``W // f`` (``img[..., i : i + tw]``
    with ``i`` the pixel offset), so ``W mod f`` columns (rows) are dropped. Its last-strip branch
    ``if i != factor - 1`` compares that pixel offset with the strip count and never fires once the strip
    side is >= f; smaller strips are refused, since lpld would not reproduce that branch.
    """
    h, w = int(src_hw[0]), int(src_hw[1])
    f = cfg.shuffle_patches
    if not f:
        return h, w
    if h // f < f or w // f < f:
        raise ValueError(f"shuffle_patches={f} needs images of at least {f * f} px per side, got {h}x{w}")
    return f * (h // f), f * (w // f)


def draw(cfg: AugConfig, batch_size: int, src_hw: tuple[int, int], seed: int) -> AugRecord:
    """Draw one batch's augmentation from its seed (pure function of the arguments).

    Args:
        cfg: augmentation config.
        batch_size: B, the number of images of this batch (a short last batch passes its own size).
        src_hw: (H, W) of the distilled images.
        seed: the batch seed, see ``batch_seed``.
    """
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    h, w = shuffled_hw(cfg, src_hw)  # RDED crops the shuffled image (ToTensor, ShufflePatches, RRC, flip)
    crops = _rrc_params(rng, batch_size, h, w, cfg)
    u_flip = rng.random(batch_size)
    flips = (u_flip < 0.5) if cfg.flip else np.zeros(batch_size, dtype=bool)
    rec = AugRecord(crops=torch.from_numpy(crops), flips=torch.from_numpy(flips), mix=cfg.mix)
    s = cfg.out_size
    if cfg.mix == "cutmix":
        perm = rng.permutation(batch_size).astype(np.int64)
        # stored at float32; draw at float64 then round once so record and replay agree exactly
        lam = float(np.float32(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha)))
        side = int(s * math.sqrt(1.0 - lam))
        cy, cx = rng.integers(0, s, size=2)
        rec.mix_index = torch.from_numpy(perm)
        rec.lam = lam
        rec.box = torch.from_numpy(_clip_box(np.int64(cy), np.int64(cx), side, side, s))
    elif cfg.mix == "cutout":
        side = int(cfg.cutout_factor * s + 0.5)
        cy = rng.integers(0, s, size=batch_size)
        cx = rng.integers(0, s, size=batch_size)
        rec.cutout = torch.from_numpy(_clip_box(cy, cx, side, side, s))
        if cfg.cutout_fill == "random":
            # CutoutPILWithCoords: (random.randint(0, 255),) * 3 per image, inclusive, in pixel space
            rgb = rng.integers(0, 256, size=(batch_size, len(cfg.fill_mean or ())))
            rec.cutout_rgb, rec.fill_norm = torch.from_numpy(rgb.astype(np.uint8)), cfg.fill_norm
    # drawn last, so switching it on leaves every other parameter of the same seed unchanged
    if cfg.shuffle_patches:
        order = np.broadcast_to(np.arange(cfg.shuffle_patches, dtype=np.int64), (batch_size, 2, cfg.shuffle_patches))
        rec.patch_perm = torch.from_numpy(rng.permuted(order, axis=2))
    return rec


def to_model_input(images_uint8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> normalized float32 (N, C, H, W), the tensor the relabel stage augments.

    Relabel and student must augment the same float tensor for bit-identical replay, so both use
    this function (normalizing before the crop, not after).
    """
    x = images_uint8.to(torch.float32).div_(255.0)
    # the constants live where the images are: a CPU (1, C, 1, 1) operand in an in-place op on a CUDA
    # tensor is an error (only 0-dim CPU tensors may mix with device tensors)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _axis_coords(start: torch.Tensor, length: torch.Tensor, out_size: int) -> tuple[torch.Tensor, ...]:
    """Bilinear source taps along one axis (align_corners=False, clamped inside the crop).

    Args:
        start, length: (B,) int64 crop start and length in source pixels.

    Returns:
        i0, i1: (B, S) int64 source indices; w: (B, S) float32 weight of i1.
    """
    dst = torch.arange(out_size, device=start.device, dtype=torch.float32).view(1, -1)
    scale = length.to(torch.float32).view(-1, 1) / out_size
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    lo = src.floor()
    w = src - lo
    lo = lo.to(torch.int64)
    last = (length - 1).view(-1, 1)
    lo = torch.minimum(lo, last)
    hi = torch.minimum(lo + 1, last)
    return start.view(-1, 1) + lo, start.view(-1, 1) + hi, w


def _unshuffle(coord: torch.Tensor, perm: torch.Tensor, side: int) -> torch.Tensor:
    """Source row (column) of shuffled-image row (column) ``coord``: (B, S) int64.

    Output strip j of the shuffled image is source strip ``perm[:, j]`` (perm: (B, f) int64), strips of
    ``side`` pixels, so y -> perm[y // side] * side + y % side.
    """
    return perm.gather(1, torch.div(coord, side, rounding_mode="floor")) * side + torch.remainder(coord, side)


def resized_crop(
    images: torch.Tensor,
    index: torch.Tensor,
    crops: torch.Tensor,
    out_size: int,
    patch_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched crop + bilinear resize (``torchvision`` resized_crop semantics, antialias off).

    Samples only inside each crop (edge pixels replicate, as crop-then-resize does), with the
    pixel-centre convention of ``F.interpolate(mode="bilinear", align_corners=False)``.

    Args:
        images: (N, C, H, W) float.
        index: (B,) int64 source image of each crop.
        crops: (B, 4) int64 (top, left, height, width); with ``patch_perm``, in the shuffled image.
        out_size: S.
        patch_perm: (B, 2, f) int64 ShufflePatches order (see ``AugRecord``), or None. The crop is taken
            from the reassembled image; since a strip permutation per axis maps every row and every column
            on its own, the taps are remapped instead of building that image (the same values, gathered).

    Returns:
        (B, C, S, S).
    """
    b = index.numel()
    top, left, ch, cw = crops.unbind(1)
    y0, y1, wy = _axis_coords(top, ch, out_size)
    x0, x1, wx = _axis_coords(left, cw, out_size)
    if patch_perm is not None:
        f = patch_perm.shape[-1]
        th, tw = images.shape[2] // f, images.shape[3] // f
        y0, y1 = _unshuffle(y0, patch_perm[:, 0], th), _unshuffle(y1, patch_perm[:, 0], th)
        x0, x1 = _unshuffle(x0, patch_perm[:, 1], tw), _unshuffle(x1, patch_perm[:, 1], tw)
    # rows: pick (image, row) pairs straight from the (N, H, C, W) view: one advanced-indexing copy,
    # much cheaper on CPU than gather with expanded index tensors; every output is the same
    # elementwise expression a + (b - a) * w, so results do not depend on threads or device.
    src = images.permute(0, 2, 1, 3)
    img = index.view(-1, 1)
    r0, r1 = src[img, y0], src[img, y1]  # (B, S, C, W)
    rows = r0 + (r1 - r0) * wy.to(images.dtype).view(b, out_size, 1, 1)
    rows = rows.permute(0, 3, 2, 1)  # (B, W, C, S)
    ar = torch.arange(b, device=images.device).view(-1, 1)
    c0, c1 = rows[ar, x0], rows[ar, x1]  # (B, S_x, C, S_y)
    out = c0 + (c1 - c0) * wx.to(images.dtype).view(b, out_size, 1, 1)
    return out.permute(0, 2, 3, 1).contiguous()


def apply(images: torch.Tensor, index: torch.Tensor, rec: AugRecord, out_size: int) -> torch.Tensor:
    """Apply a recorded augmentation.

    Args:
        images: (N, C, H, W) float source images (all distilled images, any device).
        index: (B,) int64 indices into ``images`` of this batch's images.
        rec: the batch's AugRecord (B entries).
        out_size: output side S.

    Returns:
        (B, C, S, S) augmented batch, a deterministic function of the inputs.
    """
    if index.numel() != len(rec):
        raise ValueError(f"batch has {index.numel()} images but the record has {len(rec)} entries")
    dev = images.device
    perm = None if rec.patch_perm is None else rec.patch_perm.to(dev)
    out = resized_crop(images, index.to(dev), rec.crops.to(dev), out_size, patch_perm=perm)
    flips = rec.flips.to(dev).view(-1, 1, 1, 1)
    out = torch.where(flips, out.flip(-1), out)
    if rec.mix == "cutmix":
        assert rec.mix_index is not None and rec.box is not None
        # the box slices the tensor, so it is read as Python ints: keep ``rec.box`` on the host (``record_to`` does)
        # and this costs no device sync
        y1, x1, y2, x2 = (int(v) for v in rec.box.tolist())
        partner = rec.mix_index.to(dev)
        # index_select first: mixing an index tensor with slices in one assignment takes a slow scatter path
        out[:, :, y1:y2, x1:x2] = out.index_select(0, partner)[:, :, y1:y2, x1:x2]
    elif rec.mix == "cutout":
        assert rec.cutout is not None
        b = rec.cutout.to(dev)
        yy = torch.arange(out_size, device=dev).view(1, -1, 1)
        xx = torch.arange(out_size, device=dev).view(1, 1, -1)
        inside = (
            (yy >= b[:, 0].view(-1, 1, 1))
            & (yy < b[:, 2].view(-1, 1, 1))
            & (xx >= b[:, 1].view(-1, 1, 1))
            & (xx < b[:, 3].view(-1, 1, 1))
        )
        out = _fill_cutout(out, inside.unsqueeze(1), rec)
    return out


def _fill_cutout(out: torch.Tensor, inside: torch.Tensor, rec: AugRecord) -> torch.Tensor:
    """Fill the Cutout boxes (inside: (B, 1, S, S) bool) with 0, or with each image's recorded colour.

    The colour (B, C) uint8 goes through ``to_model_input``, so the box holds exactly the value a pixel of
    that colour has in the input: the official 21K pipeline draws on the uint8 crop before ``ToTensor``.
    """
    if rec.cutout_rgb is None:
        return out.masked_fill(inside, 0.0)
    assert rec.fill_norm is not None, "a random Cutout colour needs its normalization (AugRecord.fill_norm)"
    rgb = rec.cutout_rgb.to(out.device)
    fill = to_model_input(rgb.view(*rgb.shape, 1, 1), *rec.fill_norm).to(out.dtype)
    return torch.where(inside, fill, out)


def replay(images_float: torch.Tensor, batch: Any, out_size: int) -> torch.Tensor:
    """Rebuild the augmented tensor a stored batch was labelled on.

    Args:
        images_float: (N, C, H, W) the ``to_model_input`` of the distilled images.
        batch: a ``lpld.core.label_store.StoredBatch`` (uses ``batch.index`` and ``batch.aug``).
        out_size: output side S (the store manifest's ``aug.out_size``).

    Returns:
        (B, C, S, S), bit-identical (same device and dtype) to what the teacher labelled.
    """
    return apply(images_float, batch.index, batch.aug, out_size)
