"""What a recover method is: its knobs (a dataclass schema), how it plans classes into device batches, and
how it makes the images of one device batch.

Everything a method needs lives in its own module of this package, which registers the method when imported
(the package imports every module it holds). The layers above call the method through the registry only:

* ``lpld.config.recover`` resolves the knobs of ``method.knobs`` by the one precedence rule
  (``lpld.config.precedence``) and hands them to :meth:`RecoverMethod.settings`, which validates them and
  returns the settings that decide the images' bytes (their identity);
* ``lpld.config.schema`` stores every method's knob dataclass in Hydra's ConfigStore as
  ``schema/recover/<method.schema>``, which ``conf/recover/<name>.yaml`` extends;
* ``lpld.stages.recover`` groups the classes with :meth:`RecoverMethod.plan`;
* ``lpld.lit.recover_module`` calls :meth:`RecoverMethod.run_batch` once per device batch with a
  :class:`BatchContext` (teacher, device, job, class-wise statistics, real train images, a progress hook).

Pure PyTorch and dataclasses: nothing here imports Lightning, Hydra or OmegaConf.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from lpld.core.recover_job import RecoverJob
from lpld.core.registry import Registry

PRECISION = "32-true"  # the trainer precision of every method today: the math is defined in fp32


# ----------------------------------------------------------------------------------------------------------------------
# knob helpers (the same field metadata as lpld.config.schema.recipe_knob: ``lpld.config.precedence`` reads it)
# ----------------------------------------------------------------------------------------------------------------------


def recipe_knob(fallback: Any, doc: str = "") -> Any:
    """A knob that is ``None`` (unset) by default: the dataset's ``recipe.recover`` value applies, else
    ``fallback``."""
    return field(
        default=None, metadata={"recipe": list(fallback) if isinstance(fallback, list) else fallback, "doc": doc}
    )


def list_knob(*values: Any) -> Any:
    """A list-valued knob with this default."""
    return field(default_factory=lambda: list(values))


def own_knobs(schema: type) -> list[str]:
    """The knobs ``schema`` adds to :class:`RecoverBase` (the base's knobs split the work and change no image, except
    the storage knobs, which ``lpld.config.recover.recover_settings`` adds to every method's settings)."""
    base = {f.name for f in dataclasses.fields(RecoverBase)}
    return [f.name for f in dataclasses.fields(schema) if f.name not in base]


@dataclass
class RecoverBase:
    """Knobs of every recover method: how the work is split (not part of the output identity) and safety."""

    name: str = "lpld"
    classes_per_batch: int | None = None  # classes per device batch (results do not depend on it); null = auto:
    max_batch_images: int = 256  # ... as many classes as fit in this many images per device batch
    class_start: int = 0  # synthesise classes [class_start, class_end)
    class_end: int | None = None  # null = num_classes
    overwrite: bool = False  # replace a folder written with another config
    allow_other_teacher: bool = False  # accept class-wise stats recorded with another teacher
    stats_path: str | None = None  # null = the stats artifact of this config
    # how the images are stored (part of their identity: lpld.config.recover.recover_settings adds them); issue 20:
    # the official recover scripts save (x * 255).astype(uint8) as JPEG at PIL's default quality 75
    image_format: str = "jpeg"  # jpeg | png (lossless; lpld before)
    quantize: str = "truncate"  # truncate (official) | round (lpld before)
    jpeg_quality: int = 75  # JPEG quality (75 = PIL's default, the official files)


# ----------------------------------------------------------------------------------------------------------------------
# what run_batch receives and returns
# ----------------------------------------------------------------------------------------------------------------------


class ClassImages(NamedTuple):
    """The images of one class, as a method returns them."""

    cls: int
    images: torch.Tensor  # (ipc, C, H, W), normalised with the dataset's mean / std
    losses: dict[str, float]  # recorded in the class's .recover.json and the manifest ("total" = progress loss)


class RealImages(Protocol):
    """The real train images of the dataset (eval transform), decoded on demand."""

    @property
    def targets(self) -> Sequence[int]:
        """Class id of every train image."""
        ...

    def load(self, groups: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """For each index group (n_g,), yield the images (n_g, C, H, W), in order."""
        ...


# (iteration t, iterations, per-segment loss tensors by name, e.g. {"loss", "ce", "bn"}); the callee decides
# when to copy them to the host (never every step)
StepHook = Callable[[int, int, Mapping[str, torch.Tensor]], None]


@dataclass
class BatchContext:
    """What a method may use to make one device batch."""

    job: RecoverJob  # ipc, seed, geometry, mean / std, resolved settings (job.settings)
    teacher: nn.Module
    device: torch.device
    real: RealImages | None = None  # built lazily by the caller: only methods that read it decode images
    class_mean: list[torch.Tensor] | None = None  # per BN layer (num_classes, C_l), when the method is classwise
    class_var: list[torch.Tensor] | None = None
    on_step: StepHook | None = None


# ----------------------------------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------------------------------


class RecoverMethod(ABC):
    """One ``recover=<name>``.

    Args:
        name: the config name (``conf/recover/<name>.yaml`` sets ``name: <name>``).
        knobs: its knob dataclass (a subclass of :class:`RecoverBase`); its defaults are the schema's.
        schema: the ConfigStore option ``schema/recover/<schema>`` the YAML extends (methods that share a
            knob dataclass share it).
        classwise: the method matches the class-wise BN statistics of stage=stats (the recover stage then
            requires them, checks them against the teacher and passes them in the context).
    """

    kind: str = ""  # how the method makes images (optimize, rded, random_real, ...): set by each subclass

    def __init__(self, name: str, knobs: type = RecoverBase, schema: str = "base", classwise: bool = False):
        if not (isinstance(knobs, type) and dataclasses.is_dataclass(knobs) and issubclass(knobs, RecoverBase)):
            raise ValueError(f"recover method {name!r}: knobs must be a dataclass extending RecoverBase")
        if not self.kind:
            raise ValueError(f"recover method {name!r}: its class must set `kind`")
        self.name, self.knobs, self.schema, self.classwise = name, knobs, schema, bool(classwise)

    def settings(self, knobs: Mapping[str, Any], num_classes: int | None) -> dict[str, Any]:
        """The resolved settings that decide the images' bytes (their identity), validated.

        Args:
            knobs: every field of ``self.knobs``, resolved (command line > ipc_table > dataset recipe for
                recipe knobs > schema default), as plain Python values; nested dataclasses as dicts.
            num_classes: classes of the dataset (None while the dataset config leaves it unset).

        The default: ``name``, ``precision`` and every knob the method's dataclass adds to RecoverBase.

        Raises:
            ConfigError: a bad value (the message names the key and the fix).
        """
        return {"name": self.name, "precision": PRECISION, **{k: knobs[k] for k in own_knobs(self.knobs)}}

    def plan(self, classes: Sequence[int], ipc: int, settings: Mapping[str, Any]) -> list[list[int]]:
        """Units: the classes whose images must be made together (a unit is never split over device batches).

        The default: one unit per class (a class's images depend on nothing else).
        """
        return [[int(c)] for c in classes]

    @abstractmethod
    def run_batch(self, ctx: BatchContext, units: list[list[int]]) -> list[ClassImages]:
        """Make the images of every class of ``units`` (one device batch); one ClassImages per class."""

    def as_dict(self) -> dict[str, Any]:
        """A plain description (``lpld.config.recover.methods``): ``{"kind": ...}``."""
        return {"kind": self.kind}


_METHODS: Registry[RecoverMethod] = Registry("recover method", "recover")


def register_recover_method(method: RecoverMethod) -> RecoverMethod:
    """Add ``method`` under ``method.name`` (raises ValueError if the name is taken)."""
    return _METHODS.register(method.name)(method)


def get_recover_method(name: str) -> RecoverMethod:
    """The method called ``name`` (raises ConfigError naming the valid methods)."""
    return _METHODS.get(name)


def list_recover_methods() -> list[str]:
    """Registered method names, in registration order."""
    return _METHODS.names()


def recover_schemas() -> dict[str, type]:
    """ConfigStore option name -> knob dataclass: ``base`` and every registered method's ``schema``."""
    out: dict[str, type] = {"base": RecoverBase}
    for name in _METHODS:
        m = _METHODS.get(name)
        if out.setdefault(m.schema, m.knobs) is not m.knobs:
            raise ValueError(f"schema/recover/{m.schema} is used by two knob dataclasses ({m.name})")
    return out


def unregister_recover_method(name: str) -> None:
    """Remove ``name`` (tests that register a method of their own clean up with this)."""
    _METHODS._entries.pop(name, None)  # noqa: SLF001 - the registry's own module family
