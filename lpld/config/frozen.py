"""The frozen experiment: what every stage receives instead of Hydra's config.

``dispatch`` composes and validates the Hydra config once, then freezes it (:func:`lpld.config.experiment.freeze`)
into an :class:`Experiment`: one read-only :class:`Node` per config group (dataset, model, stage, recover, prune,
relabel, quant, metric, student, logger, trainer, paths), the top-level ``ipc`` / ``seed`` / ``teacher_seed``, and
what the launch knew (the command-line overrides, the sweep's W&B group). Interpolations (``${paths.data}``,
``${oc.env:...}``) are resolved at that moment, so every stage, every rank and every record sees the same values.

Why a frozen mapping and not the composed ``DictConfig``: a stage that could write into the config (``open_dict``,
``cfg.x = ...``) could make what runs differ from what ``stage=show`` printed and W&B logged. Each section was typed
by its schema when it was composed (a mistyped value is refused there, naming its key); the node keeps those values
and refuses any write. A run that needs another experiment (the pipeline's steps, a baseline method's images, an
ensemble member as teacher) derives a new one with :meth:`Experiment.replace` -- the original is never touched.

Resolved knob sections (command line > ipc_table > recipe > schema default) are computed once per experiment and
kept (:meth:`Experiment.memo`); the resolvers in :mod:`lpld.config` read a section through ``.get`` and attribute
access, which both :class:`Node` and :class:`Experiment` provide.

"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lpld.config.schema import GROUPS  # the config groups, in the order show prints them
from lpld.data.config import to_plain  # plain python of a frozen value, any depth


class FrozenList(list):
    """A list that refuses writes (a frozen config's list value); still a ``list`` for ``isinstance`` and JSON."""

    def _refuse(self, *_a: Any, **_k: Any) -> Any:
        raise TypeError("the experiment is frozen: derive a new one (Experiment.replace) instead of editing a list")

    append = extend = insert = remove = pop = clear = sort = reverse = _refuse  # type: ignore[assignment]
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        return (FrozenList, (list(self),))

    def __deepcopy__(self, memo: dict) -> FrozenList:
        return FrozenList(copy.deepcopy(list(self), memo))


class Node(dict):
    """One read-only config section: ``node.key``, ``node["key"]``, ``node.get("key")``, ``"key" in node``.

    A ``dict`` subclass so that plain-python consumers (JSON fingerprints, ``dict(node)``, ``{**node}``,
    ``isinstance(x, dict)``) see exactly the values; every write raises.
    """

    __slots__ = ("_path",)

    def __init__(self, data: Mapping[str, Any] | None = None, path: str = ""):
        super().__init__({str(k): freeze_value(v, f"{path}{k}.") for k, v in (data or {}).items()})
        object.__setattr__(self, "_path", path)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            where = self._path or "the experiment's "
            raise AttributeError(f"{where}{name} is not a key of this config (keys: {', '.join(self)})") from None

    def _refuse(self, *_a: Any, **_k: Any) -> Any:
        raise TypeError(
            f"the experiment is frozen ({self._path.rstrip('.') or 'top level'}): derive a new one with "
            "Experiment.replace instead of editing it"
        )

    __setattr__ = __delattr__ = __setitem__ = __delitem__ = _refuse  # type: ignore[assignment]
    update = pop = popitem = setdefault = clear = __ior__ = _refuse  # type: ignore[assignment]

    def select(self, dotted: str, default: Any = None) -> Any:
        """``node.a.b.c`` by dotted key; ``default`` when any part is missing or null."""
        return select(self, dotted, default)

    def to_dict(self) -> dict[str, Any]:
        """A plain, mutable deep copy (dicts and lists)."""
        return to_plain(self)

    def __reduce__(self) -> Any:
        return (Node, (to_plain(self), self._path))

    def __deepcopy__(self, memo: dict) -> Node:
        return Node(to_plain(self), self._path)

    def __copy__(self) -> Node:
        return self


def freeze_value(value: Any, path: str = "") -> Any:
    """``value`` with every mapping a :class:`Node` and every list a :class:`FrozenList` (recursively)."""
    if isinstance(value, Node):
        return value
    if isinstance(value, Mapping):
        return Node(value, path)
    if isinstance(value, list | tuple) and not isinstance(value, FrozenList):
        return FrozenList(freeze_value(v, f"{path}{i}.") for i, v in enumerate(value))
    return value


def select(node: Any, dotted: str, default: Any = None) -> Any:
    """``node.a.b.c`` by dotted key on any mapping; ``default`` when any part is missing or null."""
    cur = node
    for part in dotted.split("."):
        if cur is None:
            return default
        getter = getattr(cur, "get", None)
        cur = getter(part) if callable(getter) else None
    return default if cur is None else cur


@dataclass(frozen=True)
class Experiment:
    """The resolved experiment one stage runs: a frozen, typed view of the composed config.

    Sections (each a read-only :class:`Node`): ``dataset``, ``model``, ``stage``, ``recover``, ``prune``, ``relabel``,
    ``quant``, ``metric``, ``student``, ``logger``, ``trainer``, ``paths``. Scalars: ``ipc``, ``seed``,
    ``teacher_seed``, ``show``. Launch facts (not part of the experiment's identity, not printed as config):
    ``overrides`` (the command line's group / key overrides), ``sweep_group`` (``<config>-<sweep dir>`` inside a
    Hydra multirun, else None).
    """

    dataset: Node
    model: Node
    stage: Node
    recover: Node
    prune: Node
    relabel: Node
    quant: Node
    metric: Node
    student: Node
    logger: Node
    trainer: Node
    paths: Node
    ipc: int
    seed: int
    teacher_seed: int = 0
    show: bool = False
    overrides: tuple[str, ...] = ()
    sweep_group: str | None = None
    _memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], overrides: tuple[str, ...] | list[str] = (), sweep_group: str | None = None
    ) -> Experiment:
        """Freeze a plain mapping of the composed config (every group present; ``hydra`` already removed).

        Raises:
            KeyError: a group is missing (a config that did not come from ``conf/config.yaml``).
        """
        groups = {g: Node(values.get(g) or {}, f"{g}.") for g in GROUPS}
        return cls(
            **groups,
            ipc=int(values["ipc"]),
            seed=int(values["seed"]),
            teacher_seed=int(values.get("teacher_seed") or 0),
            show=bool(values.get("show") or False),
            overrides=tuple(str(o) for o in overrides),
            sweep_group=sweep_group,
        )

    # --- mapping-like reads (the resolvers' node_get, ``exp.get("logger")``, ``"x" in exp``) -----------------

    def get(self, key: str, default: Any = None) -> Any:
        if key in GROUPS or key in ("ipc", "seed", "teacher_seed", "show"):
            v = getattr(self, key)
            return default if v is None else v
        return default

    def __contains__(self, key: object) -> bool:
        return key in GROUPS or key in ("ipc", "seed", "teacher_seed", "show")

    def __iter__(self) -> Iterator[str]:
        yield from self.keys()

    def keys(self) -> list[str]:
        return [*GROUPS, "ipc", "seed", "teacher_seed", "show"]

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def select(self, dotted: str, default: Any = None) -> Any:
        """``exp.a.b.c`` by dotted key; ``default`` when any part is missing or null."""
        return select(self, dotted, default)

    def to_dict(self) -> dict[str, Any]:
        """The experiment's config as plain python (groups and scalars; the launch facts are not part of it)."""
        return {k: to_plain(getattr(self, k)) for k in self.keys()}

    # --- deriving another experiment ---------------------------------------------------------------------------

    def replace(self, **changes: Any) -> Experiment:
        """A new experiment with whole sections or scalars replaced (mappings are frozen); ``self`` is unchanged.

        Example: ``exp.replace(recover=other_method_node)``; ``exp.replace(model={**exp.model, **entry})``.
        """
        frozen = {k: (Node(v, f"{k}.") if k in GROUPS else v) for k, v in changes.items()}
        return dataclasses.replace(self, **frozen, _memo={})

    def with_values(self, dotted: dict[str, Any]) -> Experiment:
        """A new experiment with single knobs replaced by dotted key (``{"stage.name": "relabel"}``)."""
        sections: dict[str, dict[str, Any]] = {}
        scalars: dict[str, Any] = {}
        for key, value in dotted.items():
            head, _, rest = key.partition(".")
            if not rest:
                scalars[head] = value
                continue
            node = sections.setdefault(head, to_plain(getattr(self, head)))
            *parents, last = rest.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        return self.replace(**sections, **scalars)

    # --- values computed once ----------------------------------------------------------------------------------

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for, the same object afterwards (the experiment is frozen,
        so what is derived from it cannot change). Callers that may edit the result copy it."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def __reduce__(self) -> Any:  # pickled for spawned ranks: the memo is recomputed there
        return (_rebuild, (self.to_dict(), self.overrides, self.sweep_group))


def _rebuild(values: dict[str, Any], overrides: tuple[str, ...], sweep_group: str | None) -> Experiment:
    return Experiment.from_mapping(values, overrides, sweep_group)


def memoized(section: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a resolver ``f(cfg, *args) -> dict``: on an :class:`Experiment` the value is computed once per
    argument value (JSON of the arguments) and each caller gets its own deep copy; on anything else (a plain mapping
    in a test) it is computed each time."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        import functools

        @functools.wraps(fn)
        def inner(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(cfg, Experiment):
                return fn(cfg, *args, **kwargs)
            key = f"resolved.{section}"
            if args or kwargs:  # e.g. the student's settings for one store manifest: one value per argument
                import hashlib
                import json

                blob = json.dumps([args, kwargs], sort_keys=True, default=str).encode()
                key += "." + hashlib.sha256(blob).hexdigest()[:16]
            return copy.deepcopy(cfg.memo(key, lambda: fn(cfg, *args, **kwargs)))

        return inner

    return wrap


def once(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of a pure function of the experiment alone (``f(exp)``: an artifact's spec, key or path): computed
    once per experiment, then read from its memo (a dict or list result is copied for each caller). Called with
    anything else, or with more arguments, it simply runs. Why: the artifact specs are asked for by every module
    that names an artifact; deriving them again each time made the experiment re-enter the same modules dozens of
    times per stage (issue 18)."""
    import functools

    key = f"once.{fn.__module__}.{fn.__qualname__}"

    @functools.wraps(fn)
    def inner(exp: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(exp, Experiment) or args or kwargs:
            return fn(exp, *args, **kwargs)
        value = exp.memo(key, lambda: fn(exp))
        return copy.deepcopy(value) if isinstance(value, dict | list) else value

    return inner
