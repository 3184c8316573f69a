"""Results files: ``<artifacts>/<dataset>/results/<name>.jsonl``, one JSON record per finished student run
(:mod:`lpld.core.results`). An append log, not a signed artifact: its key is the readable name
(``student.results_name``; a pipeline's ``pipeline_<teacher>_ipc<ipc>``), each record carries its run's key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lpld.artifacts import teacher
from lpld.artifacts.base import dataset_dir, dataset_name, get, plain_name, root, under
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


@once
def pipeline_name(exp: Experiment) -> str:
    """A pipeline's results file: ``stage.results_name`` or ``pipeline_<teacher name>_ipc<ipc>``."""
    return str(get(exp, "stage.results_name") or f"pipeline_{teacher.teacher_name(exp)}_ipc{int(exp.ipc)}")


@once
def spec(exp: Experiment, name: str | None = None) -> ResultsSpec:
    """The results file of this run (``name`` else ``stage.results_name`` else ``results``)."""
    return ResultsSpec(dataset=dataset_name(exp), name=str(name or get(exp, "stage.results_name", "results")))


@once
def path(exp: Experiment, name: str | None = None) -> Path:
    return spec(exp, name).path(root(exp))
