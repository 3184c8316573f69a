"""Results files: ``<artifacts>/<dataset>/results/<name>.jsonl``, one JSON record per finished student run
(:mod:`lpld.core.results`). An append log, not a signed artifact: its key is the readable name
(``student.results_name``; a pipeline's ``pipeline_<teacher>_ipc<ipc>_<config hex>``), each record carries its
run's key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lpld.artifacts import teacher
from lpld.artifacts.base import dataset_dir, dataset_name, get, plain_name, root, sign, under
from lpld.config.frozen import Experiment, once


@dataclass(frozen=True)
class ResultsSpec:
    dataset: str
    name: str

    def key(self) -> str:
        return self.name

    def path(self, artifacts: Path) -> Path:
        plain_name(self.name, "stage.results_name", "myresults")  # a file stem, not a path
        return under(Path(artifacts), self.dataset, "results", f"{self.name}.jsonl")


@once
def dir(exp: Experiment) -> Path:  # noqa: A001 - artifacts.results.dir(exp)
    """The folder of every results file of this dataset (stage=report's default source)."""
    return dataset_dir(exp) / "results"


# what a pipeline's results file is not keyed by: the seed (seeds of one config share a file, so the report
# aggregates them), the grid axes a multirun may choose on the command line (``-m prune=1x,10x,40x``: one file, one
# table; each record carries its own prune / method), and what does not change a result (where files go, logging,
# describing instead of running)
_NOT_RESULTS_IDENTITY = ("seed", "prune", "logger", "paths", "show")


@once
def pipeline_name(exp: Experiment) -> str:
    """A pipeline's results file: ``stage.results_name``, else ``pipeline_<teacher name>_ipc<ipc>_<8 hex>`` where the
    hex signs the experiment's config (:data:`_NOT_RESULTS_IDENTITY` left out; of ``recover``, only the knobs the
    command line sets for every method): a smoke run
    with other epochs and the real run never append to one file (issue 19), the same command always finds its own."""
    explicit = get(exp, "stage.results_name")
    if explicit:
        return str(explicit)
    values = {k: v for k, v in exp.to_dict().items() if k not in _NOT_RESULTS_IDENTITY}
    # the method is a grid axis (each method's own option decides its knobs); knobs set for every method count
    set_here = {
        o.lstrip("+~").split("=", 1)[0].split(".", 1)[1] for o in exp.overrides if o.lstrip("+~").startswith("recover.")
    }
    values["recover"] = {k: v for k, v in values["recover"].items() if k in set_here}
    return f"pipeline_{teacher.teacher_name(exp)}_ipc{int(exp.ipc)}_{sign(values)}"


@once
def spec(exp: Experiment, name: str | None = None) -> ResultsSpec:
    """The results file of this run (``name`` else ``stage.results_name`` else ``results``)."""
    return ResultsSpec(dataset=dataset_name(exp), name=str(name or get(exp, "stage.results_name", "results")))


@once
def path(exp: Experiment, name: str | None = None) -> Path:
    return spec(exp, name).path(root(exp))
