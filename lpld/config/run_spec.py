"""``resolve(cfg) -> RunSpec``: every resolved value a run uses, per stage, as plain python.

The spec is what W&B and the results records carry as the run's config: the values a stage actually used
after the precedence (command line > ipc_table > dataset recipe > schema default), not the raw YAML.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lpld.config.precedence import node_get
from lpld.config.recover import recover_settings
from lpld.config.relabel import quant_settings, relabel_settings
from lpld.config.squeeze import squeeze_settings
from lpld.config.stats import stats_settings
from lpld.config.student import metric_settings, student_settings

# stage -> the sections it reads (a stage is not refused for a broken knob of a section it never reads)
SECTIONS: dict[str, tuple[str, ...]] = {
    "squeeze": ("squeeze",),
    "stats": ("stats",),
    "recover": ("recover", "stats"),
    "relabel": ("recover", "relabel", "quant"),
    "student": ("recover", "relabel", "quant", "student", "metric"),
    "storage": ("relabel", "quant"),
    "plan": ("squeeze", "stats", "recover", "relabel", "quant", "student"),
    "analyze": (),
    "report": (),
    "pipeline": ("squeeze", "stats", "recover", "relabel", "quant", "student", "metric"),
}
RESOLVERS = {
    "squeeze": squeeze_settings,
    "stats": stats_settings,
    "recover": recover_settings,
    "relabel": relabel_settings,
    "quant": quant_settings,
    "student": student_settings,
    "metric": metric_settings,
}


@dataclass(frozen=True)
class RunSpec:
    """The resolved settings of one run; a section the stage does not read is None."""

    stage: str
    dataset: str
    model: str
    ipc: int
    seed: int
    squeeze: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    recover: dict[str, Any] | None = None
    relabel: dict[str, Any] | None = None
    quant: dict[str, Any] | None = None
    student: dict[str, Any] | None = None
    metric: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain python (for W&B, records and manifests)."""
        return asdict(self)


def resolve(cfg: Any, sections: tuple[str, ...] | None = None) -> RunSpec:
    """The resolved settings of the sections the run's stage reads (``sections`` overrides the stage's list).

    Raises:
        ConfigError: a knob of one of those sections is invalid (the message names the key and the fix).
    """
    stage = str(node_get(cfg.get("stage"), "name"))
    wanted = SECTIONS.get(stage, ()) if sections is None else sections
    values = {s: RESOLVERS[s](cfg) for s in wanted}
    return RunSpec(
        stage=stage,
        dataset=str(node_get(cfg.get("dataset"), "name")),
        model=str(node_get(cfg.get("model"), "name")),
        ipc=int(cfg.ipc),
        seed=int(cfg.seed),
        **values,
    )
