"""Issue 18: one frozen experiment flows through every stage; nothing below dispatch reads Hydra's config.

- statically (AST): no module of ``lpld`` outside the config layer (``lpld/config``, which composes, validates and
  freezes) and dispatch (``lpld/stages/__init__.py``; ``lpld/stages/callbacks.py`` is Hydra's own callback, run by
  Hydra around the jobs) imports Hydra or OmegaConf or names ``DictConfig``;
- at run time: a student run through dispatch, with every read of a ``DictConfig`` from an lpld module outside the
  config layer recorded, records none;
- the experiment is frozen (every write raises) and derived experiments leave the original untouched;
- following the experiment through the student stage (:mod:`spec_trace`): each module re-entered at most twice, no
  climb back up a layer.
"""

from __future__ import annotations

import ast
import pickle
import sys
from pathlib import Path

import pytest
from conftest import compose_cfg, make_tiny_chain
from spec_trace import follow

from lpld.config.frozen import Experiment

LPLD = Path(__file__).resolve().parents[1] / "lpld"
# the layer that composes, validates and freezes the config, and dispatch itself
ALLOWED = ("config/", "stages/__init__.py", "stages/callbacks.py")
HYDRA_NAMES = {"DictConfig", "ListConfig", "OmegaConf", "open_dict", "HydraConfig"}


def _hydra_uses(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        mods += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        out += [f"imports {m}" for m in mods if m.split(".")[0] in ("omegaconf", "hydra")]
        if isinstance(node, ast.Name) and node.id in HYDRA_NAMES:
            out.append(f"names {node.id}")
        if isinstance(node, ast.Attribute) and node.attr in HYDRA_NAMES:
            out.append(f"names .{node.attr}")
    return out


def test_no_module_below_dispatch_imports_or_names_the_hydra_config():
    bad = {}
    for p in sorted(LPLD.rglob("*.py")):
        rel = p.relative_to(LPLD).as_posix()
        if rel.startswith(ALLOWED[0]) or rel in ALLOWED[1:]:
            continue
        uses = _hydra_uses(p)
        if uses:
            bad[rel] = sorted(set(uses))
    assert not bad, bad


def test_every_stage_entry_point_takes_the_experiment():
    """``run(exp: Experiment)`` in every stage module (the annotation, so a reader knows what flows down)."""
    from lpld.stages import STAGES

    for name in STAGES:
        tree = ast.parse((LPLD / "stages" / f"{name}.py").read_text())
        run = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
        ann = ast.unparse(run.args.args[0].annotation) if run.args.args[0].annotation else None
        assert ann == "Experiment", (name, ann)


def test_the_experiment_is_frozen_and_derivations_leave_it_untouched(tmp_path):
    exp = compose_cfg(["stage=relabel", f"paths.root={tmp_path}", "logger=none"])
    assert isinstance(exp, Experiment)
    for write in (
        lambda: setattr(exp, "ipc", 3),
        lambda: exp.recover.__setitem__("iterations", 3),
        lambda: setattr(exp.recover, "iterations", 3),
        lambda: exp.dataset.mean.append(0.5),
        lambda: exp.stage.update({"name": "x"}),
    ):
        with pytest.raises((TypeError, AttributeError)):
            write()
    other = exp.with_values({"recover.iterations": 7, "ipc": 2})
    assert other.recover.iterations == 7 and other.ipc == 2
    assert exp.recover.get("iterations") is None and exp.ipc == 10  # the original is unchanged
    # what spawned ranks receive: the same values, launch facts included
    back = pickle.loads(pickle.dumps(exp))
    assert back.to_dict() == exp.to_dict() and back.overrides == exp.overrides


def test_resolved_sections_are_computed_once_per_experiment(tmp_path):
    from lpld.config import recover_settings

    exp = compose_cfg(["stage=recover", f"paths.root={tmp_path}", "logger=none"])
    a, b = recover_settings(exp), recover_settings(exp)
    assert a == b and a is not b  # each caller its own copy of the one value
    assert exp.memo("resolved.recover", lambda: pytest.fail("recomputed")) == a


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return make_tiny_chain(tmp_path_factory.mktemp("flow"))


def test_no_dictconfig_is_read_below_dispatch_while_a_student_runs(chain, monkeypatch):
    """Every DictConfig read during a student run, with the lpld module that asked; only the config layer may."""
    from omegaconf import DictConfig

    from lpld.stages import run_stage

    tmp, ov = chain
    readers: list[str] = []

    def spy(name):
        orig = getattr(DictConfig, name)

        def wrapped(self, *a, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("lpld.") and not caller.startswith("lpld.config") and caller != "lpld.stages":
                readers.append(f"{caller}: DictConfig.{name}")
            return orig(self, *a, **k)

        monkeypatch.setattr(DictConfig, name, wrapped)

    for name in ("__getattr__", "__getitem__", "get", "__contains__", "items", "keys"):
        spy(name)
    run_stage(compose_cfg(["stage=student", *ov, "stage.results_name=flow"], raw=True))
    assert not readers, sorted(set(readers))


def test_following_the_experiment_through_the_student_stage(chain, capsys):
    """The issue's measure on main fd1c9f1 was 83 stops in 21 modules, 62 re-entries, 25 climbs."""
    from lpld.stages import student

    tmp, ov = chain
    exp = compose_cfg(["stage=student", *ov, "stage.results_name=flow_trace"])
    _out, trace = follow(exp, student.run, exp)
    re = trace.reentries()
    summary = f"{len(trace.stops)} stops in {len(set(trace.modules()))} modules, re-entries {dict(re)}"
    print(summary)
    assert not trace.climbs(), trace.climbs()
    assert max(re.values(), default=0) <= 2, summary


def test_no_inline_default_below_dispatch_shadows_the_schema():
    """Defaults live in the schema only: a stage reads a knob of the experiment by its key (every schema key is in
    the frozen node), never ``.get(key, <its own default>)``, which could contradict the schema (issue 18 found
    report's ``scale`` read with 1.0 while the schema says 100.0)."""
    import re

    pat = re.compile(r"\b(exp\.[a-z]+|inp\.stage)\.get\(\"\w+\", ")
    bad = []
    for sub in ("stages", "artifacts", "lit"):
        for p in sorted((LPLD / sub).rglob("*.py")):
            bad += [
                f"{p.relative_to(LPLD)}:{i}" for i, ln in enumerate(p.read_text().splitlines(), 1) if pat.search(ln)
            ]
    assert not bad, bad
