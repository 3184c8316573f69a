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
``list_label_codecs``). The codec carries all of the format's work, so a new format is one registered subclass
plus ``conf/quant/<name>.yaml``; nothing else names it:

* ``arrays``: its per-row arrays (name -> :class:`CodecArray`: trailing shape, dtype, ``label`` or ``record``
  storage), which the store lays out, checksums and accounts for (``label_store.layout``);
* ``encode`` (logits -> arrays) and ``decode`` (stored arrays -> (B, C) target at T), which relabel and the
  student call through ``encode`` / ``StoredBatch.decode`` here;
* ``params``: the knobs it reads (:class:`CodecParam`), validated by ``validate`` and resolved from the
  ``quant`` config group generically (``k`` and ``temperature`` are fields of :class:`QuantConfig`, any other
  one goes to ``QuantConfig.params`` / ``quant.params.<name>``); unused knobs keep their defaults so that they
  do not split store identities;
* ``tag`` (the readable part of the store key: ``mr10``) and ``label`` (the report's name of the format).

Indices are stored as uint16 when C <= 65536 (exact for ImageNet-21K-P's 10,450 classes; the
official code uses int16 and FKD used floats, which break above 2048 classes in fp16), else uint32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lpld.core.registry import Registry

# knobs every codec may read that are fields of QuantConfig (and keys of the ``quant`` group); any other knob a
# codec declares lives in ``QuantConfig.params`` (``quant.params.<name>``)
COMMON_PARAMS = ("k", "temperature")
_COMMON_DEFAULTS = {"k": 0, "temperature": 1.0}


def index_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned dtype holding every class index exactly."""
    return np.dtype(np.uint16) if num_classes <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class CodecArray:
    """One per-row array a codec stores.

    Attributes:
        shape: trailing (per-row) shape, e.g. ``(k,)`` or ``()``.
        dtype: the dtype on disk.
        storage: ``label`` (counts as label bytes) or ``record`` (counts with the augmentation records).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    storage: str = "label"

    def __post_init__(self) -> None:
        if self.storage not in ("label", "record"):
            raise ValueError(f"CodecArray.storage must be 'label' or 'record', got {self.storage!r}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(v) for v in self.shape))


@dataclass(frozen=True)
class CodecParam:
    """One knob a codec reads.

    Attributes:
        type: int | float | str | bool; the config value is converted with it.
        default: used when the config leaves it unset (None: the config must set it; ``temperature: null``
            means the student's KD temperature, resolved by ``lpld.config.quant_settings``).
        help: what it means, for messages.
    """

    type: type = int
    default: Any = None
    help: str = ""


@dataclass(frozen=True)
class QuantConfig:
    """Label quantization: ``mode`` a registered codec, its knobs ``k`` / ``temperature`` and any other ``params``.

    ``params`` is empty for the built-in codecs, and then left out of ``to_dict`` (store identities unchanged).
    """

    mode: str = "none"
    k: int = 0
    temperature: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def codec(self) -> LabelCodec:
        return get_label_codec(self.mode)

    def param(self, name: str) -> Any:
        """The value of knob ``name`` (a field, else ``params``, else the codec's default)."""
        if name in COMMON_PARAMS:
            return getattr(self, name)
        if name in self.params:
            return self.params[name]
        decl = self.codec.params.get(name)
        if decl is None:
            raise KeyError(f"quant={self.mode} has no parameter {name!r}")
        return decl.default

    def validate(self, num_classes: int) -> None:
        """Raise ValueError (ConfigError) for an unknown mode or parameter, or a value the codec refuses."""
        codec = get_label_codec(self.mode)
        unknown = sorted(set(self.params) - set(codec.params))
        if unknown:
            valid = [n for n in codec.params if n not in COMMON_PARAMS]
            raise ValueError(
                f"quant={self.mode} has no parameter {', '.join(f'quant.params.{n}' for n in unknown)}; "
                f"its parameters are {valid or 'none'}"
            )
        if self.temperature <= 0:
            raise ValueError(f"quant.temperature must be > 0, got {self.temperature}")
        codec.validate(self, num_classes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode, "k": self.k, "temperature": self.temperature}
        if self.params:  # only when set: the built-in codecs' store identities stay as they were
            d["params"] = dict(self.params)
        return d

    @property
    def tag(self) -> str:
        """Short name used in store keys: none, mr10, ms50, hard (the codec's ``tag``)."""
        return get_label_codec(self.mode).tag(self)

    @property
    def label(self) -> str:
        """The report's name of this format (the codec's ``label``)."""
        return get_label_codec(self.mode).label(self)


# ----------------------------------------------------------------------------------------------- codecs
class LabelCodec(ABC):
    """One stored-label format: its arrays and knobs, how it encodes logits and decodes a target.

    Subclasses registered with ``@register_label_codec(name)`` are what ``quant=<name>`` selects.

    Attributes:
        params: the knobs it reads, name -> CodecParam (``k`` / ``temperature`` or its own).
        tag_params: the knobs whose values the default ``tag`` appends to the name (``mr`` + k = ``mr10``).
        keeps_logits: the stored values are logits (full or top-k), so label smoothing in logit space
            (``kd_loss.smoothing_temperature``) applies to them.
        report_kind: how the Pareto plot marks the format: ``soft`` (full logits), ``quant`` or ``hard``.
    """

    name: str = ""
    params: ClassVar[dict[str, CodecParam]] = {}
    tag_params: ClassVar[tuple[str, ...]] = ()
    keeps_logits: ClassVar[bool] = False
    report_kind: ClassVar[str] = "quant"

    @property
    def uses_k(self) -> bool:
        """The format reads ``quant.k``."""
        return "k" in self.params

    @abstractmethod
    def arrays(self, cfg: QuantConfig, num_classes: int) -> dict[str, CodecArray]:
        """Per-row arrays: name -> CodecArray (trailing shape, dtype, label / record storage)."""

    @abstractmethod
    def encode(self, z: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        """(B, C) float32 logits -> name -> tensor with leading dim B, on ``z``'s device.

        Integer arrays may be any torch integer dtype (int32 is exact for any class count); the host copy
        narrows each array to its declared dtype.
        """

    @abstractmethod
    def decode(
        self, arrays: Mapping[str, torch.Tensor], cfg: QuantConfig, temperature: float, num_classes: int
    ) -> torch.Tensor:
        """A stored batch's arrays (as ``to_tensor`` returns them) -> (B, C) float32 target probabilities at T."""

    def validate(self, cfg: QuantConfig, num_classes: int) -> None:  # noqa: B027 - optional hook, default accepts
        """Raise ValueError naming the knob and the fix for a value this format cannot store."""

    def tag(self, cfg: QuantConfig) -> str:
        """Readable part of the store key: the name followed by the ``tag_params`` values."""
        return self.name + "".join(str(cfg.param(p)) for p in self.tag_params)

    def label(self, cfg: QuantConfig) -> str:
        """The report's name of the format (the table's quant column)."""
        return self.tag(cfg)

    def to_tensor(self, name: str, rows: np.ndarray) -> torch.Tensor:
        """Rows of stored array ``name`` as read from disk -> the tensor ``decode`` gets.

        Unsigned integers wider than a byte become int64 (torch has no arithmetic on uint16 / uint32).
        """
        t = torch.from_numpy(np.array(rows))
        if rows.dtype.kind == "u" and rows.dtype.itemsize > 1:
            t = t.long()
        return t


_CODECS: Registry[LabelCodec] = Registry("label codec (quant mode)", "quant")


def register_label_codec(name: str) -> Callable[[type[LabelCodec]], type[LabelCodec]]:
    """Class decorator: register an instance of the decorated LabelCodec subclass as ``quant=<name>``."""

    def add(cls: type[LabelCodec]) -> type[LabelCodec]:
        bad = [p for p, d in cls.params.items() if not isinstance(d, CodecParam)]
        if bad:
            raise TypeError(f"label codec {name!r}: params {bad} must be CodecParam instances")
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
    report_kind = "soft"

    def arrays(self, cfg: QuantConfig, num_classes: int) -> dict[str, CodecArray]:
        return {"logits": CodecArray((num_classes,), np.dtype(np.float16))}

    def encode(self, z: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        return {"logits": z.half()}

    def decode(
        self, arrays: Mapping[str, torch.Tensor], cfg: QuantConfig, temperature: float, num_classes: int
    ) -> torch.Tensor:
        return torch.softmax(arrays["logits"].float() / temperature, dim=1)


_K = CodecParam(int, None, "classes kept per row, 1 <= k < num_classes")


class _TopK(LabelCodec):
    """Shared storage of mr / ms: the top-k values (fp16) and their class indices (abstract: ``ranked``)."""

    params: ClassVar[dict[str, CodecParam]] = {"k": _K}
    tag_params = ("k",)

    def validate(self, cfg: QuantConfig, num_classes: int) -> None:
        if int(cfg.k) < 1:
            raise ValueError(
                f"quant={self.name} keeps the top-k logits and needs 1 <= k < num_classes ({num_classes}), got "
                f"quant.k={cfg.k}; set quant.k to "
                f"a value in 1..{num_classes - 1} (e.g. quant.k={min(10, num_classes - 1)}), or quant=hard to store "
                "only the argmax class"
            )
        if int(cfg.k) >= num_classes:
            raise ValueError(
                f"quant={self.name} needs k < num_classes ({num_classes}), got quant.k={cfg.k}; set quant.k to a "
                f"value in 1..{num_classes - 1} (k >= num_classes stores no less than quant=none)"
            )

    def arrays(self, cfg: QuantConfig, num_classes: int) -> dict[str, CodecArray]:
        k = (int(cfg.k),)
        return {
            "topk_values": CodecArray(k, np.dtype(np.float16)),
            "topk_indices": CodecArray(k, index_dtype(num_classes)),
        }

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

    def decode(
        self, arrays: Mapping[str, torch.Tensor], cfg: QuantConfig, temperature: float, num_classes: int
    ) -> torch.Tensor:
        vals, ind = arrays["topk_values"].float(), arrays["topk_indices"].long()
        out = torch.zeros(vals.shape[0], num_classes, dtype=torch.float32, device=vals.device)
        return out.scatter_(1, ind, torch.softmax(vals / temperature, dim=1))


@register_label_codec("ms")
class MarginalSmoothing(_TopK):
    """MS-k: the top-k probabilities at T_g; the rest of the mass spread uniformly over the other classes."""

    params: ClassVar[dict[str, CodecParam]] = {
        "k": _K,
        "temperature": CodecParam(float, None, "T_g the stored probabilities are computed at"),
    }

    def ranked(self, z: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
        return torch.softmax(z / cfg.temperature, dim=1)

    def decode(
        self, arrays: Mapping[str, torch.Tensor], cfg: QuantConfig, temperature: float, num_classes: int
    ) -> torch.Tensor:
        vals, ind = arrays["topk_values"].float(), arrays["topk_indices"].long()
        b, k = vals.shape
        tg = float(cfg.temperature)
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

    report_kind = "hard"

    def arrays(self, cfg: QuantConfig, num_classes: int) -> dict[str, CodecArray]:
        return {"hard": CodecArray((), index_dtype(num_classes))}

    def encode(self, z: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
        return {"hard": z.argmax(dim=1).to(torch.int32)}

    def decode(
        self, arrays: Mapping[str, torch.Tensor], cfg: QuantConfig, temperature: float, num_classes: int
    ) -> torch.Tensor:
        return F.one_hot(arrays["hard"].long(), num_classes).float()


QUANT_MODES = tuple(list_label_codecs())  # the built-in modes (kept for older imports; the registry is the truth)


# ----------------------------------------------------------------------------------------------- API
def label_arrays(cfg: QuantConfig, num_classes: int) -> dict[str, CodecArray]:
    """Per-row arrays of a mode: name -> CodecArray (trailing shape, dtype, label / record storage)."""
    return get_label_codec(cfg.mode).arrays(cfg, num_classes)


def encode_tensors(logits: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """Quantize one batch of teacher logits where they are (any device, no host synchronisation).

    Args:
        logits: (B, C) float teacher logits (fp32 recommended: ranking happens before the fp16 cast;
            bf16/fp16 logits are upcast first).
        cfg: quantization config (validated against C, which is a shape, not data).

    Returns:
        name -> tensor on ``logits.device`` with leading dim B, as the codec's ``encode`` returns them (e.g.
        ``topk_indices``/``hard`` int32, exact for any class count; ``encode`` / the store writer narrow them to
        the declared dtype on the host, where the copy happens anyway).
    """
    z = logits.detach().float()
    cfg.validate(int(z.shape[1]))
    return get_label_codec(cfg.mode).encode(z, cfg)


def to_host_arrays(
    encoded: dict[str, torch.Tensor], num_classes: int, cfg: QuantConfig | None = None
) -> dict[str, np.ndarray]:
    """``encode_tensors`` output -> host numpy arrays in the store dtypes (one copy per array).

    ``cfg`` names the codec whose declared dtypes apply; without it, integer arrays are narrowed to
    ``index_dtype`` (the built-in codecs' only integer arrays are class indices).
    """
    decl = label_arrays(cfg, num_classes) if cfg is not None else {}
    out: dict[str, np.ndarray] = {}
    for name, t in encoded.items():
        a = t.cpu().numpy()
        if name in decl:
            out[name] = a.astype(decl[name].dtype, copy=False)
        else:
            out[name] = a.astype(index_dtype(num_classes)) if a.dtype.kind in "iu" else a
    return out


def encode(logits: torch.Tensor, cfg: QuantConfig) -> dict[str, np.ndarray]:
    """Quantize one batch of teacher logits for storage (host arrays; see ``encode_tensors``).

    Args:
        logits: (B, C) float teacher logits on any device (fp32 recommended: ranking happens before
            the fp16 cast). The quantization runs on that device; only the k values per row (not the
            C logits) cross to the host.
        cfg: quantization config.

    Returns:
        name -> array with leading dim B, in the dtypes of ``label_arrays``.
    """
    return to_host_arrays(encode_tensors(logits, cfg), int(logits.shape[1]), cfg)


_NAMES_CACHE: dict[tuple[str, ...], frozenset[str]] = {}


def array_names() -> frozenset[str]:
    """Names of the arrays the registered codecs store (each probed at k = 1, C = 2 with default parameters)."""
    modes = tuple(list_label_codecs())
    if modes not in _NAMES_CACHE:
        names: set[str] = set()
        for m in modes:
            codec = get_label_codec(m)
            extra = {p: d.default for p, d in codec.params.items() if p not in COMMON_PARAMS}
            try:
                names |= set(codec.arrays(QuantConfig(m, k=1, params=extra), 2))
            except Exception:  # noqa: BLE001 - a codec that needs a parameter set: its names stay unknown here
                continue
        _NAMES_CACHE[modes] = frozenset(names)
    return _NAMES_CACHE[modes]


def stored_arrays(stored: Any, cfg: QuantConfig, num_classes: int) -> dict[str, torch.Tensor]:
    """The codec arrays of a stored batch: its ``labels`` dict (a StoredBatch), else its attributes of those names."""
    labels = getattr(stored, "labels", None)
    if isinstance(labels, Mapping):
        return dict(labels)
    names = label_arrays(cfg, num_classes)
    return {n: getattr(stored, n) for n in names if getattr(stored, n, None) is not None}


def decode(
    stored: Any, mode: str, temperature: float, num_classes: int, gen_temperature: float | None = None
) -> torch.Tensor:
    """The teacher target distribution of a stored batch at temperature T.

    Args:
        stored: a StoredBatch (its ``labels`` arrays and ``quant`` config), or any object with the codec's
            arrays as attributes (and ``gen_temperature`` optionally).
        mode: the store's quant mode.
        temperature: T of the target (the student's KD temperature).
        num_classes: C.
        gen_temperature: the temperature the stored values were computed at (``ms``'s T_g); defaults to
            ``stored.gen_temperature`` / ``stored.quant.temperature`` when present, else T (no re-tempering).

    Returns:
        (B, C) float32 probabilities (rows sum to 1).
    """
    codec = get_label_codec(mode)
    cfg = getattr(stored, "quant", None)
    if not isinstance(cfg, QuantConfig) or cfg.mode != mode:
        cfg = QuantConfig(mode, temperature=float(temperature))
    tg = gen_temperature if gen_temperature is not None else getattr(stored, "gen_temperature", None)
    if tg is not None:
        cfg = replace(cfg, temperature=float(tg))
    return codec.decode(stored_arrays(stored, cfg, num_classes), cfg, temperature, num_classes)


# codecs below fp16 top-k (mrq / msq), registered after the built-ins so that QUANT_MODES keeps its four modes
import lpld.core.quant_lowbit  # noqa: E402,F401
