"""The one precedence rule of every knob, written once.

    command line (the composed group / stage node) > dataset ``recipe.ipc_table`` entry for the run's ipc
    > dataset ``recipe.<section>`` > schema default (``lpld.config.schema``)

Only ``None`` means unset: ``0``, ``false`` and ``[]`` set on the command line win over the recipe.
"""

from __future__ import annotations

from typing import Any

from lpld.config.schema import fallback


def node_get(node: Any, key: str) -> Any:
    """``node.<key>``, or None when the node is missing, lacks the key or holds null."""
    if node is None:
        return None
    try:
        return node.get(key) if hasattr(node, "get") else None
    except Exception:  # noqa: BLE001 - a structured node of another schema without this key
        return None


def dataset_recipe(cfg: Any, section: str) -> dict[str, Any]:
    """The dataset's ``recipe.<section>`` with its ``ipc_table`` entry for ``cfg.ipc`` merged over it."""
    return section_recipe(cfg.dataset, cfg.get("ipc"), section)


def section_recipe(dataset: Any, ipc: Any, section: str) -> dict[str, Any]:
    """``recipe.<section>`` of the dataset node with its ``ipc_table`` entry for ``ipc`` merged over it (what the
    resolvers call: they hand down the dataset section, not the whole experiment)."""
    from lpld.data.recipe import recipe

    return recipe(dataset, section, ipc=None if ipc is None else int(ipc))


class Knobs:
    """Resolves the knobs of one config node against one recipe section and one schema.

    Example: ``Knobs(cfg.recover, dataset_recipe(cfg, "recover"), RecoverOptimize).get("lr")``.
    """

    def __init__(self, node: Any, recipe: dict[str, Any] | None, schema: type):
        self.node, self.recipe, self.schema = node, recipe or {}, schema

    def get(self, key: str) -> Any:
        """The knob's value by the precedence above (never reads the recipe for a key the node sets)."""
        v = node_get(self.node, key)
        if v is not None:
            return v
        v = self.recipe.get(key)
        if v is not None:
            return v
        return fallback(self.schema, key)

    def plain(self, key: str) -> Any:
        """``get`` as plain python (lists and dicts of a config node converted)."""
        from lpld.data.config import to_plain

        return to_plain(self.get(key))
