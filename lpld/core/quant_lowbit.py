"""Top-k soft labels below fp16 (issue 21, item 4): per-row-scaled 8-bit / 4-bit values and compact class indices.

Two registered codecs, the low-bit counterparts of ``mr`` and ``ms`` (``lpld.core.quant``):

* ``mrq`` (``quant=mrq``): the top-k *logits* z_(1) >= ... >= z_(k) of each row; decoded like MR-k, softmax over
  the k values / T on their classes, 0 elsewhere.
* ``msq`` (``quant=msq``): the top-k *log-probabilities* ``log softmax(z / T_g)``; decoded like MS-k, the k
  probabilities on their classes and the remaining mass spread uniformly over the other C - k classes (re-tempered
  at T != T_g as ``ms`` does).

Per row, with the k kept values sorted descending (v_1 >= ... >= v_k), only the gaps ``d_i = v_1 - v_i`` in
``[0, s]``, ``s = v_1 - v_k``, are quantized:

* ``qscale``: s as fp16 rounded *up* (``s16 >= s``, so every gap maps into [0, 1] of the scale);
* ``qvalues``: the k - 2 interior gaps as ``q_i = clamp(round(d_i / s16 * L), 1, L)``, ``L = 2^bits - 1``, uint8
  (bits = 8) or two per byte, low nibble first (bits = 4); d_1 = 0 and d_k = s are implied, not stored. The clamp
  at 1 keeps the teacher's top-1 class strictly on top (a quantized label never changes its argmax);
* ``qindices``: the k class indices, uint8 when C <= 256, uint16 when C <= 65536, else uint32
  (``params.index=plain``, the default); or (``params.index=rank``) the rank of the ordered k-subset among all
  P = C (C-1) ... (C-k+1) of them, in ceil(log2(P) / 8) bytes (little-endian uint8): C = 10, k = 5 takes 2 bytes
  instead of 5. The rank is the mixed-radix number of the Lehmer digits d_j = (index j) - #{earlier indices
  below it}, radix C - j; it needs P < 2^63 (C = 10: any k; C = 100: k <= 9; C = 1000: k <= 6);
* ``qtop`` (``msq`` only): v_1 = the top log-probability, fp16 (the gaps fix the rest up to this offset).

Dequantized gaps ``d^_i = q_i * s16 / L`` satisfy ``|d^_i - d_i| <= s16 / (2L)`` when d_i >= s16 / (2L), and
``<= s16 / L`` otherwise (the clamp at 1); the last gap is off by ``s16 - s`` (< one fp16 ulp of s). Bytes per row:
``k * idx + ceil((k - 2) * bits / 8) + 2`` (+ 2 for ``msq``); mr10 (fp16 + uint16) takes 40 B, mrq k=10 8-bit with
C <= 256 takes 10 + 8 + 2 = 20 B, 4-bit 10 + 4 + 2 = 16 B.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch

from lpld.core.quant import CodecArray, CodecParam, LabelCodec, QuantConfig, register_label_codec

BITS = (4, 8)
FP16_MAX = 65504.0


def compact_index_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned dtype holding every class index: uint8 up to 256 classes, uint16 up to 65536, else uint32."""
    if num_classes <= 1 << 8:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if num_classes <= 1 << 16 else np.dtype(np.uint32)


def packed_len(n: int, bits: int) -> int:
    """Bytes of n quantized values at ``bits`` bits (4-bit: two per byte)."""
    return n if bits == 8 else (n + 1) // 2


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= x for x >= 0 (float32, clamped to [0, 65504]).

    Rounded to nearest first; where that fell below x, the next fp16 up is the bit pattern + 1 (non-negative
    fp16 values order like their int16 patterns), which works on every device and dtype backend.
    """
    x = x.float().clamp(0.0, FP16_MAX)
    h = x.half()
    up = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(h.float() < x, up, h)


def quantize_gaps(d: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """Gaps d (B, n) in [0, s] -> levels (B, n) int32 in 1..L (0 where the row's scale s (B,) is 0)."""
    levels = (1 << bits) - 1
    s = s.float().view(-1, 1)
    q = torch.round(d.float() / s.clamp_min(torch.finfo(torch.float32).tiny) * levels).clamp_(1, levels)
    return torch.where(s > 0, q, torch.zeros_like(q)).to(torch.int32)


def pack4(q: torch.Tensor) -> torch.Tensor:
    """(B, n) levels in 0..15 -> (B, ceil(n / 2)) bytes, element 2j in the low nibble, 2j + 1 in the high one."""
    if q.shape[1] % 2:
        q = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.int32)


def unpack4(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack4``: (B, ceil(n / 2)) bytes -> (B, n) int64 levels."""
    p = p.long()
    return torch.stack([p & 15, p >> 4], dim=2).reshape(p.shape[0], -1)[:, :n]


INDEX_CODES = ("plain", "rank")
_RANK_LIMIT = 1 << 63  # the rank is computed in int64


def subset_count(num_classes: int, k: int) -> int:
    """P = C (C - 1) ... (C - k + 1): the number of ordered k-subsets of C classes."""
    p = 1
    for j in range(k):
        p *= num_classes - j
    return p


def rank_bytes(num_classes: int, k: int) -> int:
    """Bytes of an ordered k-subset's rank: ceil(log2(P) / 8) (at least 1)."""
    return max(1, ((subset_count(num_classes, k) - 1).bit_length() + 7) // 8)


def rank_subsets(ind: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, k) distinct class indices (in order) -> (B,) int64 rank in [0, P).

    Lehmer digit j: d_j = ind_j - #{i < j: ind_i < ind_j} in [0, C - j); rank = sum_j d_j prod_{i > j} (C - i).
    """
    ind = ind.long()
    v = torch.zeros(ind.shape[0], dtype=torch.int64, device=ind.device)
    for j in range(ind.shape[1]):
        below = (ind[:, :j] < ind[:, j : j + 1]).sum(dim=1)
        v = v * (num_classes - j) + (ind[:, j] - below)
    return v


def unrank_subsets(v: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """Inverse of ``rank_subsets``: (B,) int64 ranks -> (B, k) int64 class indices."""
    v = v.long().clone()
    digits = []
    for j in reversed(range(k)):
        digits.append(v % (num_classes - j))
        v = v // (num_classes - j)
    digits.reverse()
    b = v.shape[0]
    used = torch.zeros(b, num_classes, dtype=torch.bool, device=v.device)
    out = torch.empty(b, k, dtype=torch.int64, device=v.device)
    rows = torch.arange(b, device=v.device)
    for j, d in enumerate(digits):
        # the d-th (0-based) class not used yet: the first position where the count of free classes reaches d + 1
        free = torch.cumsum((~used).long(), dim=1)
        c = torch.argmax((free == (d + 1).view(-1, 1)).long(), dim=1)
        out[:, j] = c
        used[rows, c] = True
    return out


def to_le_bytes(v: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) non-negative int64 -> (B, n) bytes, least significant first."""
    return torch.stack([(v >> (8 * i)) & 255 for i in range(n)], dim=1).to(torch.int32)


def from_le_bytes(b: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_le_bytes``: (B, n) bytes -> (B,) int64."""
    b = b.long()
    v = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
    for i in reversed(range(b.shape[1])):
        v = (v << 8) | b[:, i]
    return v


class _TopKLowBit(LabelCodec):
    """Shared storage of ``mrq`` / ``msq`` (see the module docstring); subclasses pick the values and the decode."""

    params: ClassVar[dict[str, CodecParam]] = {
        "k": CodecParam(int, None, "classes kept per row, 2 <= k < num_classes"),
        "bits": CodecParam(int, 8, "bits per quantized value, 8 or 4 (two per byte)"),
        "index": CodecParam(str, "plain", "class indices: plain (uint8/16/32 each) | rank (the ordered subset's rank)"),
    }
    has_top: ClassVar[bool] = False  # stores qtop, the top value (log-probabilities need their offset)
    base: ClassVar[str] = ""  # the fp16 format it lowers (tag: mr10q8)

    def validate(self, cfg: QuantConfig, num_classes: int) -> None:
        k = int(cfg.k)
        if not 2 <= k < num_classes:
            raise ValueError(
                f"quant={self.name} keeps the top-k values and needs 2 <= k < num_classes ({num_classes}), got "
                f"quant.k={cfg.k}; set quant.k to a value in 2..{num_classes - 1}"
            )
        if int(cfg.param("bits")) not in BITS:
            raise ValueError(f"quant.params.bits must be 8 or 4 for quant={self.name}, got {cfg.param('bits')}")
        code = cfg.param("index")
        if code not in INDEX_CODES:
            raise ValueError(f"quant.params.index must be plain or rank for quant={self.name}, got {code!r}")
        if code == "rank" and subset_count(num_classes, k) >= _RANK_LIMIT:
            raise ValueError(
                f"quant.params.index=rank needs C (C-1) ... (C-k+1) < 2^63, but C={num_classes}, quant.k={k} exceeds "
                "it; set quant.params.index=plain or a smaller quant.k"
            )

    def arrays(self, cfg: QuantConfig, num_classes: int) -> dict[str, CodecArray]:
        k, bits = int(cfg.k), int(cfg.param("bits"))
        if cfg.param("index") == "rank":
            out = {"qindices": CodecArray((rank_bytes(num_classes, k),), np.dtype(np.uint8))}
        else:
            out = {"qindices": CodecArray((k,), compact_index_dtype(num_classes))}
        if k > 2:  # no interior gap at k = 2: the array would be empty
            out["qvalues"] = CodecArray((packed_len(k - 2, bits),), np.dtype(np.uint8))
        out["qscale"] = CodecArray((), np.dtype(np.float16))
        if self.has_top:
            out["qtop"] = CodecArray((), np.dtype(np.float16))
        return out

    @abstractmethod
    def values(self, z: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
        """The (B, C) values whose top k are kept: logits (mrq) or log-probabilities (msq), one per subclass."""

    def encode(self, z: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        k, bits = int(cfg.k), int(cfg.param("bits"))
        vals, ind = torch.topk(self.values(z, cfg), k, dim=1, largest=True, sorted=True)
        gaps = vals[:, :1] - vals  # (B, k), ascending from 0 to s
        s16 = fp16_ceil(gaps[:, -1])
        if cfg.param("index") == "rank":
            c = z.shape[1]
            out = {"qindices": to_le_bytes(rank_subsets(ind, c), rank_bytes(c, k))}
        else:
            out = {"qindices": ind.to(torch.int32)}
        if k > 2:
            q = quantize_gaps(gaps[:, 1:-1], s16, bits)
            out["qvalues"] = q if bits == 8 else pack4(q)
        out["qscale"] = s16
        if self.has_top:
            out["qtop"] = vals[:, 0].clamp(-FP16_MAX, FP16_MAX).half()
        return out

    def gaps(self, arrays: Mapping[str, torch.Tensor], cfg: QuantConfig) -> torch.Tensor:
        """Dequantized (B, k) gaps d^ = v^_1 - v^_i: 0, the interior levels * s16 / L, s16."""
        k, bits = int(cfg.k), int(cfg.param("bits"))
        s = arrays["qscale"].float().view(-1, 1)
        b = s.shape[0]
        zero = torch.zeros(b, 1, dtype=torch.float32, device=s.device)
        if k == 2:
            return torch.cat([zero, s], dim=1)
        q = arrays["qvalues"].long()
        q = q if bits == 8 else unpack4(q, k - 2)
        return torch.cat([zero, q.float() * (s / ((1 << bits) - 1)), s], dim=1)

    def indices(self, arrays: Mapping[str, torch.Tensor], cfg: QuantConfig, num_classes: int) -> torch.Tensor:
        """The (B, k) int64 class indices of a stored batch."""
        if cfg.param("index") == "rank":
            return unrank_subsets(from_le_bytes(arrays["qindices"]), num_classes, int(cfg.k))
        return arrays["qindices"].long()

    def tag(self, cfg: QuantConfig) -> str:
        rank = "r" if cfg.param("index") == "rank" else ""
        return f"{self.base}{int(cfg.k)}q{int(cfg.param('bits'))}{rank}"


@register_label_codec("mrq")
class MarginalRenormalizationLowBit(_TopKLowBit):
    """MR-k with per-row-scaled 8/4-bit logit gaps. Target: softmax(-d^ / T) over the k classes, 0 elsewhere."""

    keeps_logits = True  # the gaps are logits up to a per-row shift, and softmax ignores shifts
    base = "mr"

    def values(self, z: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
        return z

    def decode(
        self, arrays: Mapping[str, torch.Tensor], cfg: QuantConfig, temperature: float, num_classes: int
    ) -> torch.Tensor:
        d = self.gaps(arrays, cfg)
        ind = self.indices(arrays, cfg, num_classes)
        out = torch.zeros(d.shape[0], num_classes, dtype=torch.float32, device=d.device)
        return out.scatter_(1, ind, torch.softmax(-d / float(temperature), dim=1))


@register_label_codec("msq")
class MarginalSmoothingLowBit(_TopKLowBit):
    """MS-k with per-row-scaled 8/4-bit log-probability gaps and the fp16 top log-probability."""

    params: ClassVar[dict[str, CodecParam]] = {
        **_TopKLowBit.params,
        "temperature": CodecParam(float, None, "T_g the stored log-probabilities are computed at"),
    }
    has_top = True
    base = "ms"

    def values(self, z: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
        return torch.log_softmax(z / float(cfg.temperature), dim=1)

    def decode(
        self, arrays: Mapping[str, torch.Tensor], cfg: QuantConfig, temperature: float, num_classes: int
    ) -> torch.Tensor:
        d = self.gaps(arrays, cfg)
        ind = self.indices(arrays, cfg, num_classes)
        b, k = d.shape
        p = torch.exp(arrays["qtop"].float().view(-1, 1) - d)  # the k probabilities at T_g
        rest = (1.0 - p.sum(dim=1, keepdim=True)).clamp_min(0.0) / (num_classes - k)
        out = rest.expand(b, num_classes).clone().scatter_(1, ind, p)
        tg = float(cfg.temperature)
        if tg != float(temperature):  # q ∝ p^(T_g / T), as ms does; zero-mass entries stay zero
            logq = torch.where(out > 0, out.log() * (tg / float(temperature)), torch.full_like(out, -torch.inf))
            return torch.softmax(logq, dim=1)
        return out / out.sum(dim=1, keepdim=True)
