"""The experiment as it runs: one plain mapping that ``stage=show`` prints, W&B logs and results records carry.

``experiment_config(cfg)`` is the composed config (every group, as plain python, without Hydra's own node)
with each knob section replaced by its *resolved* values (:func:`lpld.config.resolve`: command line >
``ipc_table`` > dataset recipe > schema default), so ``recover.iterations`` reads 4000 where the YAML says
``null``, plus the command-line overrides that produced it. One function, three readers: what a run prints
before it starts, what W&B shows and what the results file stores cannot drift apart (tested equal in
``tests/test_show.py``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lpld.config.run_spec import resolve
from lpld.config.student import student_settings

# resolved sections that are config groups of their own: their resolved values replace the group's raw values
_GROUP_SECTIONS = ("recover", "relabel", "quant", "student", "metric")
# resolved sections of a stage node (squeeze's schedule, the stats pass), kept as top-level sections of their own
_STAGE_SECTIONS = ("squeeze", "stats")


def task_overrides() -> list[str]:
    """The command-line overrides of this Hydra job ([] outside ``@hydra.main``: compose API, tests)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


def experiment_config(cfg: DictConfig, store_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved experiment of ``cfg`` as plain python.

    Args:
        cfg: the composed config of one stage run.
        store_manifest: the opened label store's manifest (the student stage), whose schedule fills the
            student knobs left to the store (epochs, batch size); None elsewhere.

    Returns:
        ``{<group>: {...}, ipc, seed, teacher_seed, <resolved sections>, overrides: [...]}``.

    Raises:
        ConfigError: a knob of a section the stage reads is invalid (the stage refuses it with the same message).
    """
    out: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    out.pop("hydra", None)
    out.pop("show", None)  # describing a run is not part of the experiment
    spec = resolve(cfg).to_dict()
    if store_manifest is not None and spec.get("student") is not None:
        spec["student"] = student_settings(cfg, store_manifest)
    for name in _GROUP_SECTIONS:
        values = spec.get(name)
        if values is not None:
            out[name] = {**(out.get(name) or {}), **values}
    for name in _STAGE_SECTIONS:  # the teacher's schedule, the stats pass: sections of their own beside `stage`
        if spec.get(name) is not None:
            out[name] = spec[name]
    out["overrides"] = task_overrides()
    return out


def experiment_yaml(cfg: DictConfig, store_manifest: dict[str, Any] | None = None) -> str:
    """:func:`experiment_config` as YAML (what ``stage=show`` prints)."""
    return OmegaConf.to_yaml(OmegaConf.create(experiment_config(cfg, store_manifest)))
