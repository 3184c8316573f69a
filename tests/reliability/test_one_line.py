"""Issue 22, "Tracebacks instead of one line": each case ends with exit status 1 and ONE ``lpld error:`` line that
names the key or file and the fix, no traceback, and (where it applies) nothing created.

In process: the stage runs through ``lpld.stages.user_errors`` + ``run_stage`` on a composed config, as ``run.py``
runs it. Real ``python run.py`` subprocesses for a DataLoader worker's re-raise and one config error.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_image_tree

from lpld.artifacts import images as images_artifact
from lpld.errors import ArtifactError, ConfigError, DatasetError, user_error_types
from lpld.stages import run_stage, translate_error, user_errors

from .helpers import compose_cfg, save_random_teacher, stage_overrides, student_cfg

PER_CLASS = 6  # images per class of the helpers' tiny tree (write_image_tree per_class)


class Evil:
    """Pickled into a checkpoint: the weights-only loader must refuse it (it is never instantiated on load)."""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny teacher -> random_real images -> label store; returns the root and the student config."""
    root = tmp_path_factory.mktemp("one_line")
    return {"root": root, "student": student_cfg(root)}


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    for k in ("LPLD_DEBUG", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(k, raising=False)


def run_cfg(cfg) -> tuple[object, str]:
    """(exit code, stderr) of running ``cfg`` the way run.py does."""
    buf = io.StringIO()
    code: object = 0
    with contextlib.redirect_stderr(buf):
        try:
            with user_errors(cfg):
                run_stage(cfg)
        except SystemExit as e:
            code = e.code
    return code, buf.getvalue()


def assert_one_line(code: object, err: str, needles: list[str], forbidden: tuple[str, ...] = ()) -> str:
    assert code == 1, err
    lines = [ln for ln in err.splitlines() if ln.startswith("lpld error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], f"{n!r} not in: {lines[0]}"
    for f in forbidden:
        assert f not in err, f"{f!r} in: {err}"
    return lines[0]


def stage(root: Path, *args: str):
    """The stage config on the helpers' tiny tree (overrides after the tree's)."""
    return compose_cfg([*stage_overrides(root), *args])


# ----------------------------------------------------------------------------------------------------------------------
# config values, refused before the stage starts (key named, valid value named)
# ----------------------------------------------------------------------------------------------------------------------
VALUE_CASES = [
    ("prune.ratio=1.0", ["stage=relabel", "prune=10x", "prune.ratio=1.0"], ["prune.ratio=1.0", "[0, 1)", "prune=<1x|"]),
    ("prune.ratio=-0.5", ["stage=relabel", "prune=10x", "prune.ratio=-0.5"], ["prune.ratio=-0.5", "prune.ratio=0.9"]),
    ("prune.ratio=abc", ["stage=relabel", "prune=10x", "prune.ratio=abc"], ["prune.ratio='abc'", "not a number"]),
    ("seed=10**20", ["stage=storage", f"seed={10**20}"], [f"seed={10**20}", "0..4294967295", "seed=0"]),
    ("teacher_seed=-1", ["stage=storage", "teacher_seed=-1"], ["teacher_seed=-1", "0..4294967295"]),
    ("stage.verify=bogus", ["stage=student", "stage.verify=bogus"], ["stage.verify='bogus'", "fast|full|none"]),
    (
        "stage.num_workers=-1",
        ["stage=student", "stage.num_workers=-1"],
        ["stage.num_workers=-1", "stage.num_workers=0"],
    ),
    (
        "trainer.num_workers=-1",
        ["stage=student", "trainer.num_workers=-1"],
        ["trainer.num_workers=-1", "trainer.num_workers=0"],
    ),
    ("stage.chunk=0", ["stage=relabel", "stage.chunk=0"], ["stage.chunk=0", "stage.chunk=32"]),
]


@pytest.mark.parametrize("case", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_bad_value_is_one_line_naming_the_key_and_a_valid_value(built, case):
    from hydra.errors import ConfigCompositionException

    _, args, needles = case
    try:
        cfg = stage(built["root"], *args)
    except ConfigCompositionException as e:  # a typed schema refuses a non-number while composing (the CLI test)
        key = needles[0].split("=")[0]
        assert key in f"{e} {e.__cause__}"
        return
    assert_one_line(*run_cfg(cfg), needles)


def test_prune_ratio_abc_names_the_key_when_the_schema_lets_it_through(built):
    from lpld.config.values import check_prune_ratio

    cfg = stage(built["root"], "stage=relabel", "prune=10x")
    cfg = cfg.with_values({"prune.ratio": "abc"})  # as an untyped (Any) schema field composes it
    with pytest.raises(ConfigError, match=r"prune.ratio='abc' is not a number; set prune=<1x"):
        check_prune_ratio(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible CUDA GPU")
def test_trainer_gpu_without_a_gpu_is_one_line_before_anything_moves(built):
    cfg = stage(built["root"], "stage=stats", "trainer=gpu", "stage.overwrite=true")
    assert_one_line(*run_cfg(cfg), ["trainer=gpu", "CUDA GPU", "trainer=cpu"], ("MisconfigurationException",))


def test_random_real_ipc_above_a_class_size_is_refused_before_the_image_folder_exists(built):
    cfg = stage(built["root"], "stage=recover", f"ipc={PER_CLASS + 1}")
    out = images_artifact.path(cfg)
    assert not out.exists()
    line = assert_one_line(*run_cfg(cfg), [f"ipc={PER_CLASS + 1}", f"has only {PER_CLASS}", f"ipc<={PER_CLASS}"])
    assert "recover=random_real" in line
    assert not out.exists(), "a refused recover left an (empty) image folder"


@pytest.mark.parametrize("which", ["relabel", "recover"])
def test_ipc_beyond_memory_is_refused_up_front_with_the_prediction(built, which):
    # relabel: 224 px, ipc 10**6 = 560 GiB of uint8 images; recover: 512 px, ipc 10**5 = PiB of optimised fp32
    # images (the recover plan walks every image: a smaller ipc keeps the test fast). Beyond any test machine, so
    # the check refuses them before anything is allocated
    if which == "recover":
        ipc = 100000
        cfg = stage(built["root"], "stage=recover", "recover=sre2l", "dataset.image_size=512", f"ipc={ipc}")
        save_random_teacher(cfg)
        out = images_artifact.path(cfg)
    else:
        ipc = 1000000
        cfg = stage(built["root"], "stage=relabel", "dataset.image_size=224", f"ipc={ipc}")
        out = None
    line = assert_one_line(*run_cfg(cfg), [f"ipc={ipc}", "does not fit in memory", "GiB", "lower ipc"])
    assert f"stage={which}" in line
    assert out is None or not out.exists()


# ----------------------------------------------------------------------------------------------------------------------
# models and checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def test_offline_pretrained_weights_are_one_line_and_fast(built, tmp_path, monkeypatch):
    import time

    import lpld.models.pretrained as pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # nothing cached
    monkeypatch.setattr(pretrained, "url_reachable", lambda url: False)  # offline, whatever this machine is
    ov = [o for o in stage_overrides(built["root"]) if not o.startswith("model")]
    cfg = compose_cfg([*ov, "stage=stats", "model=resnet18", "model.pretrained=true"])
    t0 = time.perf_counter()
    assert_one_line(*run_cfg(cfg), ["resnet18", "model.pretrained=false"])
    assert time.perf_counter() - t0 < 10
    assert issubclass(pretrained.PretrainedWeightsError, ConfigError)


def test_malicious_student_last_ckpt_is_refused_without_torchs_retry_hint(built):
    from lpld.stages.student import load_inputs, run_files

    cfg = built["student"]
    run_dir = run_files(cfg, load_inputs(cfg)).run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    last = run_dir / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Evil()}, last)
    try:
        line = assert_one_line(
            *run_cfg(cfg),
            [str(last), "not a plain-tensor file", "cannot be trusted", "delete it", "stage.overwrite=true"],
            forbidden=("weights_only=False", "weights_only` set to `False", "will likely succeed"),
        )
        assert "Evil" in line  # what the pickle wanted to build
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# label store whose manifest names a missing file
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["student verify=none", "relabel resume"])
def test_store_manifest_naming_a_missing_file_is_one_line_naming_the_store(built, tmp_path, which):
    from lpld.artifacts import labels

    root = built["root"]
    store = labels.path(stage(root, "stage=relabel"))
    backup = tmp_path / "store"
    shutil.copytree(store, backup)
    try:
        (store / "logits.npy").unlink()
        if which == "relabel resume":
            man = json.loads((store / "manifest.json").read_text())
            (store / "manifest.json").write_text(json.dumps({**man, "complete": False}))
            cfg = stage(root, "stage=relabel")
        else:
            cfg = stage(root, "stage=student", "stage.verify=none")
        assert_one_line(*run_cfg(cfg), [str(store), "logits.npy", "missing", "stage.overwrite=true"])
    finally:
        shutil.rmtree(store)
        shutil.copytree(backup, store)


# ----------------------------------------------------------------------------------------------------------------------
# stage=report on missing, empty or foreign results
# ----------------------------------------------------------------------------------------------------------------------
REPORT_CASES = [
    ("no results", None, ["no results at", "run stage=student", "stage.results"]),
    ("missing path", "nope.jsonl", ["nope.jsonl", "run stage=student", "stage.results"]),
    ("empty file", "", ["empty.jsonl is empty", "run stage=student", "stage.results"]),
    ("foreign object", '{"foo": 1}\n', ["foreign_object.jsonl", "not a results record", "stage.results"]),
    ("JSON list", "[1, 2]\n", ["JSON_list.jsonl:1", "not a results record", "stage.results"]),
]


@pytest.mark.parametrize("case", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_without_usable_results_is_one_line(tmp_path, case):
    name, content, needles = case
    args = ["stage=report", "logger=none", f"paths.root={tmp_path}"]
    if content is not None:
        f = tmp_path / ("empty.jsonl" if content == "" else f"{name.replace(' ', '_')}.jsonl")
        if name != "missing path":
            f.write_text(content)
        else:
            f = tmp_path / content
        args.append(f"stage.results={f}")
    assert_one_line(*run_cfg(compose_cfg(args)), needles)
    assert not list(tmp_path.rglob("report.md"))


# ----------------------------------------------------------------------------------------------------------------------
# a truncated image read by DataLoader workers
# ----------------------------------------------------------------------------------------------------------------------
def truncated_tree(root: Path) -> tuple[Path, Path]:
    data = write_image_tree(root / "data", n_classes=2, per_class=4, size=8)
    bad = sorted((data / "train" / "class01").glob("*.png"))[1]
    bad.write_bytes(bad.read_bytes()[:40])
    return data, bad


def test_truncated_image_through_dataloader_workers_is_one_line_naming_the_file(tmp_path):
    from torch.utils.data import DataLoader

    from lpld.data.datasets import FileImageDataset

    data, bad = truncated_tree(tmp_path)
    files = sorted(str(p) for p in (data / "train").rglob("*.png"))
    ds = FileImageDataset(files, [0] * len(files), ["a"], transform=lambda im: torch.zeros(1))
    with pytest.raises(DatasetError) as ei:
        list(DataLoader(ds, batch_size=2, num_workers=2))
    assert "DataLoader worker" in str(ei.value)  # the worker's re-raise carries its whole traceback...
    err = translate_error(ei.value)
    assert isinstance(err, DatasetError)
    assert str(err).startswith(f"image file {bad} cannot be decoded")  # ...the user sees the original message
    assert "Traceback" not in str(err) and "Replace it" in str(err) and "\n" not in str(err)


cli = run_cli  # tests/conftest.py


@pytest.mark.slow
def test_cli_truncated_png_with_two_workers_is_one_line(tmp_path):
    data, bad = truncated_tree(tmp_path)
    r = cli(
        tmp_path,
        "stage=squeeze",
        "dataset=imagefolder",
        f"dataset.root={data}",
        "dataset.num_classes=2",
        "dataset.image_size=8",
        "dataset.channels=3",
        "model=convnet",
        "model.width=8",
        "trainer.num_workers=2",
        "stage.epochs=1",
        "stage.batch_size=2",
    )
    assert_one_line(r.returncode, r.stderr, [str(bad), "truncated or corrupt", "Replace it"])


def test_cli_prune_ratio_abc_names_the_key(tmp_path):
    r = cli(tmp_path, "stage=storage", "prune=10x", "prune.ratio=abc")
    line = assert_one_line(r.returncode, r.stderr, ["prune.ratio='abc'", "not a number"], ("Error executing job",))
    assert "set prune" in line  # the fix names the key (or the prune group)


# ----------------------------------------------------------------------------------------------------------------------
# which errors are the user's: translate_error
# ----------------------------------------------------------------------------------------------------------------------
def test_file_not_found_is_a_user_error_only_for_user_paths(tmp_path):
    cfg = compose_cfg(["stage=storage", "logger=none", f"paths.root={tmp_path}"])
    art = Path(str(cfg.paths.artifacts)).resolve()

    def fnf(p: Path) -> FileNotFoundError:
        return FileNotFoundError(2, "No such file or directory", str(p))

    under_artifacts = translate_error(fnf(art / "demo" / "x" / "teacher.pt"), cfg)
    assert isinstance(under_artifacts, ArtifactError) and "teacher.pt" in str(under_artifacts)
    assert "stage.overwrite=true" in str(under_artifacts)
    bug = fnf(Path(__file__).parent / "no_such_module_file.py")  # not a user path: keeps its traceback
    assert translate_error(bug, cfg) is bug
    assert not isinstance(translate_error(bug, cfg), user_error_types())


def test_errors_from_below_lpld_become_user_errors():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lpld.report.table import ReportError

    oom = translate_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB"))
    assert isinstance(oom, ConfigError) and "lower ipc" in str(oom) and "stage=plan" in str(oom)
    gpu = translate_error(MisconfigurationException("No supported gpu backend found!"))
    assert isinstance(gpu, ConfigError) and "trainer=cpu" in str(gpu)
    rep = translate_error(ReportError("no results records match (check stage.results and stage.where)"))
    assert isinstance(rep, ConfigError) and "stage.where" in str(rep)
    other = RuntimeError("an internal bug")
    assert translate_error(other) is other


def test_relabel_module_refuses_chunk_zero():
    from lpld.lit.relabel_module import RelabelModule

    with pytest.raises(ConfigError, match="stage.chunk=0"):
        RelabelModule(
            torch.nn.Identity(), "unused", torch.zeros(1, 3, 2, 2, dtype=torch.uint8), [0.5] * 3, [0.5] * 3, 0
        )


def test_the_checks_pass_every_stage_default_and_a_gpu_plan_on_a_cpu_machine(tmp_path):
    from lpld.stages import STAGES
    from lpld.stages.preflight import preflight

    for name in STAGES:
        preflight(compose_cfg([f"stage={name}", "logger=none", f"paths.root={tmp_path}"]))
    # planning a GPU run needs no GPU (a login node), nor does a report
    preflight(compose_cfg(["stage=plan", "trainer=gpu", f"paths.root={tmp_path}"]))
    preflight(compose_cfg(["stage=report", "trainer=gpu", f"paths.root={tmp_path}"]))


@pytest.mark.parametrize("granularity", ["batch", "epoch"])
def test_unreachable_ratio_advice_names_batch_granularity_only_when_it_is_not_already(granularity):
    """Issue 19: the 40x refusal advised prune.granularity=batch when the pool was already per batch."""
    from lpld.core.label_store.spec import achieved_ratio
    from lpld.errors import ArtifactError

    with pytest.raises(ArtifactError) as e:
        achieved_ratio(6, 1, 1 - 1 / 40, "40x", "the schedule (3 epochs x 2 batches)", granularity)
    msg = str(e.value)
    assert "prune=40x asks for 40.0x" in msg and "choose a lower ratio" in msg
    assert ("prune.granularity=batch" in msg) == (granularity == "epoch")
