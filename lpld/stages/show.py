"""Stage ``show``: what a command would run, before running it.

    python run.py stage=show stage.of=recover dataset=in1k ipc=50      # the recover of that command
    python run.py stage=show                                            # the default job (the pipeline)
    python run.py stage=squeeze stage.epochs=5 show=true                # any command + show=true: that command

Prints the resolved experiment (:func:`lpld.config.experiment.experiment_config`, the same mapping W&B logs and
results records carry) as YAML, then every artifact the stage would read or write: its key, path and status
(complete / incomplete / missing); for one that is not there, the closest existing artifact of that kind and
the values that differ (:mod:`lpld.artifacts.catalog`). Nothing is written.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lpld.artifacts import catalog
from lpld.artifacts.base import dataset_name, root
from lpld.config.experiment import config_yaml, experiment_config, with_group
from lpld.config.frozen import Experiment
from lpld.errors import ConfigError

log = logging.getLogger("lpld")

_NOT_SHOWN = ("show", "artifacts")


def _is_stage_override(o: str) -> bool:
    key = o.split("=", 1)[0].lstrip("+~")
    return key == "stage" or key.startswith("stage.")


def target_overrides(exp: Experiment, of: str | None) -> list[str]:
    """The command line of the shown run. ``show=true``: this one's overrides without it; ``stage=show``: with
    ``stage=show`` replaced in place by ``stage=X`` and ``stage.of`` dropped (the order a user would type)."""
    out: list[str] = []
    for o in exp.overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "show":
            continue
        if of is not None and key == "stage":
            out.append(f"stage={of}")
        elif of is None or not key.startswith("stage."):
            out.append(o)
    if of is not None and f"stage={of}" not in out:
        out.append(f"stage={of}")
    return out


def target_config(exp: Experiment) -> Experiment:
    """``exp`` with the stage node of ``stage.of`` in place of show's own node."""
    from lpld.stages import STAGES

    of = str(exp.stage.of)
    if of not in STAGES or of in _NOT_SHOWN:
        valid = ", ".join(s for s in STAGES if s not in _NOT_SHOWN)
        raise ConfigError(f"stage.of={of!r} is not a stage show can describe; choose one of: {valid}")
    return with_group(exp, "stage", of, "stage.of")


def _store_manifest(target: Experiment, refs: list[catalog.ArtifactRef]) -> dict[str, Any] | None:
    if str(target.stage.name) != "student":
        return None
    store = next((r for r in refs if r.kind == "labels"), None)
    if store is None or store.status != "complete":
        return None
    return json.loads((store.path / "manifest.json").read_text())


def pipeline_refs(target: Experiment) -> list[catalog.ArtifactRef]:
    """Every artifact of the pipeline's steps: writes, and reads no earlier step writes (inputs from outside)."""
    from lpld.stages.pipeline import Pipeline, compose_step

    pipe = Pipeline(target, base=[o for o in target.overrides if not _is_stage_override(o)])
    written: dict[str, catalog.ArtifactRef] = {}
    reads: dict[str, catalog.ArtifactRef] = {}
    for name, choices, _label in pipe.plan():
        if name == "report":
            continue
        sub = compose_step(pipe.base, [f"stage={name}", *choices, *pipe.steps.get(name, [])])
        for r in catalog.planned(sub):
            p = str(r.path)
            if r.role == "write":
                written.setdefault(p, r)
            elif p not in written:
                reads.setdefault(p, r)
    return [*reads.values(), *written.values()]


def describe(target: Experiment, refs: list[catalog.ArtifactRef]) -> list[str]:
    """Comment lines: one block per artifact, with the closest existing one when it is not complete."""
    art, ds = root(target), dataset_name(target)
    lines = [f"# artifacts under {art} (role kind status key / path)"]
    for r in refs:
        lines += [f"#   {line}" for line in r.line().splitlines()]
        if r.status not in ("complete", "pretrained"):
            m = catalog.closest(r, art, ds)
            if m is not None:
                lines.append(f"#   {'':24s}{m.describe(r.kind)}")
    if len(refs) == 0:
        lines.append("#   (none)")
    return lines


def show(target: Experiment, overrides: list[str]) -> dict[str, Any]:
    """Print the experiment of ``target`` (a composed stage config) and its artifacts; return both."""
    of = str(target.stage.name)
    refs = pipeline_refs(target) if of == "pipeline" else catalog.planned(target)
    exp = experiment_config(target, _store_manifest(target, refs))
    exp["overrides"] = overrides
    print(f"# lpld show: stage={of} (what `python run.py {' '.join(overrides)}` would run; nothing is run)")
    print(config_yaml(exp))
    print("\n".join(describe(target, refs)))
    return {"config": exp, "artifacts": [(r.role, r.kind, r.key, str(r.path), r.status) for r in refs]}


def run(exp: Experiment) -> dict[str, Any]:
    """``stage=show``: the stage ``stage.of`` of this command line."""
    return show(target_config(exp), target_overrides(exp, str(exp.stage.of)))
