"""A name -> object registry in the style of timm's ``register_model`` / ``create_model``.

Each extensible family (recover methods, label codecs, student losses, pruning metrics) keeps one
:class:`Registry` and exposes three module functions around it: ``register_x`` (a decorator),
``get_x(name)`` and ``list_x()``. Adding an entry is then one decorated function or class in one file;
an unknown name raises :class:`~lpld.core.errors.ConfigError` naming the config key and every valid
choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from lpld.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one family, in registration order.

    Args:
        what: what an entry is, for messages ("label codec").
        key: the config key that selects an entry, for messages ("quant").
    """

    def __init__(self, what: str, key: str):
        self.what, self.key = what, key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@reg.register("name")`` adds the decorated object under ``name``.

        Raises:
            ValueError: ``name`` is already registered (two entries would silently shadow each other).
        """

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The entry called ``name``.

        Raises:
            ConfigError: unknown name; the message lists the valid ones.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.what} {name!r}; choose {self.key}=<{'|'.join(self._entries)}>") from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
