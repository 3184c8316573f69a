"""Stage ``pipeline``: squeeze -> stats -> recover -> relabel -> student over a grid, then report.

Each step is composed exactly as if typed on the command line: the run's own overrides
(``HydraConfig``'s task overrides: dataset, model, ipc, seed, group knobs ...) plus the step's
``stage=<name>`` and grid choices (``recover=...``, ``prune=...``) plus ``stage.steps.<name>``.
So a knob set once for the pipeline (``recover.iterations=100``) reaches every step that reads
it, and each step finds the artifacts of the previous ones at their deterministic paths.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from lpld.artifacts import results as results_artifact
from lpld.config.frozen import Experiment
from lpld.errors import ConfigError
from lpld.stages import run_stage
from lpld.stages.common import pipeline_group

log = logging.getLogger("lpld")


def _task_overrides(exp: Experiment) -> list[str]:
    """The overrides this run was launched with (recorded in the experiment), minus the ones that only concern the
    pipeline."""
    return [
        o
        for o in exp.overrides
        if not (o.split("=")[0].lstrip("+~") in ("stage",) or o.lstrip("+~").startswith("stage."))
    ]


def compose_step(base_overrides: list[str], step: list[str]) -> Experiment:
    """The frozen experiment of one step: the config composed from the run's overrides plus the step's (through the
    active Hydra context, else one on the repo's config), validated and frozen (:mod:`lpld.config.experiment`)."""
    from lpld.config.experiment import compose_experiment

    return compose_experiment(base_overrides + step)


class Pipeline:
    """Runs the steps in order, timing each, and collects the student results."""

    def __init__(self, exp: Experiment, base: list[str] | None = None):
        self.exp = exp
        st = exp.stage
        self.base = list(base if base is not None else _task_overrides(exp))
        self.steps = {k: list(v) for k, v in (st.get("steps") or {}).items()}
        self.results_name = results_artifact.pipeline_name(exp)
        self.timings: list[tuple[str, float]] = []
        if exp.get("logger") is not None and "group" in exp.logger and not exp.logger.group:
            self.base.append(f"logger.group={pipeline_group(exp, self.results_name)}")  # W&B: one per invocation
        self.methods, self.baselines, self.prunes, self.baseline_prunes = self._grid_axes(exp)
        for name, over in self.steps.items():
            bad = [o for o in over if o.lstrip("+~").startswith("relabel.")]
            if bad:  # the student finds the store from the same knobs: they must reach every step
                raise ConfigError(
                    f"stage.steps.{name} sets {bad}: relabel knobs decide which label store the student reads, so "
                    f"set them for the whole pipeline instead (e.g. `python run.py {' '.join(bad)}`)"
                )

    def step(self, name: str, choices: list[str], label: str) -> Any:
        sub = compose_step(self.base, [f"stage={name}", *choices, *self.steps.get(name, [])])
        log.info("[pipeline] %s", label)
        t0 = time.perf_counter()
        out = run_stage(sub)
        self.timings.append((label, time.perf_counter() - t0))
        return out

    def _grid_axes(self, exp: Experiment) -> tuple[list[str], list[str], list[str], list[str]]:
        """(methods, baselines, prunes, baseline prunes) of the grid: ``stage.*``, unless the command line chose the
        group itself. ``python run.py prune=10x`` (or a multirun ``-m prune=1x,10x,40x``) means that ratio: the grid
        runs every method at it alone; ``recover=sre2l`` means that method alone (no baselines). Without this the
        step's own choice would silently win over the command line's (issue 19)."""
        st = exp.stage
        chosen: dict[str, str] = {}
        for o in self.base:
            key, _, value = o.partition("=")
            if key.lstrip("+~") in ("prune", "recover") and value:
                chosen[key.lstrip("+~")] = value
        methods = [chosen["recover"]] if "recover" in chosen else [str(m) for m in st.methods]
        baselines = [] if "recover" in chosen else [str(m) for m in st.baselines]
        prunes = [chosen["prune"]] if "prune" in chosen else [str(p) for p in st.prunes]
        baseline_prunes = [chosen["prune"]] if "prune" in chosen else [str(p) for p in st.baseline_prunes]
        for key, value in chosen.items():
            log.info("[pipeline] %s=%s on the command line: the grid runs %s %s only", key, value, key, value)
        return methods, baselines, prunes, baseline_prunes

    def grid(self) -> list[tuple[str, str, list[str]]]:
        """The student grid: (recover method, prune option, extra student choices) per cell."""
        grid: list[tuple[str, str, list[str]]] = []
        for m in self.methods:
            grid += [(m, p, []) for p in self.prunes]
        for m in self.baselines:
            grid += [(m, p, []) for p in self.baseline_prunes]
        if self.exp.stage.hard_labels and self.methods:
            grid.append((self.methods[0], self.prunes[0], ["student=hard"]))
        return grid

    def quant(self) -> list[str]:
        q = self.exp.stage.get("quant")
        return [f"quant={q}"] if q else []

    def plan(self) -> list[tuple[str, list[str], str]]:
        """Every step in order, as (stage name, group choices, label): what :meth:`run` runs and ``stage=show``
        lists. A pruning metric selects from the store made at ``metric.source_prune`` (Table 5 protocol);
        random pruning reads a store generated at the target ratio (only kept batches computed)."""
        quant, grid = self.quant(), self.grid()
        steps: list[tuple[str, list[str], str]] = [
            ("squeeze", [], "squeeze: teacher"),
            ("stats", [], "stats: class-wise BN statistics"),
        ]
        steps += [("recover", [f"recover={m}"], f"recover: {m}") for m in dict.fromkeys(g[0] for g in grid)]
        res = [f"stage.results_name={self.results_name}"]
        metric = self.exp.get("metric") or {}
        for m, p, extra in grid:
            src = str(metric.get("source_prune", "1x")) if metric.get("name", "random") != "random" else p
            # the student derives the store from the same config (lpld.artifacts.labels), no path is handed over
            steps.append(("relabel", [f"recover={m}", f"prune={src}", *quant], f"relabel: {m} {src}"))
            steps.append(
                (
                    "student",
                    [f"recover={m}", f"prune={p}", *quant, *extra, *res],
                    f"student: {m} {p}{' hard labels' if extra else ''}",
                )
            )
        return steps

    def run(self) -> list[dict[str, Any]]:
        for name, choices, label in self.plan():
            self.step(name, choices, label)
        return self.collect(self.grid(), self.quant())

    def collect(self, grid: list[tuple[str, str, list[str]]], quant: list[str]) -> list[dict[str, Any]]:
        """The latest record of each grid cell, from this pipeline's results file."""
        from lpld.report.records import load_records

        f = results_artifact.path(self.exp, self.results_name)
        recs = load_records(f) if f.exists() else []
        rows = []
        for m, p, extra in grid:
            hard = bool(extra)
            match = [
                r
                for r in recs
                if r.get("method") == m
                and _name(r.get("prune")) == p
                and int(r.get("ipc", -1)) == int(self.exp.ipc)
                and int(r.get("seed", -1)) == int(self.exp.seed)
                and _is_hard(r) == hard
            ]
            if match:
                rows.append(match[-1])
        return rows


def _name(v: Any) -> str:
    """Records store group choices as dicts ({name, ratio, ...}); tables show the name."""
    if isinstance(v, dict):
        return str(v.get("name") or v.get("mode"))  # prune: {name, ...}; quant: {mode, k, ...}
    return str(v)


def _is_hard(rec: dict[str, Any]) -> bool:
    loss = rec.get("loss") or (rec.get("config", {}).get("student", {}) or {}).get("loss")
    return loss == "ce"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: method, ipc, prune, quant, labels, label MB (label arrays), record MB (augmentation records
    replayed), image MB, top-1. A hard-label row has 0 label bytes."""
    head = "| method | ipc | prune | quant | labels | label MB | record MB | image MB | top-1 (%) |"
    lines = [head, "|---" * 9 + "|"]
    for r in rows:
        total, labels = float(r.get("label_bytes", 0)), float(r.get("label_only_bytes", r.get("label_bytes", 0)))
        lines.append(
            f"| {r.get('method')} | {r.get('ipc')} | {_name(r.get('prune'))} | {_name(r.get('quant'))} | "
            f"{'hard' if _is_hard(r) else 'soft'} | {labels / 1e6:.3f} | {(total - labels) / 1e6:.3f} | "
            f"{float(r.get('image_bytes', 0)) / 1e6:.3f} | {100 * float(r.get('top1', 0)):.2f} |"
        )
    return "\n".join(lines)


def run(exp: Experiment) -> dict[str, Any]:
    from lpld.dist import require_launcher

    require_launcher(exp, "stage=pipeline")  # several Trainers in a row: ranks must not be re-launched (issue 20)
    t0 = time.perf_counter()
    pipe = Pipeline(exp)
    rows = pipe.run()
    table = format_table(rows)
    out_dir = results_artifact.dir(exp) / "reports" / pipe.results_name
    out_dir.mkdir(parents=True, exist_ok=True)
    from lpld.core.io import atomic_write_bytes

    atomic_write_bytes(out_dir / "pipeline.md", (table + "\n").encode())
    if exp.stage.report and rows:
        pipe.step(
            "report",
            [
                f"stage.results_name={pipe.results_name}",  # the report opens the file the students wrote
                "stage.rows=[method,student.loss]",
                "stage.cols=[prune]",
            ],
            "report: table + Pareto plot",
        )
    timing = "\n".join(f"  {label:40s} {sec:7.1f} s" for label, sec in pipe.timings)
    print(f"\nStep times:\n{timing}\n  {'total':40s} {time.perf_counter() - t0:7.1f} s")
    print(f"\nResults ({exp.dataset.name}, {exp.model.name}, ipc {exp.ipc}):\n{table}\n")
    print(f"Table and Pareto plot in {out_dir}")
    return {"rows": rows, "out_dir": str(out_dir), "config": exp.stage.to_dict()}
