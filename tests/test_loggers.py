"""Every logger (none, csv, wandb offline) with every stage that runs a Trainer (issue 22: ``logger=csv`` crashed
stage=stats on a frozen dataclass in the hyperparameters).

In process (compose API + ``run_stage``) on the tiniest settings: one chain squeeze -> stats -> recover -> relabel ->
student per logger, built stage by stage as the parametrisation asks for it (a test of a later stage runs the
earlier ones first if an earlier test did not), so the whole file stays short.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_cfg, tiny_overrides, write_image_tree

from lpld.stages import run_stage

STAGES = ("squeeze", "stats", "recover", "relabel", "student")
LOGGERS = ("none", "csv", pytest.param("wandb", marks=pytest.mark.slow))
TINY = [
    "ipc=2",
    "recover=lpld",
    "dataset.recipe.squeeze.epochs=1",
    "dataset.recipe.squeeze.batch_size=8",
    "dataset.recipe.recover.iterations=2",
    "dataset.recipe.student.epochs=1",
    "dataset.recipe.student.batch_size=4",
    "dataset.recipe.student.rrc_scale=[0.5,1.0]",
]


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> dict[str, dict]:
    """logger -> {"root": its artifacts root, "done": the stages run so far}; one image tree for all."""
    data = write_image_tree(tmp_path_factory.mktemp("data"), n_classes=4, per_class=6)
    out: dict[str, dict] = {}
    for name in ("none", "csv", "wandb"):
        out[name] = {"root": tmp_path_factory.mktemp(f"logger-{name}"), "data": data, "done": []}
    return out


def overrides(chain: dict, logger: str, stage: str) -> list[str]:
    ov = [f"stage={stage}", *tiny_overrides(chain["root"], chain["data"]), *TINY]
    return [x for x in ov if not x.startswith("logger=")] + [f"logger={logger}"]


def run_chain(chain: dict, logger: str, upto: str) -> dict:
    """Run the stages of the chain up to ``upto`` (each once), with ``logger``; returns ``upto``'s result."""
    res = {}
    for stage in STAGES[: STAGES.index(upto) + 1]:
        if stage in chain["done"]:
            continue
        res = run_stage(compose_cfg(overrides(chain, logger, stage)))
        chain["done"].append(stage)
    return res


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("logger", LOGGERS)
def test_every_logger_with_every_stage(chains, logger, stage, monkeypatch):
    chain = chains[logger]
    if logger == "wandb":
        pytest.importorskip("wandb")
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_DIR", str(chain["root"] / "wandb"))
        monkeypatch.setenv("WANDB_SILENT", "true")
    res = run_chain(chain, logger, stage)
    assert stage in chain["done"]
    assert isinstance(res, dict) and not res.get("reused")
    logs = Path(chain["root"]) / "logs"
    if logger == "csv" and stage in ("squeeze", "stats", "student"):
        written = [p for p in logs.rglob("*") if p.name in ("metrics.csv", "hparams.yaml")]
        assert any(stage in str(p) for p in written), sorted(str(p) for p in written)
    if logger == "wandb" and stage == "squeeze":
        assert list((chain["root"] / "wandb").rglob("offline-run-*")) or list(logs.rglob("offline-run-*"))
