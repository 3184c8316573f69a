"""Every config group has a typed schema (lpld/config/schema.py, issue 18): an unknown key anywhere is refused with
its name and the closest valid keys, a value of the wrong type names its key, and typing changes no resolved value
or artifact key."""

from __future__ import annotations

import pytest
from conftest import CONF, run_cli
from omegaconf import OmegaConf

from lpld.config.compose import compose
from lpld.config.schema import GROUPS, bad_values, check_known_keys, unknown_keys
from lpld.errors import ConfigError

# group -> (a typo of one of its keys, the key it should suggest, overrides that select a node holding that key)
TYPOS = {
    "dataset": ("dataset.num_clases", "dataset.num_classes", []),
    "dataset.recipe": ("dataset.recipe.student.lrr", "dataset.recipe.student.lr", []),
    "model": ("model.widht", "model.width", []),
    "model(resnet)": ("model.small_stme", "model.small_stem", ["model=resnet18"]),
    "trainer": ("trainer.num_worker", "trainer.num_workers", []),
    "trainer.perf": ("trainer.perf.tf33", "trainer.perf.tf32", []),
    "trainer.stage_precision": ("trainer.stage_precision.studnt", "trainer.stage_precision.student", []),
    "logger": ("logger.log_image", "logger.log_images", ["logger=csv"]),
    "paths": ("paths.artifact", "paths.artifacts", []),
    "metric": ("metric.drop_eazy", "metric.drop_easy", []),
    "stage": ("stage.epoch", "stage.epochs", ["stage=squeeze"]),
    "recover": ("recover.iteratons", "recover.iterations", []),
    "relabel": ("relabel.epoch", "relabel.epochs", []),
    "student": ("student.tempreature", "student.temperature", []),
    "quant": ("quant.kk", "quant.k", []),
    "prune": ("prune.rate", "prune.ratio", []),
}


def test_every_group_has_a_schema_and_is_checked():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()} - {"experiment", "hydra"}  # experiment merges into them
    assert groups == set(GROUPS), groups ^ set(GROUPS)
    assert {t.split(".")[0].split("(")[0] for t in TYPOS} == set(GROUPS)
    cfg = compose([])
    for g in GROUPS:  # each group's composed node is typed by a dataclass
        kind = OmegaConf.get_type(cfg[g])
        assert kind is not dict and kind.__module__.startswith("lpld."), (g, kind)


@pytest.mark.parametrize("case", sorted(TYPOS))
def test_unknown_key_is_refused_naming_it_and_the_closest_valid_key(case):
    key, near, select = TYPOS[case]
    # plain override: Hydra refuses it while composing; lpld makes that one line with the closest valid keys
    with pytest.raises(ConfigError) as e:
        compose([*select, f"{key}=1"])
    assert f"unknown config key {key} " in str(e.value) and near in str(e.value) and "\n" not in str(e.value)
    # appended with `+`: Hydra adds it, lpld refuses it before any stage runs
    cfg = compose([*select, f"+{key}=1"])
    assert key in unknown_keys(cfg)
    with pytest.raises(ConfigError) as e:
        check_known_keys(cfg)
    assert key in str(e.value) and near in str(e.value)


@pytest.mark.parametrize("extra", ["+trainer.fast_dev_run=true", "+trainer.limit_test_batches=2", "+model.bar=1"])
def test_lightning_and_other_foreign_keys_are_refused(extra):
    key = extra[1:].split("=")[0]
    with pytest.raises(ConfigError, match=rf"unknown config key {key} \(closest valid keys: {key.split('.')[0]}\."):
        check_known_keys(compose(["stage=stats", extra]))


def test_ipc_table_entries_and_dataset_extras_are_checked():
    cfg = compose(["+dataset.recipe.ipc_table.10.studnet.batch_size=8"])
    assert unknown_keys(cfg) == ["dataset.recipe.ipc_table.10.studnet"]
    cfg = compose(["+dataset.recipe.ipc_table.10.student.bach_size=8"])
    assert unknown_keys(cfg) == ["dataset.recipe.ipc_table.10.student.bach_size"]
    # opt-in dataset switches are not keys of a preset (the teacher's identity), but `+` may add them, typed
    check_known_keys(compose(["dataset=in1k", "+dataset.jpeg_draft=true"]))
    with pytest.raises(ConfigError, match=r"dataset\.jpeg_draft='maybe' is not true/false"):
        check_known_keys(compose(["dataset=in1k", "+dataset.jpeg_draft=maybe"]))


@pytest.mark.parametrize(
    "override, message",
    [
        ("student.lr=fast", "student.lr='fast' is not a number; set student.lr=<number>"),
        ("student.epochs=1.5", "student.epochs=1.5 is not a whole number; set student.epochs=<integer>, e.g."),
        ("quant.k=2.5", "quant.k=2.5 is not a whole number"),
        ("prune.ratio=abc", "prune.ratio='abc' is not a number"),
        ("relabel.cutmix_alpha=abc", "relabel.cutmix_alpha='abc' is not a number"),
        ("dataset.image_size=big", "dataset.image_size='big' is not a whole number"),
        ("dataset.mean=[a]", "dataset.mean[0]='a' is not a number"),
        ("model.width=1.5", "model.width=1.5 is not a whole number"),
        ("trainer.num_workers=two", "trainer.num_workers='two' is not a whole number"),
        ("trainer.perf.tf32=maybe", "trainer.perf.tf32='maybe' is not true/false"),
        ("metric.drop_hard=lots", "metric.drop_hard='lots' is not a number"),
        ("logger.log_images=sometimes", "logger.log_images='sometimes' is not true/false"),
        ("stage=report stage.digits=1.5", "stage.digits=1.5 is not a whole number"),
        # recover's knob dataclasses (lpld.core.recover_methods) are typed too
        ("recover.iterations=1.5", "recover.iterations=1.5 is not a whole number"),
        ("recover.lr=fast", "recover.lr='fast' is not a number"),
        ("recover.class_end=1.5", "recover.class_end=1.5 is not a whole number"),
        ("recover=rded recover.rded.factor=two", "recover.rded.factor='two' is not a whole number"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_key(override, message):
    with pytest.raises(ConfigError) as e:
        compose(override.split())
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("ipc=2.5", "ipc=2.5 is not a whole number; set ipc=<integer>, e.g. ipc=2"),
        ("seed=abc", "seed='abc' is not a whole number; set seed=<integer>"),
        ("teacher_seed=1.5", "teacher_seed=1.5 is not a whole number"),
        ("dataset.recipe.student.epochs=ten", "dataset.recipe.student.epochs='ten' is not a whole number"),
        ("dataset.recipe.recover.lr=fast", "dataset.recipe.recover.lr='fast' is not a number"),
    ],
)
def test_values_the_composed_nodes_do_not_type_are_checked_before_a_stage_runs(override, message):
    cfg = compose([override])  # composes: these nodes hold any value
    assert any(message in m for m in bad_values(cfg)), bad_values(cfg)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.").replace("[", r"\[")):
        check_known_keys(cfg)


def _compose_every_option(groups: list[str]) -> int:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    n = 0
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for group in groups:
            for f in sorted((CONF / group).glob("*.yaml")):
                extra = ["dataset.num_classes=7"] if f.stem == "imagefolder" else []
                cfg = hydra_compose(config_name="config", overrides=[f"{group}={f.stem}", *extra])
                assert not unknown_keys(cfg) and not bad_values(cfg), (group, f.stem, unknown_keys(cfg))
                n += 1
    GlobalHydra.instance().clear()
    return n


def test_every_option_of_the_new_schema_groups_composes():
    """Fast tier: the groups test_config.py does not compose option by option (it does dataset, model, stage)."""
    assert _compose_every_option(["trainer", "logger", "paths", "metric", "quant"]) >= 20


@pytest.mark.slow
def test_every_option_of_every_group_composes_with_no_unknown_key_or_bad_value():
    groups = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
    assert _compose_every_option(groups) >= 80


def test_typing_keeps_whole_numbers_whole_and_makes_real_numbers_float():
    """An int-typed knob fed 1 stays int, a float-typed one becomes 1.0; the resolvers give the same values."""
    from lpld.config import relabel_settings, student_settings

    cfg = compose(["model.width=64", "student.lr=1", "relabel.cutmix_alpha=1", "trainer.devices=2"])
    assert type(cfg.model.width) is int and type(cfg.trainer.devices) is int
    assert type(cfg.student.lr) is float and cfg.student.lr == 1.0
    man = {"epochs": 5, "granularity": "batch", "quant": {"mode": "none"}}
    assert student_settings(cfg, man)["lr"] == 1.0 and relabel_settings(cfg)["cutmix_alpha"] == 1.0
    # the dataset / model nodes keep exactly the keys (and key order) of their preset: the teacher's identity
    ds = compose(["dataset=in1k"]).dataset
    assert list(ds) == [
        *("name", "type", "num_classes", "channels", "image_size", "mean", "std", "root", "train_dir", "val_dir"),
        *("in_memory", "download", "train_aug", "rrc_scale", "hflip", "eval_crop_ratio", "recipe"),
    ]
    assert list(compose(["model=resnet18_cifar"]).model) == ["name", "pretrained", "checkpoint", "tag"]


# artifact keys of the default job and of dataset / model presets as they were before the schemas (main fd1c9f1)
KEYS = {
    "dataset=in1k model=convnet stage=student": (
        "convnet-4f706fee",
        "official_c31d2101",
        "lpld_ipc10_seed0_80579899",
        "self_cutmix_1x-batch_none_explicit_s0_e300b128_f1c9b32d",
    ),
    "dataset=tiny model=convnet stage=relabel": (
        "convnet-3a1265a7",
        "official_ec246b34",
        "lpld_ipc10_seed0_74a9dee1",
        "self_none_1x-batch_none_explicit_s0_e100b64_dc643e1d",
    ),
    "dataset=cifar10_jpg stage=recover": (
        "convnet-686f6c80",
        "exact_a20914fe",
        "lpld_ipc10_seed0_cd541ccc",
        "self_cutmix_1x-batch_none_explicit_s0_e300b32_97cc852f",
    ),
    "model=resnet18 dataset=cifar10 stage=student": (
        "resnet18-de7ad206",
        "exact_bfc67301",
        "lpld_ipc10_seed0_05887ae4",
        "self_cutmix_1x-batch_none_explicit_s0_e300b32_26aa95a4",
    ),
    "model=swinv2_tiny dataset=cifar10 stage=student": (
        "swinv2_tiny-dfa18261",
        "exact_0e27c6dd",
        "lpld_ipc10_seed0_de15e450",
        "self_cutmix_1x-batch_none_explicit_s0_e300b32_8e22fd3c",
    ),
}


# issue 20 (deliberate): the images are stored as JPEG q75 after truncation by default, which is part of their
# identity, so the default images keys (and the keys of the label stores made from them) are new; teacher and
# stats keys are unchanged, and the lossless switch finds every artifact of KEYS under its old key
LOSSLESS = ("recover.image_format=png", "recover.quantize=round")
NEW_IMAGES_LABELS = {
    "dataset=in1k model=convnet stage=student": (
        "lpld_ipc10_seed0_73cf5ac9",
        "self_cutmix_1x-batch_none_explicit_s0_e300b128_75039d27",
    ),
    "dataset=tiny model=convnet stage=relabel": (
        "lpld_ipc10_seed0_ab205329",
        "self_none_1x-batch_none_explicit_s0_e100b64_75a38239",
    ),
    "dataset=cifar10_jpg stage=recover": (
        "lpld_ipc10_seed0_4389b758",
        "self_cutmix_1x-batch_none_explicit_s0_e300b50_4128e4ec",
    ),
    "model=resnet18 dataset=cifar10 stage=student": (
        "lpld_ipc10_seed0_c04c55af",
        "self_cutmix_1x-batch_none_explicit_s0_e300b50_e317af82",
    ),
    "model=swinv2_tiny dataset=cifar10 stage=student": (
        "lpld_ipc10_seed0_815fdd61",
        "self_cutmix_1x-batch_none_explicit_s0_e300b50_5806cb9b",
    ),
}

# issue 20 item 10 (deliberate): the CIFAR presets recover with the roll alone (SRe2L recover_cifar.py) and relabel with
# RDED's batch (ipc 10: 50), so their images and label keys are new again; these switches find the keys of before
SMALL_BEFORE = ("recover.augment=rrc", "relabel.batch_size=32")
BEFORE_ITEM10 = {
    "dataset=cifar10_jpg stage=recover": (
        "lpld_ipc10_seed0_51be9a6e",
        "self_cutmix_1x-batch_none_explicit_s0_e300b32_452047dc",
    ),
    "model=resnet18 dataset=cifar10 stage=student": (
        "lpld_ipc10_seed0_c9e0b05c",
        "self_cutmix_1x-batch_none_explicit_s0_e300b32_88dbd180",
    ),
    "model=swinv2_tiny dataset=cifar10 stage=student": (
        "lpld_ipc10_seed0_947472fb",
        "self_cutmix_1x-batch_none_explicit_s0_e300b32_5bb8b09f",
    ),
}


@pytest.mark.parametrize("overrides", sorted(KEYS))
def test_artifact_keys_of_the_presets_are_unchanged(overrides):
    from lpld.artifacts import images, labels, stats, teacher
    from lpld.config.experiment import freeze

    small = SMALL_BEFORE if overrides in BEFORE_ITEM10 else ()
    old = freeze(compose([*overrides.split(), *LOSSLESS, *small]))
    assert (teacher.key(old), stats.spec(old).key(), images.key(old), labels.key(old)) == KEYS[overrides]
    cfg = freeze(compose(overrides.split()))
    assert (teacher.key(cfg), stats.spec(cfg).key()) == KEYS[overrides][:2]
    assert (images.key(cfg), labels.key(cfg)) == NEW_IMAGES_LABELS[overrides]
    if small:
        before = freeze(compose([*overrides.split(), *small]))
        assert (images.key(before), labels.key(before)) == BEFORE_ITEM10[overrides]


_cli = run_cli  # tests/conftest.py


@pytest.mark.parametrize(
    "arg, line",
    [
        (
            "recover.iteratons=5",
            "lpld error: unknown config key recover.iteratons (closest valid keys: recover.iterations",
        ),
        pytest.param(
            "+trainer.fast_dev_run=true",
            "lpld error: unknown config key trainer.fast_dev_run (closest valid keys: trainer.",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "student.lr=fast",
            "lpld error: student.lr='fast' is not a number; set student.lr=<number>",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_the_command_line_prints_one_line_and_exits_1(tmp_path, arg, line):
    r = _cli(tmp_path, "stage=storage", arg)
    assert r.returncode == 1, r.stderr[-2000:]
    assert line in r.stderr and "Traceback" not in r.stderr and "full_key" not in r.stderr, r.stderr[-2000:]
