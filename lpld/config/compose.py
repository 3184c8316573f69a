"""Compose the config tree through Hydra (never by reading a YAML file): a step of the pipeline, or one option of
a group (``prune=1x`` for a pruning metric's source store, ``model=<arch>`` for a cross-architecture student)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
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

    try:
        if GlobalHydra.instance().is_initialized():
            return hydra_compose(config_name="config", overrides=overrides)
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except ConfigError:
        raise
    except Exception as e:
        err = explain_compose_error(e)
        if err is None:
            raise
        raise err from e


def group_option(group: str, name: str, key: str) -> Any:
    """The composed node of option ``name`` of config group ``group`` (e.g. ``prune``, ``1x``).

    Raises:
        ConfigError: the group has no such option; ``key`` (the config key that asked for it) names the fix.
    """
    from hydra.errors import MissingConfigException

    try:
        return compose([f"{group}={name}"])[group]
    except ConfigError as e:  # compose() made Hydra's error one line
        if not isinstance(e.__cause__, MissingConfigException):
            raise
        raise ConfigError(f"{key}={name!r}: {e}") from e


# ----------------------------------------------------------------------------------------------------------------------
# errors while composing: one line naming the key (and the closest valid keys or options)
# ----------------------------------------------------------------------------------------------------------------------

_FULL_ERROR = "HYDRA_FULL_ERROR"  # set while `run_main` composes, so that Hydra raises instead of printing
_set_here = False


def _chain(e: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _valid_keys(err: Any) -> tuple[list[str], str]:
    """The keys of the node an OmegaConf key error happened in, and the schema that lists them."""
    import dataclasses

    from lpld.config.schema import RECIPE_SECTIONS, recipe_keys

    parts = str(err.full_key or "").split(".")
    if len(parts) >= 4 and parts[:2] == ["dataset", "recipe"] and parts[-2] in RECIPE_SECTIONS:
        return sorted(recipe_keys(parts[-2])), "(the recipe knobs: RECIPE_SECTIONS)"
    kind = getattr(err, "object_type", None)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return [f.name for f in dataclasses.fields(kind)], f"({kind.__name__})"
    node = getattr(err, "parent_node", None)
    return ([str(k) for k in node.keys()] if hasattr(node, "keys") else []), ""


def explain_compose_error(e: BaseException) -> ConfigError | None:
    """The one-line user error for an exception raised while Hydra composes the config, else None.

    An unknown key names the closest valid keys of its node, a value of the wrong type its key and the kind it
    needs, a missing group option the closest options; any other Hydra error is its own message on one line.
    """
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    from lpld.config.schema import close_keys

    chain = _chain(e)
    if not any(isinstance(x, HydraException | OmegaConfBaseException) for x in chain):
        return None
    if any("Could not load 'hydra/launcher/submitit" in str(x) for x in chain):  # the optional launcher plugin
        return ConfigError(
            "hydra/launcher=slurm needs the SLURM launcher plugin, which is not installed; install it with "
            '`pip install -e ".[slurm]"` (hydra-submitit-launcher), then rerun the same command'
        )
    for x in chain:
        if isinstance(x, MissingConfigException) and x.options:
            group, _, name = str(x.missing_cfg_file or "").rpartition("/")
            near = close_keys(name, x.options).replace("closest valid keys", "closest options")
            return ConfigError(
                f"{group}={name}: the config group `{group}` has no option {name!r} ({near}; all: "
                f"{', '.join(x.options)})"
            )
        if isinstance(x, ConfigKeyError | ConfigAttributeError) and getattr(x, "full_key", None):
            valid, where = _valid_keys(x)
            return ConfigError(
                f"unknown config key {x.full_key} ({close_keys(str(x.full_key), valid, where)}); check the spelling"
            )
        if isinstance(x, ValidationError) and getattr(x, "full_key", None):
            key, v, msg = x.full_key, x.value, str(x.msg or x).splitlines()[0]
            if msg.endswith("to Integer"):
                hint = f", e.g. {key}={int(v)}" if isinstance(v, float) and v == v and abs(v) != float("inf") else ""
                return ConfigError(f"{key}={v!r} is not a whole number; set {key}=<integer>{hint}")
            if msg.endswith("to Float"):
                return ConfigError(f"{key}={v!r} is not a number; set {key}=<number>")
            if msg.endswith("to Boolean") or "is not a valid bool" in msg:
                return ConfigError(f"{key}={v!r} is not true/false; set {key}=true or {key}=false")
            return ConfigError(f"{key}={v!r}: {msg}")
    lines = [ln.strip() for x in chain[:2] for ln in str(x).splitlines() if ln.strip()]
    return ConfigError(" ".join(dict.fromkeys(lines)))


def run_main(main: Callable[[], Any]) -> Any:
    """Call the ``@hydra.main`` function ``main`` so that an error composing the config is one line
    ``lpld error: ...`` (exit status 1) instead of Hydra's multi-line report; ``LPLD_DEBUG=1`` or a
    ``HYDRA_FULL_ERROR`` of the user's keeps Hydra's own behaviour. The job calls :func:`composed` first."""
    global _set_here
    if os.environ.get(_FULL_ERROR) is not None or os.environ.get("LPLD_DEBUG", "0") not in ("", "0"):
        return main()
    os.environ[_FULL_ERROR], _set_here = "1", True  # Hydra raises instead of printing: the error is seen here
    try:
        return main()
    except Exception as e:  # noqa: BLE001 - sorted by explain_compose_error
        err = explain_compose_error(e) if _set_here else None
        if err is None:
            raise
        print(f"lpld error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        composed()


def composed() -> None:
    """The config is composed (first line of the job): from here on Hydra reports errors as usual."""
    global _set_here
    if _set_here:
        os.environ.pop(_FULL_ERROR, None)
        _set_here = False
