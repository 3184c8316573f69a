"""What a student run is made of, from the config alone: its architecture, the config whose label store it reads,
and the world size it trains at. Shared by the student stage, ``stage=show`` and the artifact catalog."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from lpld.config.compose import group_option
from lpld.config.frozen import Experiment, once
from lpld.config.student import metric_settings


def _plain(node: Any) -> Any:
    from lpld.config.frozen import to_plain

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else to_plain(node)


def student_model_cfg(cfg: Experiment) -> dict[str, Any]:
    """Student architecture: ``student.arch`` (+ ``arch_knobs``), or the teacher's architecture.

    Never inherits the teacher's weights (pretrained/checkpoint/tag are dropped): a fresh student.
    """
    teacher = _plain(cfg.model)
    arch = cfg.student.get("arch")
    knobs = dict(_plain(cfg.student.get("arch_knobs") or {}))
    if arch is None or str(arch) == str(teacher["name"]):
        base = {k: v for k, v in teacher.items() if k not in ("pretrained", "checkpoint", "tag")}
    else:  # the architecture's default knobs from its model config (the `model` group option of that name)
        base = _arch_config(str(arch))
    base.update(knobs)
    base["pretrained"] = False
    return base


def _arch_config(arch: str) -> dict[str, Any]:
    """The model config of ``student.arch``: the registry's own option (``conf/model/<arch>.yaml``) first, else any
    timm model name (``{name: timm, arch: <name>}``, lpld.models.timm_models).

    Raises:
        ConfigError: neither a model option nor a timm model name (the message lists both sources).
    """
    from lpld.errors import ConfigError

    try:
        arch_cfg = _plain(group_option("model", arch, "student.arch"))
    except ConfigError:
        from lpld.models.timm_models import is_timm_model

        if not is_timm_model(arch):
            from lpld.models import model_names

            raise ConfigError(
                f"student.arch={arch!r} is neither a model of this project ({', '.join(model_names())}) nor a timm "
                "model name (timm.list_models()); e.g. student.arch=resnet18 or student.arch=convnext_atto"
            ) from None
        return {"name": "timm", "arch": arch}
    return {k: v for k, v in arch_cfg.items() if k not in ("pretrained", "checkpoint", "tag")}


def with_prune(exp: Experiment, prune_name: str) -> Experiment:
    """``exp`` with the ``prune`` group's option ``prune=<prune_name>`` (composed by Hydra)."""
    from lpld.config.experiment import with_group

    return with_group(exp, "prune", prune_name, "metric.source_prune")


def store_config(cfg: Experiment) -> Experiment:
    """The config whose label store the student reads: ``cfg`` itself (random pruning reads the store generated
    at the target ratio), or ``cfg`` at ``metric.source_prune`` (a pruning metric selects from that store)."""
    m = metric_settings(cfg)
    return with_prune(cfg, m["source_prune"]) if m["name"] != "random" else cfg


@once
def world_size(cfg: Experiment) -> int:
    """Processes the trainer preset will run (devices x nodes; devices=-1 means every visible GPU); once per
    experiment (the student's record, run key and BatchNorm layout all ask)."""
    from lpld.dist import planned_world_size

    return planned_world_size(cfg)
