"""Results files: ``<artifacts>/<dataset>/results/<name>.jsonl``, one JSON record per finished student run
(:mod:`lpld.core.results`). An append log, not a signed artifact: its key is the readable name
(``student.results_name``; a pipeline's ``pipeline_<teacher>_ipc<ipc>``), each record carries its run's key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from lpld.artifacts import teacher
from lpld.artifacts.base import dataset_dir, dataset_name, get, plain_name, root, under


@dataclass(frozen=True)
class ResultsSpec:
    dataset: str
    name: str

    def key(self) -> str:
        return self.name

    def path(self, artifacts: Path) -> Path:
        plain_name(self.name, "stage.results_name", "myresults")  # a file stem, not a path
        return under(Path(artifacts), self.dataset, "results", f"{self.name}.jsonl")


def dir(cfg: DictConfig) -> Path:  # noqa: A001 - artifacts.results.dir(cfg)
    """The folder of every results file of this dataset (stage=report's default source)."""
    return dataset_dir(cfg) / "results"


def pipeline_name(cfg: DictConfig) -> str:
    """A pipeline's results file: ``stage.results_name`` or ``pipeline_<teacher name>_ipc<ipc>``."""
    return str(get(cfg, "stage.results_name") or f"pipeline_{teacher.teacher_name(cfg)}_ipc{int(cfg.ipc)}")


def spec(cfg: DictConfig, name: str | None = None) -> ResultsSpec:
    """The results file of this run (``name`` else ``stage.results_name`` else ``results``)."""
    return ResultsSpec(dataset=dataset_name(cfg), name=str(name or get(cfg, "stage.results_name", "results")))


def path(cfg: DictConfig, name: str | None = None) -> Path:
    return spec(cfg, name).path(root(cfg))
