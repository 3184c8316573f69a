"""The config tree composes for every dataset x model x stage; core imports stay pure."""

import json
import os
import subprocess
import sys

import pytest
from conftest import CONF, REPO, compose_cfg
from omegaconf import OmegaConf

DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
STAGES = sorted(p.stem for p in (CONF / "stage").glob("*.yaml"))
REQUIRED_DS_KEYS = ("name", "num_classes", "channels", "image_size", "mean", "std")


def test_every_stage_has_a_module_and_config():
    from lpld.stages import STAGES as REGISTERED

    assert set(STAGES) <= set(REGISTERED), set(STAGES) - set(REGISTERED)
    for s in STAGES:
        assert (REPO / "lpld" / "stages" / f"{s}.py").exists(), s


def compose_all(triples: list[tuple[str, str, str]]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # initialise once, compose many
        for dataset, model, stage in triples:
            extra = ["dataset.num_classes=7"] if dataset == "imagefolder" else []  # the one required value
            ov = [f"dataset={dataset}", f"model={model}", f"stage={stage}", "ipc=50", "seed=3", *extra]
            check_composed(compose(config_name="config", overrides=ov), stage)


def test_every_pair_composes():
    """Fast tier: every dataset x stage, every model x stage and every dataset x model pair."""
    triples = {(d, "convnet", s) for d in DATASETS for s in STAGES}
    triples |= {("demo", m, s) for m in MODELS for s in STAGES}
    triples |= {(d, m, "stats") for d in DATASETS for m in MODELS}
    compose_all(sorted(triples))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_model_stage_composes(dataset):
    """Slow tier: the full dataset x model x stage product."""
    compose_all([(dataset, m, s) for m in MODELS for s in STAGES])


def check_composed(cfg, stage: str) -> None:
    from lpld.config.schema import unknown_keys

    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert not unknown_keys(cfg), unknown_keys(cfg)
    assert cfg.stage.name == stage and cfg.ipc == 50 and cfg.seed == 3
    for k in REQUIRED_DS_KEYS:
        assert cfg.dataset[k] is not None, (cfg.dataset.name, k)
    assert len(cfg.dataset.mean) == len(cfg.dataset.std) == cfg.dataset.channels


def test_unknown_key_is_refused():
    with pytest.raises(Exception, match="nonexistent"):
        compose_cfg(["stage=stats", "stage.nonexistent=1"])


def test_core_imports_neither_lightning_nor_hydra():
    code = (
        "import importlib, pkgutil, sys, lpld.core as c\n"
        "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('lpld.core.' + m.name)\n"
        "banned = ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf')\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in banned]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_unknown_stage_lists_valid_ones():
    r = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "stage=bogus", "logger=none"], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode != 0
    assert "squeeze" in r.stderr and "stats" in r.stderr


def test_each_log_line_is_printed_once(tmp_path):
    """Lightning's messages go through Hydra's root logger only (not also bare through Lightning's handler)."""
    from conftest import tiny_overrides, write_image_tree

    data = write_image_tree(tmp_path / "data", n_classes=4, per_class=6)
    # LPLD_DEBUG=1 shows the lines the quiet console filters (lpld.lit.display): each must still print once
    env = {**os.environ, "LPLD_NO_RICH": "1", "WANDB_MODE": "disabled", "LPLD_DEBUG": "1"}
    ov = [
        *tiny_overrides(tmp_path, data),
        "stage.epochs=1",
        "stage.batch_size=8",
        "hydra.run.dir=" + str(tmp_path / "h"),
    ]
    r = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "stage=squeeze", *ov], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    for line in ("GPU available: False, used: False", "`Trainer.fit` stopped", "teacher saved to"):
        assert out.count(line) == 1, (line, out[-3000:])
    assert "[lightning.pytorch" in out  # ... and that once is Hydra's formatted line


# ----------------------------------------------------------------------------------------------------------------------
# typed schemas and the one precedence (lpld.config)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    ["recover.iteratons=5", "relabel.epoch=3", "student.tempreature=2", "quant.kk=3", "prune.rate=0.5", "stage.x=1"],
)
def test_unknown_knob_of_a_typed_group_is_refused_naming_it(override):
    key = override.split("=")[0]
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        compose_cfg(["stage=relabel", override])
    # appended with `+`, Hydra adds it to the typed node: lpld refuses it before any stage runs
    from lpld.config.schema import check_known_keys
    from lpld.errors import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_known_keys(compose_cfg(["stage=relabel", "+" + override], raw=True))


def test_yaml_files_keep_only_what_differs_from_the_schema():
    """Defaults live in lpld/config/schema.py: a schema-backed YAML option sets only values that differ."""
    import dataclasses

    import yaml

    from lpld.config.schema import SCHEMAS

    checked = 0
    groups = ("recover", "relabel", "student", "quant", "prune", "stage", "dataset", "model", "trainer", "logger")
    for group in (*groups, "paths", "metric"):
        for f in sorted((CONF / group).glob("*.yaml")):
            raw = yaml.safe_load(f.read_text())
            base = [d for d in raw.get("defaults", []) if isinstance(d, str) and d.startswith("/schema/")]
            if not base:
                assert any(isinstance(d, str) and not d.startswith("_") for d in raw["defaults"]), f  # extends one
                continue
            schema_group, name = base[0].split("@")[0].rsplit("/", 1)
            schema = SCHEMAS[schema_group.lstrip("/")][name]
            defaults = {fl.name: fl for fl in dataclasses.fields(schema)}
            for k, v in raw.items():
                if k in ("defaults", "name"):
                    continue
                assert k in defaults, (f, k)
                fl = defaults[k]
                d = fl.default_factory() if fl.default_factory is not dataclasses.MISSING else fl.default
                assert v != d, f"{f.relative_to(REPO)}: {k}: {v!r} repeats the schema default"
            checked += 1
    assert checked >= 60


def test_every_dataset_recipe_key_is_read():
    """Each recipe.<section> key of every dataset file is a knob a resolver reads (no dead keys)."""
    import dataclasses

    import yaml

    from lpld.config import schema

    readers = {
        "squeeze": {f.name for f in dataclasses.fields(schema.SqueezeStage)},
        "stats": {"mode", "batch_size"},  # batch_size: in21k's 1024 (issue 20)
        "recover": {f.name for f in dataclasses.fields(schema.RecoverOptimize)},
        "student": {f.name for f in dataclasses.fields(schema.StudentConf)}
        | {f.name for f in dataclasses.fields(schema.RelabelConf)},
    }
    for f in sorted((CONF / "dataset").glob("*.yaml")):
        recipe = yaml.safe_load(f.read_text())["recipe"]
        sections = [recipe] + [e for e in (recipe.get("ipc_table") or {}).values() if e]
        sizes = [e for e in (recipe.get("size_table") or {}).values() if e]
        sections += [{k: v for k, v in e.items() if k != "refuse"} for e in sizes]  # refuse: the reason, no knob
        for sec in sections:
            for section, keys in sec.items():
                if section in ("ipc_table", "size_table"):
                    continue
                if section == "recover_by_method":  # method -> recover knobs (issue 20)
                    for m, ks in (keys or {}).items():
                        assert set(ks or {}) <= readers["recover"], (f.name, m, set(ks) - readers["recover"])
                    continue
                assert set(keys or {}) <= readers[section], (f.name, section, set(keys) - readers[section])


def test_one_precedence_command_line_ipc_table_recipe_schema():
    from lpld.config import quant_settings, recover_settings, relabel_settings, student_settings

    man = {"epochs": 5, "granularity": "batch", "quant": {"mode": "none"}}
    # ipc_table (demo: ipc 1-9 -> batch 10, 10-49 -> 32, >= 50 -> 64) over the recipe, the command line over both
    assert relabel_settings(compose_cfg(["ipc=1"]))["batch_size"] == 10
    assert relabel_settings(compose_cfg(["ipc=50"]))["batch_size"] == 64
    assert relabel_settings(compose_cfg(["ipc=1", "relabel.batch_size=7"]))["batch_size"] == 7
    # 0 / false on the command line are values, not "unset" (only null is)
    assert recover_settings(compose_cfg(["recover.jitter=0"]))["jitter"] == 0  # demo recipe: 4
    assert student_settings(compose_cfg(["dataset=tiny", "student.kd_t2=false"]), man)["kd_t2"] is False
    assert student_settings(compose_cfg(["dataset=tiny"]), man)["kd_t2"] is True  # tiny's recipe
    assert relabel_settings(compose_cfg(["dataset=in21k"]))["flip"] is False  # the recipe's
    assert relabel_settings(compose_cfg(["dataset=in21k", "relabel.flip=true"]))["flip"] is True
    assert relabel_settings(compose_cfg(["relabel.flip=false"]))["flip"] is False
    t8 = compose_cfg(["experiment=table8_rded"])
    assert relabel_settings(t8)["shuffle_patches"] == 2
    assert (
        relabel_settings(compose_cfg(["experiment=table8_rded", "relabel.shuffle_patches=0"]))["shuffle_patches"] == 0
    )
    # without a recipe value the schema default applies, the same for the student and for ms quantization
    bare = compose_cfg(["~dataset.recipe.student.temperature", "quant=ms"])
    assert student_settings(bare, man)["temperature"] == 4.0 == quant_settings(bare)["temperature"]
    assert quant_settings(compose_cfg(["quant=ms", "student.temperature=2"]))["temperature"] == 2.0


def test_choices_are_refused_once_with_config_error():
    from lpld.config import recover_settings, relabel_settings, student_settings
    from lpld.errors import ConfigError

    man = {"epochs": 5, "granularity": "batch", "quant": {"mode": "none"}}
    with pytest.raises(ConfigError, match="relabel.mix"):
        relabel_settings(compose_cfg(["relabel.mix=mixup"]))
    with pytest.raises(ConfigError, match="relabel.drop_last"):
        relabel_settings(compose_cfg(["relabel.drop_last=sometimes"]))
    with pytest.raises(ConfigError, match="student.scheduler"):
        student_settings(compose_cfg(["student.scheduler=linear"]), man)
    with pytest.raises(ConfigError, match="student.optimizer"):
        student_settings(compose_cfg(["student.optimizer=lamb"]), man)
    with pytest.raises(ConfigError, match="recover.cda"):
        recover_settings(compose_cfg(["recover=cda", "recover.cda.schedule=exp"]))


def test_relabel_knobs_come_from_the_relabel_group_for_every_stage():
    """stage=relabel, student, storage and plan resolve the same store knobs; table9_ours_plus sets the ensemble."""
    from lpld.config import relabel_settings

    base = ["experiment=table9_ours_plus", "relabel.epochs=7"]
    got = [relabel_settings(compose_cfg([*base, f"stage={s}"])) for s in ("relabel", "student", "storage", "plan")]
    assert all(g == got[0] for g in got)
    assert got[0]["epochs"] == 7 and len(got[0]["teachers"]) == 4 and got[0]["ensemble"] == "mean_logits"
    assert relabel_settings(compose_cfg(["stage=student"]))["teachers"] is None


def test_resolve_gives_the_sections_a_stage_reads():
    from lpld.config import resolve

    spec = resolve(compose_cfg(["stage=student", "ipc=10"])).to_dict()
    assert spec["stage"] == "student" and spec["ipc"] == 10
    assert spec["student"]["epochs"] == 80 and spec["relabel"]["batch_size"] == 32 and spec["squeeze"] is None
    json.dumps(spec)  # plain python
    assert resolve(compose_cfg(["stage=squeeze"])).squeeze["epochs"] == 6  # conf/dataset/demo.yaml


def test_wandb_run_groups_by_pipeline_with_stage_job_type_and_resolved_config(monkeypatch, tmp_path):
    import lightning.pytorch.loggers as loggers

    from lpld.config import resolve
    from lpld.config.experiment import experiment_config
    from lpld.stages.common import build_logger
    from lpld.stages.pipeline import Pipeline

    made: list[dict] = []

    class FakeWandb:  # no network, no wandb run: records what lpld asks W&B for
        def __init__(self, **kw):
            made.append(kw)

    monkeypatch.setattr(loggers, "WandbLogger", FakeWandb)
    pipe_cfg = compose_cfg(["stage=pipeline", "logger=wandb", f"paths.root={tmp_path}"])
    pipe = Pipeline(pipe_cfg, base=["logger=wandb", f"paths.root={tmp_path}"])
    (group,) = [o.split("=", 1)[1] for o in pipe.base if o.startswith("logger.group=")]
    assert group.startswith(f"{pipe.results_name}-")  # one group per invocation: <results name>-<timestamp>
    for stage in ("recover", "student"):
        cfg = compose_cfg([*pipe.base, f"stage={stage}"])
        build_logger(cfg, stage)
        kw = made[-1]
        assert kw["group"] == group and kw["job_type"] == stage
        spec = resolve(cfg).to_dict()  # the resolved sections, in the experiment stage=show prints
        assert kw["config"] == experiment_config(cfg)
        assert all(kw["config"][s] == {**kw["config"][s], **spec[s]} for s in ("recover", "student") if spec[s])
    build_logger(compose_cfg(["stage=recover", "logger=wandb", f"paths.root={tmp_path}"]), "recover")
    assert made[-1]["group"] is None  # a lone run is not grouped


def test_pipeline_refuses_relabel_knobs_for_one_step():
    from lpld.errors import ConfigError
    from lpld.stages.pipeline import Pipeline

    with pytest.raises(ConfigError, match="relabel.epochs=3"):
        Pipeline(compose_cfg(["stage=pipeline", "stage.steps.relabel=['relabel.epochs=3']"]), base=[])
