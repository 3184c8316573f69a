"""Registry of recover methods: how each ``recover=<name>`` makes its distilled images.

A method is one of three kinds:

* ``optimize``: images synthesised from noise by matching BN statistics (``lpld.core.synthesis``), with
  ``batching`` ``class`` (each class optimised on its own) or ``slot`` (``group_classes`` classes share one
  batch, SRe2L-style) and ``classwise`` True when the BN targets are the class-wise statistics (LPLD Eq. 3)
  rather than the global running statistics.
* ``rded``: RDED's selection of real-image crops scored by the teacher (``lpld.core.rded``).
* ``random_real``: randomly chosen real train images (baseline).

Adding a method of an existing kind is one ``register_recover_method(RecoverMethod(...))`` line here (plus
its ``conf/recover/<name>.yaml``); a new kind also needs its generator in ``lpld.lit.recover_module``.
"""

from __future__ import annotations

from dataclasses import dataclass

from lpld.core.registry import Registry

KINDS = ("optimize", "rded", "random_real")
BATCHINGS = ("class", "slot")


@dataclass(frozen=True)
class RecoverMethod:
    """One recover method: its ``kind`` and, for ``optimize``, how classes share batches and BN targets."""

    name: str
    kind: str
    batching: str | None = None
    classwise: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"recover method kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "optimize") != (self.batching in BATCHINGS):
            raise ValueError(f"an optimize method needs batching in {BATCHINGS}; other kinds none ({self.name})")

    def as_dict(self) -> dict[str, object]:
        """``{"kind", "batching", "classwise"}`` as the recover stage's table used them (optimize only)."""
        if self.kind != "optimize":
            return {"kind": self.kind}
        return {"kind": self.kind, "batching": self.batching, "classwise": self.classwise}


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


register_recover_method(RecoverMethod("lpld", "optimize", batching="class", classwise=True))
register_recover_method(RecoverMethod("lpld_c", "optimize", batching="class", classwise=False))
register_recover_method(RecoverMethod("sre2l", "optimize", batching="slot", classwise=False))
register_recover_method(RecoverMethod("cda", "optimize", batching="slot", classwise=False))
register_recover_method(RecoverMethod("rded", "rded"))
register_recover_method(RecoverMethod("random_real", "random_real"))
