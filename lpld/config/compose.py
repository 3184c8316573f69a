"""Compose the config tree through Hydra (never by reading a YAML file): a step of the pipeline, or one option of
a group (``prune=1x`` for a pruning metric's source store, ``model=<arch>`` for a cross-architecture student)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lpld.errors import ConfigError


def config_dir() -> Path:
    """The repository's ``conf/`` (Hydra's primary config dir), used only when no Hydra context is active."""
    return Path(__file__).resolve().parents[2] / "conf"


def compose(overrides: list[str]) -> Any:
    """The root config with ``overrides``: through the active Hydra context (``@hydra.main``, a sweep, a test's
    ``initialize``), else through one initialised on :func:`config_dir` for this call."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import lpld.config  # noqa: F401 - the schemas must be registered before composing

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def group_option(group: str, name: str, key: str) -> Any:
    """The composed node of option ``name`` of config group ``group`` (e.g. ``prune``, ``1x``).

    Raises:
        ConfigError: the group has no such option; ``key`` (the config key that asked for it) names the fix.
    """
    from hydra.errors import MissingConfigException

    try:
        return compose([f"{group}={name}"])[group]
    except MissingConfigException as e:
        raise ConfigError(f"{key}={name!r}: the config group `{group}` has no option {name!r} ({e})") from e
