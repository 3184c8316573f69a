"""Soft-label quantization (LPQLD Sec. III-C; FKD's marginal smoothing / re-normalization).

Modes, for teacher logits z (B, C) of one augmented batch:

* ``none``: the full logits, fp16 (LPLD's storage, component 6 of Table 21).
* ``mr`` (MR-k, marginal re-normalization): the top-k *logits* (fp16) and their class indices.
  Decoded target at temperature T: softmax over the k stored logits / T on those classes, 0 elsewhere:
  ``p_i = exp(z_i/T) / sum_{j in topk} exp(z_j/T)`` for i in top-k.
* ``ms`` (MS-k, marginal smoothing): the top-k *probabilities* at the generation temperature
  T_g, ``softmax(z/T_g)``, (fp16) and their indices. Decoded: the k stored probabilities on their
  classes and the remaining mass ``1 - sum_k p`` spread uniformly over the other C - k classes.
  Decoding at a temperature T != T_g re-tempers this distribution, ``q_i ∝ p_i^(T_g/T)``, which is
  exact on the top-k classes (p_i ∝ exp(z_i/T_g)) and treats the smoothed tail as one level.
* ``hard``: the argmax class only (one-hot target).

Each mode is a :class:`LabelCodec` registered with ``@register_label_codec(name)`` (``get_label_codec``,
``list_label_codecs``); a new format is one registered subclass (arrays, encode, decode).

Indices are stored as uint16 when C <= 65536 (exact for ImageNet-21K-P's 10,450 classes; the
official code uses int16 and FKD used floats, which break above 2048 classes in fp16), else uint32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lpld.core.registry import Registry


def index_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned dtype holding every class index exactly."""
    return np.dtype(np.uint16) if num_classes <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class QuantConfig:
    """Label quantization: ``mode`` a registered codec name, ``k`` for mr/ms, ``temperature`` = T_g for ms."""

    mode: str = "none"
    k: int = 0
    temperature: float = 1.0

    def validate(self, num_classes: int) -> None:
        """Raise ValueError (ConfigError) for an unknown mode, or k outside 1..C-1 for mr/ms."""
        codec = get_label_codec(self.mode)
        if codec.uses_k and int(self.k) < 1:
            raise ValueError(
                f"quant={self.mode} keeps the top-k logits and needs 1 <= k < num_classes ({num_classes}), got "
                f"quant.k={self.k}; set quant.k to "
                f"a value in 1..{num_classes - 1} (e.g. quant.k={min(10, num_classes - 1)}), or quant=hard to store "
                "only the argmax class"
            )
        if codec.uses_k and int(self.k) >= num_classes:
            raise ValueError(
                f"quant={self.mode} needs k < num_classes ({num_classes}), got quant.k={self.k}; set quant.k to a "
                f"value in 1..{num_classes - 1} (k >= num_classes stores no less than quant=none)"
            )
        if self.temperature <= 0:
            raise ValueError(f"quant.temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tag(self) -> str:
        """Short name used in store keys: none, mr10, ms50, hard."""
        return f"{self.mode}{self.k}" if get_label_codec(self.mode).uses_k else self.mode


# ----------------------------------------------------------------------------------------------- codecs
class LabelCodec(ABC):
    """One stored-label format: which arrays it stores, how it encodes logits and decodes a target.

    Subclasses registered with ``@register_label_codec(name)`` are what ``quant=<name>`` selects.

    Attributes:
        uses_k: the format keeps the top ``quant.k`` classes (needs 1 <= k < C).
        keeps_logits: the stored values are logits (full or top-k), so label smoothing in logit space
            (``kd_loss.smoothing_temperature``) applies to them.
    """

    name: str = ""
    uses_k: bool = False
    keeps_logits: bool = False

    @abstractmethod
    def arrays(self, cfg: QuantConfig, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-sample arrays: name -> (trailing shape, dtype)."""

    @abstractmethod
    def encode(self, z: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        """(B, C) float32 logits -> name -> tensor with leading dim B, on ``z``'s device."""

    @abstractmethod
    def decode(self, stored: Any, temperature: float, num_classes: int, gen_temperature: float | None) -> torch.Tensor:
        """A stored batch -> (B, C) float32 target probabilities at ``temperature``."""


_CODECS: Registry[LabelCodec] = Registry("label codec (quant mode)", "quant")


def register_label_codec(name: str) -> Callable[[type[LabelCodec]], type[LabelCodec]]:
    """Class decorator: register an instance of the decorated LabelCodec subclass as ``quant=<name>``."""

    def add(cls: type[LabelCodec]) -> type[LabelCodec]:
        codec = cls()
        codec.name = name
        _CODECS.register(name)(codec)
        return cls

    return add


def get_label_codec(name: str) -> LabelCodec:
    """The codec of ``quant=<name>`` (raises ConfigError, a ValueError, naming the valid modes)."""
    return _CODECS.get(name)


def list_label_codecs() -> list[str]:
    """Registered quant modes, in registration order."""
    return _CODECS.names()


@register_label_codec("none")
class FullLogits(LabelCodec):
    """The full logits, fp16 (LPLD's storage). Target: softmax(z / T)."""

    keeps_logits = True

    def arrays(self, cfg: QuantConfig, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"logits": ((num_classes,), np.dtype(np.float16))}

    def encode(self, z: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        return {"logits": z.half()}

    def decode(self, stored: Any, temperature: float, num_classes: int, gen_temperature: float | None) -> torch.Tensor:
        return torch.softmax(stored.logits.float() / temperature, dim=1)


class _TopK(LabelCodec):
    """Shared storage of mr / ms: the top-k values (fp16) and their class indices (abstract: ``ranked``)."""

    uses_k = True

    def arrays(self, cfg: QuantConfig, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        k = (int(cfg.k),)
        return {"topk_values": (k, np.dtype(np.float16)), "topk_indices": (k, index_dtype(num_classes))}

    @abstractmethod
    def ranked(self, z: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
        """The (B, C) values whose top k are kept."""

    def encode(self, z: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        vals, ind = torch.topk(self.ranked(z, cfg), int(cfg.k), dim=1, largest=True, sorted=True)
        return {"topk_values": vals.half(), "topk_indices": ind.to(torch.int32)}


@register_label_codec("mr")
class MarginalRenormalization(_TopK):
    """MR-k: the top-k logits. Target: softmax over the k logits / T on those classes, 0 elsewhere."""

    keeps_logits = True

    def ranked(self, z: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
        return z

    def decode(self, stored: Any, temperature: float, num_classes: int, gen_temperature: float | None) -> torch.Tensor:
        vals, ind = stored.topk_values.float(), stored.topk_indices.long()
        out = torch.zeros(vals.shape[0], num_classes, dtype=torch.float32, device=vals.device)
        return out.scatter_(1, ind, torch.softmax(vals / temperature, dim=1))


@register_label_codec("ms")
class MarginalSmoothing(_TopK):
    """MS-k: the top-k probabilities at T_g; the rest of the mass spread uniformly over the other classes."""

    def ranked(self, z: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
        return torch.softmax(z / cfg.temperature, dim=1)

    def decode(self, stored: Any, temperature: float, num_classes: int, gen_temperature: float | None) -> torch.Tensor:
        vals, ind = stored.topk_values.float(), stored.topk_indices.long()
        b, k = vals.shape
        tg = gen_temperature if gen_temperature is not None else getattr(stored, "gen_temperature", None)
        tg = float(temperature if tg is None else tg)
        rest = (1.0 - vals.sum(dim=1, keepdim=True)).clamp_min(0.0) / (num_classes - k)
        out = rest.expand(b, num_classes).clone().scatter_(1, ind, vals)
        if tg != float(temperature):
            # q ∝ p^(T_g/T), in log space for stability; zero-mass entries stay zero
            logq = torch.where(out > 0, out.log() * (tg / float(temperature)), torch.full_like(out, -torch.inf))
            out = torch.softmax(logq, dim=1)
        else:
            out = out / out.sum(dim=1, keepdim=True)
        return out


@register_label_codec("hard")
class HardLabel(LabelCodec):
    """The argmax class only. Target: one-hot."""

    def arrays(self, cfg: QuantConfig, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"hard": ((), index_dtype(num_classes))}

    def encode(self, z: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        return {"hard": z.argmax(dim=1).to(torch.int32)}

    def decode(self, stored: Any, temperature: float, num_classes: int, gen_temperature: float | None) -> torch.Tensor:
        return F.one_hot(stored.hard.long(), num_classes).float()


QUANT_MODES = tuple(list_label_codecs())  # the built-in modes (kept for older imports; the registry is the truth)


# ----------------------------------------------------------------------------------------------- API
def label_arrays(cfg: QuantConfig, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-sample label arrays of a mode: name -> (trailing shape, dtype)."""
    return get_label_codec(cfg.mode).arrays(cfg, num_classes)


def encode_tensors(logits: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """Quantize one batch of teacher logits where they are (any device, no host synchronisation).

    Args:
        logits: (B, C) float teacher logits (fp32 recommended: ranking happens before the fp16 cast;
            bf16/fp16 logits are upcast first).
        cfg: quantization config (validated against C, which is a shape, not data).

    Returns:
        name -> tensor on ``logits.device`` with leading dim B: ``logits``/``topk_values`` float16,
        ``topk_indices``/``hard`` int32 (exact for any class count; ``encode`` / the store writer narrow
        them to ``index_dtype`` on the host, where the copy happens anyway).
    """
    z = logits.detach().float()
    cfg.validate(int(z.shape[1]))
    return get_label_codec(cfg.mode).encode(z, cfg)


def to_host_arrays(encoded: dict[str, torch.Tensor], num_classes: int) -> dict[str, np.ndarray]:
    """``encode_tensors`` output -> host numpy arrays in the store dtypes (one copy per array)."""
    idx = index_dtype(num_classes)
    out: dict[str, np.ndarray] = {}
    for name, t in encoded.items():
        a = t.cpu().numpy()
        out[name] = a.astype(idx) if name in ("topk_indices", "hard") else a
    return out


def encode(logits: torch.Tensor, cfg: QuantConfig) -> dict[str, np.ndarray]:
    """Quantize one batch of teacher logits for storage (host arrays; see ``encode_tensors``).

    Args:
        logits: (B, C) float teacher logits on any device (fp32 recommended: ranking happens before
            the fp16 cast). The quantization runs on that device; only the k values per row (not the
            C logits) cross to the host.
        cfg: quantization config.

    Returns:
        name -> array with leading dim B, matching ``label_arrays``.
    """
    return to_host_arrays(encode_tensors(logits, cfg), int(logits.shape[1]))


def decode(
    stored: Any, mode: str, temperature: float, num_classes: int, gen_temperature: float | None = None
) -> torch.Tensor:
    """The teacher target distribution of a stored batch at temperature T.

    Args:
        stored: a StoredBatch (fields logits / topk_values / topk_indices / hard; ``gen_temperature``
            optional, used by ``ms``).
        mode: the store's quant mode.
        temperature: T of the target (the student's KD temperature).
        num_classes: C.
        gen_temperature: T_g the ``ms`` probabilities were computed at; defaults to
            ``stored.gen_temperature`` when present, else T (no re-tempering).

    Returns:
        (B, C) float32 probabilities (rows sum to 1).
    """
    return get_label_codec(mode).decode(stored, temperature, num_classes, gen_temperature)
