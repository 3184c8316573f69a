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

from lpld.config.frozen import Experiment
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


def sweep_group() -> str | None:
    """``<config name>-<sweep dir name>`` inside a Hydra multirun job, else None (W&B groups a sweep's jobs)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not launched through @hydra.main (compose API, tests)
        return None
    if hc.mode == RunMode.MULTIRUN:
        from pathlib import Path

        return f"{hc.job.config_name}-{Path(str(hc.sweep.dir)).name}"
    return None


def freeze(cfg: DictConfig | Experiment, overrides: list[str] | None = None) -> Experiment:
    """The frozen :class:`~lpld.config.frozen.Experiment` of a composed config: interpolations resolved now, every
    group a read-only node, plus the launch facts (``overrides``: this job's command line unless given; the
    sweep's W&B group). An Experiment is returned as is.

    Raises:
        InterpolationResolutionError: an interpolation cannot be resolved (dispatch reports it as one line).
    """
    if isinstance(cfg, Experiment):
        return cfg
    # a value left unset ("???", e.g. imagefolder's num_classes, read from the class folders later) becomes None:
    # what the resolvers' node_get saw before, and what a stage checks for
    values: dict[str, Any] = _unset_to_none(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    values.pop("hydra", None)
    return Experiment.from_mapping(values, task_overrides() if overrides is None else overrides, sweep_group())


def _unset_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unset_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unset_to_none(v) for v in value]
    return None if value == "???" else value


def experiment_of(cfg: DictConfig) -> Experiment:
    """Validate the composed config once (an unknown key anywhere, a value the nodes cannot type: one line naming
    it) and freeze it: what dispatch hands every stage."""
    from lpld.config.schema import check_known_keys

    check_known_keys(cfg)
    return freeze(cfg)


def compose_experiment(overrides: list[str]) -> Experiment:
    """Compose ``conf/config.yaml`` with ``overrides`` (through the active Hydra context, else one on the repo's
    config), validate and freeze it, with ``overrides`` as its command line (the pipeline's steps)."""
    from lpld.config.compose import compose
    from lpld.config.schema import check_known_keys

    cfg = compose(overrides)
    check_known_keys(cfg)
    return freeze(cfg, overrides)


def with_group(exp: Experiment, group: str, option: str, key: str) -> Experiment:
    """``exp`` with option ``option`` of config group ``group`` in place of its own (what the command line
    ``<group>=<option>`` composes for that group; the other sections are kept). ``key`` names the config key that
    asked for it in the error when the group has no such option."""
    from lpld.config.compose import group_option

    node = group_option(group, option, key)
    return exp.replace(**{group: OmegaConf.to_container(node, resolve=True)})


def experiment_config(cfg: DictConfig | Experiment, store_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved experiment of ``cfg`` as plain python.

    Args:
        cfg: the experiment of one stage run (a composed config is frozen first).
        store_manifest: the opened label store's manifest (the student stage), whose schedule fills the
            student knobs left to the store (epochs, batch size); None elsewhere.

    Returns:
        ``{<group>: {...}, ipc, seed, teacher_seed, <resolved sections>, overrides: [...]}``.

    Raises:
        ConfigError: a knob of a section the stage reads is invalid (the stage refuses it with the same message).
    """
    exp = freeze(cfg)
    out = exp.to_dict()
    out.pop("show", None)  # describing a run is not part of the experiment
    spec = resolve(exp).to_dict()
    if store_manifest is not None and spec.get("student") is not None:
        spec["student"] = student_settings(exp, store_manifest)
    for name in _GROUP_SECTIONS:
        values = spec.get(name)
        if values is not None:
            out[name] = {**(out.get(name) or {}), **values}
    for name in _STAGE_SECTIONS:  # the teacher's schedule, the stats pass: sections of their own beside `stage`
        if spec.get(name) is not None:
            out[name] = spec[name]
    out["overrides"] = list(exp.overrides)
    return out


def experiment_yaml(cfg: DictConfig | Experiment, store_manifest: dict[str, Any] | None = None) -> str:
    """:func:`experiment_config` as YAML (what ``stage=show`` prints)."""
    return config_yaml(experiment_config(cfg, store_manifest))


def config_yaml(values: dict[str, Any]) -> str:
    """A plain mapping as the YAML Hydra prints a config in (key order kept)."""
    return OmegaConf.to_yaml(OmegaConf.create(values)).rstrip()
