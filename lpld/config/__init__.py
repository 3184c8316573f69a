"""Typed, resolved configuration: the one place that turns the composed Hydra config into the values stages use.

Precedence of every knob (written once, :mod:`lpld.config.precedence`): command line (the composed group or
stage node) > dataset ``recipe.ipc_table`` entry for the run's ipc > dataset ``recipe.<section>`` > schema
default (:mod:`lpld.config.schema`, the only place defaults live; the YAML files extend the schemas).

    resolve(cfg) -> RunSpec                      every section the run's stage reads
    squeeze_settings(cfg), stats_settings(cfg), recover_settings(cfg), relabel_settings(cfg),
    quant_settings(cfg), student_settings(cfg, store_manifest=None), metric_settings(cfg)

Importing this package registers the schemas with Hydra's ConfigStore (``register_schemas``), which the
config tree needs before it is composed (run.py, the pipeline's step composition and tests import it first).
"""

from __future__ import annotations

from lpld.config.recover import methods as recover_methods
from lpld.config.recover import recover_settings
from lpld.config.relabel import quant_settings, relabel_settings
from lpld.config.run_spec import RunSpec, resolve
from lpld.config.schema import register_schemas
from lpld.config.squeeze import squeeze_settings
from lpld.config.stats import stats_mode, stats_settings
from lpld.config.student import metric_settings, student_settings

register_schemas()

__all__ = [
    "RunSpec",
    "metric_settings",
    "quant_settings",
    "recover_methods",
    "recover_settings",
    "register_schemas",
    "relabel_settings",
    "resolve",
    "squeeze_settings",
    "stats_mode",
    "stats_settings",
    "student_settings",
]
