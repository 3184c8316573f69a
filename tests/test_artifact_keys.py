"""Producers and consumers agree on every artifact's key, for every stage, experiment and sweep job.

Each check composes the configs exactly as they run: a sweep job from its sweep file and its share of the
sweeper grid (Cartesian product of the comma lists, ``glob(...)`` over the group's options); a pipeline job's
steps by running the real :class:`lpld.stages.pipeline.Pipeline` with its stage runner replaced by a
recorder (so the steps are composed by the pipeline's own code); a single-stage job (stage=analyze) against
the ``stage=recover`` command that makes the images it reads. Then the key each producer writes must equal
the key its consumer opens:

    teacher  squeeze -> stats, recover, relabel, student      stats   stats -> recover
    images   recover -> relabel, student, analyze             labels  relabel -> student (and storage)
    results  student -> the pipeline's results file / stage=report

The fast tier checks every experiment file, both ends of every grid and every value of every swept
parameter (one at a time around the first job); ``test_every_sweep_job`` (slow) checks the full product.
"""

from __future__ import annotations

import fnmatch
import itertools
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import lpld.config  # noqa: F401 - registers the config schemas before anything composes
from lpld.artifacts import images, labels, results, stats, teacher
from lpld.artifacts.base import EXCLUDED
from lpld.config.experiment import freeze
from lpld.config.frozen import Experiment

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
STAGES = ("squeeze", "stats", "recover", "relabel", "student", "storage", "analyze", "pipeline")


# ---------------------------------------------------------------------------------------------------------------------
# composing (cached: a sweep grid composes the same step many times)
# ---------------------------------------------------------------------------------------------------------------------


def _normal(overrides: tuple[str, ...]) -> tuple[str, ...]:
    """Overrides with only the last value of a repeated key (Hydra applies them in order; the last one wins)."""
    last: dict[str, str] = {}
    for o in overrides:
        k, _, v = o.partition("=")
        last.pop(k, None)
        last[k] = v
    return tuple(f"{k}={v}" for k, v in last.items())


_ACTIVE: list[str] = []  # the config dir GlobalHydra is initialised on (switching costs an initialisation)


def _activate(config_dir: str) -> None:
    """Initialise GlobalHydra on ``config_dir`` unless it already is (as code that composes in-process expects)."""
    if _ACTIVE != [config_dir] or not GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
        # the sweep files' `hydra.searchpath: file://conf` is relative to the working directory
        os.chdir(REPO)
        initialize_config_dir(config_dir=config_dir, version_base="1.3").__enter__()
        _ACTIVE[:] = [config_dir]


@cache
def _compose(config_dir: str, name: str, overrides: tuple[str, ...], hydra_cfg: bool = False) -> DictConfig:
    _activate(config_dir)
    return compose(config_name=name, overrides=list(overrides), return_hydra_config=hydra_cfg)


@pytest.fixture(autouse=True)
def _hydra_state():
    """Leave GlobalHydra and the working directory as they were (other test files initialise their own)."""
    cwd = os.getcwd()
    yield
    os.chdir(cwd)
    GlobalHydra.instance().clear()
    _ACTIVE.clear()


def conf(*overrides: str) -> Experiment:
    """The experiment of the main config tree composed with ``overrides`` (as `python run.py <overrides>`)."""
    return freeze(_compose(str(CONF), "config", _normal(overrides)), list(overrides))


def _values(key: str, spec: str) -> list[str]:
    """One sweeper param: "a,b,c", or glob(pattern) over the options of config group ``key``."""
    spec = str(spec).strip()
    if spec.startswith("glob(") and spec.endswith(")"):
        opts = sorted(p.stem for p in (CONF / key).glob("*.yaml"))
        return [o for o in opts if fnmatch.fnmatch(o, spec[5:-1])]
    return [v.strip() for v in spec.split(",")]


def sweep_params(path: Path) -> dict[str, list[str]]:
    base = _compose(str(REPO / "sweeps"), path.stem, (), hydra_cfg=True)
    return {k: _values(k, v) for k, v in OmegaConf.to_container(base.hydra.sweeper.params).items()}


def sweep_jobs(path: Path, every: bool) -> Iterator[tuple[str, ...]]:
    """The override lists of the sweep's jobs: all of them, or (fast tier) both ends of the grid plus every
    option of every swept config group (recover, experiment, metric, student, quant ...) with the other
    parameters at their first value. Scalar values (ipc, prune ratios, seeds) enter keys as plain numbers;
    the slow test covers each of their combinations."""
    params = sweep_params(path)
    keys = list(params)
    if every:
        for combo in itertools.product(*params.values()):
            yield tuple(f"{k}={v}" for k, v in zip(keys, combo))
        return
    groups = {p.name for p in CONF.iterdir() if p.is_dir()} - {"prune"}  # prune options are ratios (scalars)
    first = {k: v[0] for k, v in params.items()}
    picks = [first, {k: v[-1] for k, v in params.items()}]
    picks += [dict(first, **{k: v}) for k in keys if k in groups for v in params[k][1:-1]]
    seen = set()
    for pick in picks:
        job = tuple(f"{k}={pick[k]}" for k in keys)
        if job not in seen:
            seen.add(job)
            yield job


# ---------------------------------------------------------------------------------------------------------------------
# the pipeline's steps, composed by the pipeline itself
# ---------------------------------------------------------------------------------------------------------------------


def pipeline_steps(cfg: DictConfig, base: tuple[str, ...], monkeypatch) -> tuple[list[tuple[str, DictConfig]], str]:
    """[(stage name, composed step config)] in the order the pipeline runs them, and its results name."""
    from lpld.stages import pipeline

    steps: list[tuple[str, DictConfig]] = []
    monkeypatch.setattr(pipeline, "compose_step", lambda b, step: conf(*b, *step))
    monkeypatch.setattr(pipeline, "run_stage", lambda sub: steps.append((str(sub.stage.name), sub)) or {})
    pipe = pipeline.Pipeline(cfg, base=list(base))
    pipe.run()
    return steps, pipe.results_name


def check_pipeline(cfg: DictConfig, base: tuple[str, ...], monkeypatch) -> int:
    """Assert producer key == consumer key for every artifact a pipeline job hands from step to step."""
    from lpld.stages.student import label_store_dir

    steps, results_name = pipeline_steps(cfg, base, monkeypatch)
    names = [n for n, _ in steps]
    assert names[:2] == ["squeeze", "stats"] and "student" in names, names
    squeeze, stats_step = steps[0][1], steps[1][1]
    t_key, s_key = teacher.key(squeeze), stats.spec(stats_step).key()
    made_images: dict[str, str] = {}
    store = None
    for name, sub in steps[2:]:
        where = f"{name} step of {base}"
        assert teacher.key(sub) == t_key, f"teacher: squeeze wrote {t_key}, the {where} opens {teacher.key(sub)}"
        if name == "recover":
            assert stats.spec(sub).key() == s_key, f"stats: stats wrote {s_key}, the {where} opens another"
            made_images[str(sub.recover.name)] = images.key(sub)
        elif name == "relabel":
            assert images.key(sub) == made_images[str(sub.recover.name)], f"images: the {where} opens others"
            store = labels.path(sub)
        elif name == "student":
            assert images.key(sub) == made_images[str(sub.recover.name)], f"images: the {where} opens others"
            assert label_store_dir(sub) == store, f"labels: relabel wrote {store}, the {where} opens another"
            wrote = results.path(sub, str(sub.stage.results_name))
            assert wrote == results.path(cfg, results_name), f"results: the {where} writes {wrote}"
    return len(steps)


def check_analyze(cfg: DictConfig, hydra_cfg: DictConfig) -> int:
    """stage=analyze opens, per method, the images that `stage=recover recover=<method>` (same run) wrote."""
    from lpld.stages.analyze import method_dirs

    if str(cfg.stage.mode) == "eq8":
        return 0  # Eq. 8 from the train set's class counts: no artifact is read
    choices = hydra_cfg.hydra.runtime.choices
    run = [f"dataset={choices.dataset}", f"model={choices.model}", f"ipc={cfg.ipc}", f"seed={cfg.seed}"]
    run.append(f"model.pretrained={str(bool(cfg.model.get('pretrained'))).lower()}")
    _activate(str(CONF))  # `run.py -cd sweeps` composes `config` in-process (its hydra.searchpath names conf/)
    dirs = method_dirs(cfg)
    for m, d in dirs.items():
        made = images.path(conf(*run, "stage=recover", f"recover={m}"))
        assert d == made, f"images: recover={m} wrote {made.name}, stage=analyze opens {d.name}"
    return len(dirs)


def check_job(path: Path, job: tuple[str, ...], monkeypatch) -> int:
    cfg = _compose(str(REPO / "sweeps"), path.stem, _normal(job), hydra_cfg=True)
    job_cfg = freeze(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), list(job))
    kind = str(cfg.stage.name)
    if kind == "pipeline":
        # the pipeline composes its steps from the job's overrides minus stage.* (HydraConfig's task overrides)
        base = tuple(o for o in job if not o.split("=")[0].lstrip("+~").startswith("stage"))
        return check_pipeline(job_cfg, base, monkeypatch)
    if kind == "analyze":
        return check_analyze(job_cfg, cfg)
    raise AssertionError(f"{path.name}: no producer/consumer check for stage={kind} jobs; add one here")


# ---------------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_jobs_agree(path, monkeypatch):
    """Both ends of the grid and every swept value: each producer's key is the key its consumer opens."""
    jobs = list(sweep_jobs(path, every=False))
    for job in jobs:  # compose the jobs first: one Hydra initialisation for the sweep dir, one for conf/
        _compose(str(REPO / "sweeps"), path.stem, _normal(job), hydra_cfg=True)
    checked = sum(check_job(path, job, monkeypatch) for job in jobs)
    assert checked > 0 or path.stem == "eq8"  # eq8 jobs read no artifact


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_job(path, monkeypatch):
    """The full Cartesian product of every sweep (minutes: hundreds of jobs x five steps)."""
    for job in sweep_jobs(path, every=True):
        check_job(path, job, monkeypatch)


def test_default_pipeline_agrees(monkeypatch):
    """`python run.py` (the default pipeline: methods x prunes, baselines, the hard-label student)."""
    assert check_pipeline(conf("stage=pipeline"), (), monkeypatch) >= 10


def test_every_experiment_is_a_checked_sweep_job():
    """Every experiment file runs in some sweep (so test_sweep_jobs_agree checks its pipeline, in the fast tier)."""
    swept = {e for p in SWEEPS for e in sweep_params(p).get("experiment", [])}
    assert set(EXPERIMENTS) <= swept, sorted(set(EXPERIMENTS) - swept)


@pytest.mark.parametrize("experiment", [None, "table9_ours_plus", "table8_rded", "table5b_e10_h30"])
def test_every_stage_computes_the_same_keys(experiment):
    """An artifact's key does not depend on which stage asks (no stage node leaks into another's identity)."""
    base = (f"experiment={experiment}",) if experiment else ()
    keys = {}
    for st in STAGES:
        c = conf(*base, f"stage={st}")
        keys[st] = (teacher.key(c), stats.spec(c).key(), images.key(c), labels.key(c))
    assert len(set(keys.values())) == 1, keys


def test_table9_ours_plus_student_opens_the_ensemble_store():
    """The regression this file exists for: relabel built a 1-teacher store, the student opened the 4-teacher one."""
    from lpld.stages.student import label_store_dir

    ov = ("experiment=table9_ours_plus", "dataset=in1k", "model=resnet18", "model.pretrained=true", "ipc=10")
    made = labels.path(conf(*ov, "stage=relabel"))
    assert made.name.startswith("ens4-") and label_store_dir(conf(*ov, "stage=student")) == made
    assert labels.key(conf(*ov[1:], "stage=relabel")).startswith("self_")


# keys change with a value that changes the bytes ... ------------------------------------------------------------------

BYTE_CHANGES = [
    ("stats", ("stage=stats",), "stage.max_images=64"),
    ("stats", ("stage=stats",), "stage.batch_size=128"),
    ("stats", ("stage=stats",), "stage.mode=official"),
    ("stats", ("stage=stats",), "trainer.precision=bf16-mixed"),
    ("stats", ("stage=stats",), "model.width=64"),
    ("teacher", ("stage=squeeze",), "model.width=64"),
    ("teacher", ("stage=squeeze",), "teacher_seed=1"),
    ("teacher", ("stage=squeeze",), "dataset.image_size=16"),
    ("images", ("stage=recover",), "recover.iterations=7"),
    ("images", ("stage=recover",), "recover.lr=0.2"),
    ("images", ("stage=recover",), "recover.jitter=2"),
    ("images", ("stage=recover",), "recover.tv_l2=0.5"),
    ("images", ("stage=recover",), "recover.precision=bf16-mixed"),
    ("images", ("stage=recover",), "ipc=3"),
    ("images", ("stage=recover",), "seed=1"),
    ("images", ("stage=recover",), "recover=sre2l"),
    ("images", ("stage=recover",), "model.width=64"),
    # issue 20: how the images are stored is part of their identity (a PNG folder never answers for a JPEG one)
    ("images", ("stage=recover",), "recover.image_format=png"),
    ("images", ("stage=recover",), "recover.quantize=round"),
    ("images", ("stage=recover",), "recover.jpeg_quality=90"),
    ("labels", ("stage=relabel",), "recover.image_format=png"),
    ("labels", ("stage=relabel", "prune=40x"), "prune.pool_select=random"),
    ("labels", ("stage=relabel",), "prune=40x"),
    ("labels", ("stage=relabel",), "prune.granularity=epoch"),
    ("labels", ("stage=relabel", "quant=mr", "quant.k=5"), "quant.k=3"),
    ("labels", ("stage=relabel",), "relabel.epochs=7"),
    ("labels", ("stage=relabel",), "relabel.precision=bf16-mixed"),
    ("labels", ("stage=relabel",), "relabel.record_mode=seed"),
    ("labels", ("stage=relabel",), "recover.iterations=7"),
]
# ... and not with one that cannot (EXCLUDED)
NO_BYTE_CHANGES = [
    ("stats", ("stage=stats",), "trainer.num_workers=7"),
    ("stats", ("stage=stats",), "stage.overwrite=true"),
    ("stats", ("stage=stats",), "seed=3"),  # exact mode: the pass's order does not matter
    ("teacher", ("stage=squeeze",), "seed=3"),  # teacher_seed trains the teacher; seed is the run's
    ("teacher", ("stage=squeeze",), "trainer.devices=2"),
    ("teacher", ("stage=squeeze",), "dataset.root=/elsewhere"),
    ("images", ("stage=recover",), "trainer.devices=2"),
    ("images", ("stage=recover",), "recover.classes_per_batch=3"),
    ("images", ("stage=recover",), "recover.class_end=5"),
    ("images", ("stage=recover",), "recover.overwrite=true"),
    ("images", ("stage=recover",), "stage.progress_every=3"),
    ("labels", ("stage=relabel",), "stage.chunk=3"),
    ("labels", ("stage=relabel",), "stage.num_workers=5"),
    ("labels", ("stage=relabel",), "stage.batches_per_forward=2"),
    ("labels", ("stage=relabel",), "trainer.devices=2"),
    ("labels", ("stage=relabel",), "logger=csv"),
]
KEY = {"teacher": teacher.key, "stats": lambda c: stats.spec(c).key(), "images": images.key, "labels": labels.key}


@pytest.mark.parametrize(("artifact", "base", "change"), BYTE_CHANGES, ids=lambda v: v if isinstance(v, str) else "")
def test_key_changes_with_a_byte_changing_value(artifact, base, change):
    assert KEY[artifact](conf(*base)) != KEY[artifact](conf(*base, change))


@pytest.mark.parametrize(("artifact", "base", "change"), NO_BYTE_CHANGES, ids=lambda v: v if isinstance(v, str) else "")
def test_key_ignores_excluded_values(artifact, base, change):
    assert KEY[artifact](conf(*base)) == KEY[artifact](conf(*base, change))


def test_quick_stats_are_not_the_full_pass():
    """`stage=stats stage.max_images=64` writes elsewhere than the full pass recover opens (was: silently reused)."""
    quick = stats.path(conf("stage=stats", "stage.max_images=64"))
    assert quick != stats.path(conf("stage=stats")) == stats.path(conf("stage=recover"))
    assert quick.parent == stats.path(conf("stage=recover")).parent  # same teacher, same folder


def test_exclusion_list_is_short_and_names_no_identity():
    assert len(EXCLUDED) <= 16
    assert not EXCLUDED & {"seed", "ipc", "iterations", "lr", "epochs", "batch_size", "precision", "max_images", "name"}


def test_no_seed_is_derived_from_a_path_or_key():
    """Renaming artifact folders must not change any number: no RNG is seeded from a path, a key or a name."""
    import re

    rng = r"manual_seed|derive_seed|make_generator|seed_everything|default_rng|np\.random\.seed"
    pat = re.compile(rf"({rng})\(([^)]*)\)")
    bad = []
    for f in sorted((REPO / "lpld").rglob("*.py")):
        for m in pat.finditer(f.read_text()):
            if re.search(r"key\(|path|_dir|\.name\b|str\(|hash\(", m.group(2)):
                bad.append(f"{f.relative_to(REPO)}: {m.group(0)}")
    assert not bad, bad
