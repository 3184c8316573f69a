"""Typed schemas of the knob groups, registered with Hydra's ConfigStore (structured configs).

Every default lives here, once. The YAML files of ``conf/`` extend these schemas through their defaults
list (``- /schema/<group>/<name>@_here_``) and keep only what differs (a method's name, a preset's values),
so an unknown key (``recover.iteratons=5``) is refused when the config is composed, naming the key.

A knob whose default is ``None`` and which carries ``metadata={"recipe": <fallback>}`` (made by
:func:`recipe_knob`) takes the dataset's recipe value when unset, and the fallback when the recipe has
none: the precedence is written once in :mod:`lpld.config.precedence`.

Every group of ``conf/`` has a schema here (dataset, model, trainer, logger, paths, metric, stage, relabel,
student, quant, prune; recover's live with the methods in :mod:`lpld.core.recover_methods`). A preset whose keys
are part of an artifact's identity (dataset, model) gets one schema per key layout, so that its keys stay exactly
what they were. Field types are real: whole numbers are ``int``, real numbers ``float`` (``1`` becomes ``1.0``;
the resolvers convert either way, so resolved values and artifact keys do not depend on it), ``Any`` only where
a value may legitimately be a list or a string. A bad value (``student.lr=fast``, ``quant.k=2.5``) is refused
when the config is composed, naming its key (:func:`lpld.config.compose.explain_compose_error` makes that one
line). What the composed node cannot type is checked by :func:`check_known_keys` before a stage runs: a key
appended with ``+`` that no schema defines (named with the closest valid keys), the top-level ``ipc`` /
``seed`` / ``teacher_seed``, the ``dataset.recipe`` sections (mappings, checked against the knobs they stand
in for) and the ``+dataset.<key>`` extras (:data:`DATASET_EXTRAS`).
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from omegaconf import MISSING as REQUIRED  # "???": a value every YAML option must set

# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def recipe_knob(fallback: Any, doc: str = "") -> Any:
    """A knob that is ``None`` (unset) by default: the dataset recipe's value applies, else ``fallback``."""
    if isinstance(fallback, list):
        return field(default=None, metadata={"recipe": list(fallback), "doc": doc})
    return field(default=None, metadata={"recipe": fallback, "doc": doc})


def fallback(schema: type, key: str) -> Any:
    """The schema default of ``key`` in ``schema``: a recipe knob's fallback, else the field's default.

    Raises:
        KeyError: ``key`` is not a field of ``schema``.
    """
    for f in fields(schema):
        if f.name == key:
            if "recipe" in f.metadata:
                v = f.metadata["recipe"]
                return list(v) if isinstance(v, list) else v
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            return None
    raise KeyError(f"{schema.__name__} has no knob {key!r}")


def _list(*values: Any) -> Any:
    return field(default_factory=lambda: list(values))


# ----------------------------------------------------------------------------------------------------------------------
# recover (conf/recover/<method>.yaml): each method's knob dataclass lives with the method in lpld.core.recover_methods
# ----------------------------------------------------------------------------------------------------------------------

from lpld.core.recover_methods import (  # noqa: E402, F401 - re-exported under their old names
    CdaSchedule,
    RdedKnobs,
    RecoverBase,
    RecoverCda,
    RecoverOptimize,
    RecoverRded,
    RecoverSlot,
    recover_schemas,
)

# ----------------------------------------------------------------------------------------------------------------------
# relabel (conf/relabel/<name>.yaml): what determines the label store's bytes
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RelabelConf:
    """FKD-style soft-label generation (the student replays this schedule). Unset knobs take the dataset's
    ``recipe.student`` value: the relabel schedule is the student's."""

    epochs: int | None = recipe_knob(None, "student epochs of the full schedule (recipe student.epochs)")
    batch_size: int | None = recipe_knob(None, "student batch size (recipe student.batch_size)")
    record_mode: str = "explicit"  # explicit: every augmentation parameter (paper accounting) | seed: one seed/batch
    mix: str | None = recipe_knob("cutmix", "cutmix | cutout | none (recipe student.mix; cutout for in21k)")
    rrc_scale: list[float] | None = recipe_knob([0.08, 1.0], "RandomResizedCrop area range (recipe student.rrc_scale)")
    rrc_ratio: list[float] = _list(0.75, 1.3333333333333333)
    flip: bool | None = recipe_knob(True, "horizontal flip (recipe student.flip; in21k: false)")
    cutmix_alpha: float = 1.0
    cutout_factor: float = 0.5
    # issue 12 (docs/fidelity.md): the official 21K Cutout colour and RDED's ShufflePatches (Table 8)
    cutout_fill: str | None = recipe_knob("zero", "zero (0, normalised) | random (RGB 0..255 per image; in21k)")
    shuffle_patches: int | None = recipe_knob(0, "RDED ShufflePatches before the crop: 0 off | f (table8_rded: 2)")
    # short last batch of each epoch: swap = stored, but a drawn last batch of an epoch is trained as the batch before
    # it (official main-table generator + trainer) | auto = dropped from the store when pruning (the official
    # generator's own rule, lpld before issue 20) | true (paper: always dropped) | false (always kept and trained)
    drop_last: Any = "swap"
    # ensemble (G-VBSM): list of model-config mappings merged over `model`, e.g. [{name: resnet18}, ...]
    teachers: Any = None
    ensemble: str = "mean_logits"  # mean_logits | mean_probs
    ensemble_rescale: bool = True  # G-VBSM: scale each teacher's logits to the teachers' mean Frobenius norm
    precision: str = "32-true"  # teacher forward precision (stores are compared bit for bit across ranks)


# ----------------------------------------------------------------------------------------------------------------------
# student (conf/student/<name>.yaml): LPLD "validate"; Tables 12, 15, 18
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class StudentConf:
    """Student training knobs; ``None`` = the dataset's ``recipe.student`` (with its ipc_table), else fallback."""

    arch: str | None = None  # registry model name (cross-architecture runs); null = the teacher's
    arch_knobs: dict[str, Any] = field(default_factory=dict)  # architecture knobs of `arch`
    epochs: int | None = recipe_knob(None, "null = recipe, else the store's epochs")
    batch_size: int | None = None  # must equal the label store's batch size (checked); null = the store's
    optimizer: str | None = recipe_knob("adamw", "adamw | sgd | adam")
    lr: float | None = recipe_knob(1e-3)
    weight_decay: float | None = recipe_knob(0.01)
    wd_exclude_bn_bias: bool | None = recipe_knob(True, "no decay on BN/bias params (official get_parameters)")
    momentum: float | None = recipe_knob(0.9, "sgd only")
    warmup_epochs: float | None = recipe_knob(0, "linear warm-up from warmup_start x lr")
    warmup_start: float = 0.01
    scheduler: str | None = recipe_knob("cosine", "cosine | smooth_cosine | constant")
    label_smoothing: float | None = recipe_knob(0.0, "smooths the soft target (kl, mse_gt) or hard labels (ce)")
    smoothing_space: str | None = recipe_knob("probs", "probs: (1-eps)p + eps/C | logits (official in21k)")
    loss: str = "kl"  # kl (KL at temperature T) | mse_gt (G-VBSM MSE + gamma x CE) | ce (hard labels)
    gamma: float = 0.1  # mse_gt: weight of the ground-truth cross-entropy
    mse_target: str | None = recipe_knob("logits", "mse_gt: logits (G-VBSM) | probs")
    kd_t2: bool | None = recipe_knob(False, "KL x T^2 (official LPLD/LPQLD code: Tiny-ImageNet only)")
    temperature: float | None = recipe_knob(4.0, "T0 of the stored labels (in1k: 20)")
    # Dynamic Knowledge Reuse (LPQLD): none | step | step_reverse | cosine | cosine_reverse
    temp_schedule: str = "none"
    temp_step_size: int = 30  # step: epochs per step
    temp_gamma: float = 0.7  # step: decay per step
    temp_floor: float = 2.0  # step: lower bound (0 = none)
    temp_min: float = 1.0  # cosine: end temperature
    temp_epoch_base: int = 1  # epoch number of the first epoch in the DKR formulas (1: the public LPQLD code)
    # Calibrated Alignment (LPQLD): the student's softmax temperature. none (= T) | fixed | search
    ca: str = "none"
    ca_value: float = 1.0  # fixed value, or the start value of search
    ca_grid: list[float] = _list(0.01, 1.0, 100)  # search: lo, hi, number of evenly spaced candidates
    granularity: str | None = None  # label pool: epoch | batch (ILP); null = the store's
    accumulate: int = 1  # gradient accumulation: slices per stored batch (one optimizer step per stored batch)
    ema_decay: float = 0.0  # > 0: validate an EMA of the weights
    # where the soft labels come from: stored (the label store of this config) | online (no store: the teacher
    # labels each augmented batch during training, SRe2L/RDED online protocol; its fp16 bytes are counted)
    labels: str = "stored"  # ... | generator (a small ConvNet trained on the teacher's outputs, queried online)
    generator_width: int = 32  # labels=generator: channels of the narrow ConvNet (lpld.core.label_generator)
    generator_depth: int = 3  # ... its conv blocks
    generator_passes: int = 1  # ... passes over the (1x) schedule's augmentations, drawn from its own seed
    generator_lr: float = 3e-3  # ... Adam learning rate (cosine to 0)
    # which epochs train on hard labels (lpld.core.label_schedule): none (all soft) | hald (HALD soft -> hard -> soft)
    label_schedule: str = "none"
    hard_epochs: int | None = None  # hald: hard epochs H of the E (null = E // 2, HALD's imagenet1k script 150 of 300)
    hard_smoothing: float = 0.8  # hald: label smoothing of the hard phase (HALD --label-smoothing 0.8)
    # BatchNorm rows of the student's training forward (issue 20; lpld.core.ghost_bn): each group of bn_rows rows is
    # normalised on its own at any world size (ghost BN; a group spans ranks when one rank has fewer rows). The official
    # ImageNet students ran under 4-GPU DataParallel:
    # in1k 128 / 4 = 32, in21k 32 / 4 = 8; Tiny one GPU: 64 (recipe student.bn_rows). 0 = each rank's whole forward
    # (lpld before issue 20; the rows then depend on the world size); null = the recipe's, else 0
    bn_rows: int | None = recipe_knob(None, "BatchNorm rows per group; 0 = a rank's forward (recipe student.bn_rows)")
    bn_running: str = "first"  # running statistics: first (the first group's, as DataParallel / DDP keep) | mean
    sync_bn: bool = False  # SyncBatchNorm over every rank's rows (DDP on GPUs); replaces the recipe's bn_rows


# ----------------------------------------------------------------------------------------------------------------------
# quant, prune
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class QuantConf:
    """Label quantization (LPQLD): none | mr | ms | hard, ``k`` kept classes."""

    name: str = REQUIRED  # every option names itself (conf/quant/<name>.yaml)
    mode: str = REQUIRED  # the label codec (lpld.core.quant registry)
    k: int = 0
    temperature: float | None = 1.0  # ms: null = the student's KD temperature; unused by the other modes
    params: Any = field(default_factory=dict)  # a codec's own knobs (LabelCodec.params), quant.params.<name>


@dataclass
class PruneConf:
    """Label pruning (LPLD Sec. 3.3): keep a (1 - ratio) share of the relabel schedule's batches."""

    name: str = REQUIRED  # every option names itself (conf/prune/<name>.yaml)
    ratio: float = REQUIRED  # share of the schedule's batches dropped: 1 - 1/factor
    granularity: str = "batch"  # batch = the improved label pool | epoch = whole epochs
    # which units the store keeps: first = the first K of the schedule (official trainer, pool[:K]) | random = a
    # seeded random subset (the paper's text; lpld before issue 20)
    pool_select: str = "first"
    # how each student epoch draws its batches from the pool (granularity batch): with_replacement (official
    # torch.randint) | without_replacement (a permutation of the pool; lpld before issue 20)
    draw: str = "with_replacement"


# ----------------------------------------------------------------------------------------------------------------------
# stage nodes (conf/stage/<name>.yaml): how a stage runs; `name` selects the stage module
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SqueezeStage:
    """Train the teacher. ``None`` = ``dataset.recipe.squeeze.<key>``, else the fallback."""

    name: str = "squeeze"
    epochs: int | None = recipe_knob(10)
    batch_size: int | None = recipe_knob(128)
    optimizer: str | None = recipe_knob("sgd", "sgd | adamw | adam")
    lr: float | None = recipe_knob(0.05)
    weight_decay: float | None = recipe_knob(5e-4)
    momentum: float | None = recipe_knob(0.9)
    warmup_epochs: float | None = recipe_knob(0)
    label_smoothing: float | None = recipe_knob(0.0)
    # BatchNorm rows per group of the teacher's training forward (ghost BN, lpld.core.ghost_bn; issue 20): the same
    # groups at any world size, e.g. 1 GPU with bn_rows=B/8 trains the 8-GPU teacher. 0 = each rank's whole forward
    # (the torchvision / timm DDP recipes; the rows then depend on the world size)
    bn_rows: int | None = recipe_knob(0, "BatchNorm rows per group; 0 = a rank's forward (recipe squeeze.bn_rows)")
    val_every: int = 1  # epochs between validations
    overwrite: bool = False  # retrain even if a finished teacher exists


@dataclass
class StatsStage:
    """Class-wise BN statistics of the teacher over the train set (one pass, eval mode)."""

    name: str = "stats"
    # null = dataset.recipe.stats.mode (in1k/tiny/in21k: official; small datasets: exact), else exact.
    # official: ClassAwareBatchNorm2d's EMA (momentum 0.1, biased var, init 0/1) as the LPLD code
    # exact: pooled float64 mean/var over every image | ema: official update with unbiased var
    mode: str | None = None
    momentum: float = 0.1  # official / ema modes
    # the official forward pass's batch (the EMA depends on it; exact does not); null = recipe stats.batch_size
    # (in21k: 1024, paper Table 16), else 256
    batch_size: int | None = recipe_knob(256, "images per EMA update (recipe stats.batch_size; in21k 1024)")
    augment: bool | None = None  # null = true for official (RandomResizedCrop + flip), else false
    max_images: int | None = None  # limit for quick runs; null = the whole train set
    overwrite: bool = False


@dataclass
class RecoverStage:
    name: str = "recover"
    progress_every: int = 25  # iterations between progress-bar / W&B loss updates
    log_images: bool = True  # a uint8 grid per device batch to W&B (when logger.log_images)


@dataclass
class RelabelStage:
    """How stage=relabel runs (not what it writes: that is the ``relabel`` group)."""

    name: str = "relabel"
    chunk: int = 32  # batches between commits (resume granularity)
    batches_per_forward: int | None = None  # stored batches per teacher forward (null: fill 256 rows)
    num_workers: int | None = None  # DataLoader workers for augmentation (null: trainer.num_workers)
    allow_other_teacher: bool = False
    overwrite: bool = False  # replace an existing store made from a different config


@dataclass
class StudentStage:
    name: str = "student"
    store: str | None = None  # explicit label-store directory; null = the relabel stage's path for this config
    verify: str = "fast"  # label-store integrity check on open: fast | full | none
    allow_other_teacher: bool = False  # accept images synthesised by a different teacher than model=
    val_every: int = 10  # epochs between validations (the final validation always runs)
    val_batch_size: int = 256
    results_name: str = "results"  # records go to <artifacts>/<dataset>/results/<results_name>.jsonl
    overwrite: bool = False  # retrain even if this exact run already finished
    num_workers: int | None = 0  # DataLoader workers for the stored batches; null = trainer.num_workers
    ckpt_every: int = 1  # epochs between checkpoints: an interrupted run resumes from the newest one


@dataclass
class StorageStage:
    name: str = "storage"
    path: str | None = None
    image_bytes_per_image: float | None = None  # null = uint8 pixels; e.g. 16000 for ImageNet JPEGs (Table 24)
    verify: str = "fast"  # fast | full | none (when reading a store)


@dataclass
class PlanStage:
    name: str = "plan"
    world_size: int | None = None  # null = the trainer preset's devices x num_nodes
    runtime_gib: float = 3.0  # Python + PyTorch + CUDA runtime per rank (host), added to the host estimates
    tasks_per_node: int | None = None  # for the SLURM memory line; null = min(world_size, 8)


@dataclass
class ReportStage:
    name: str = "report"
    results: str | None = None  # a .jsonl file or a folder of them; null = results_name, else the results folder
    results_name: str | None = None  # a results file of this dataset by name (what student/pipeline wrote)
    rows: list[str] = _list("ipc")  # record fields (or config paths) indexing the rows
    cols: list[str] = _list("prune")  # ... and the columns
    value: str = "top1"  # numeric field shown in the cells
    where: dict[str, Any] = field(default_factory=dict)  # keep only records whose fields equal these
    digits: int = 1  # decimals in the cells
    scale: float = 100.0  # multiply values before formatting (fractions -> percent)
    ddof: int = 1  # std over seeds: 1 = sample std, 0 = population std
    title: str | None = None  # heading of report.md; null = derived from the results file name
    pareto: bool = True  # also draw top-1 vs total storage
    pareto_group: str = "method"  # one colour per value of this field
    out_dir: str | None = None  # null = <results folder>/reports/<results file stem, or "all">
    # DD-Ranking's HLR needs acc(full real training set, hard labels) as a fraction: null = the mean of the
    # records with method full_real (frontier.md leaves HLR / LRS blank without either)
    real_hard_top1: float | None = None


@dataclass
class Eq8Knobs:
    """Eq. 8 / Appendix E.3 (defaults = the appendix's values)."""

    batch_size: int = 256
    T: float = 0.05
    delta: float = 0.2
    eps: float = 0.1  # BN momentum
    C: float = 1.0
    tau: float = 0.01


@dataclass
class AnalyzeStage:
    name: str = "analyze"
    mode: str = "full"  # full | eq8
    methods: list[str] = _list("lpld", "sre2l", "cda")
    image_dirs: dict[str, Any] = field(default_factory=dict)  # extra {label: /path/to/distilled dir}
    missing: str = "skip"  # a listed method without images: skip (logged) | error
    allow_other_teacher: bool = False
    real_per_class: int | None = 50  # real train images sampled per class; null = all
    feature_batch_size: int = 256
    mmd_estimator: str = "unbiased"  # unbiased (U-statistic) | biased (Eq. 5 as printed)
    mmd_bandwidth: float | None = None  # Gaussian kernel sigma; null = median heuristic on the real features
    mmd_max_points: int = 2048
    grid_classes: int = 3
    grid_per_class: int = 10
    per_class_grids: bool = True
    eq8: Eq8Knobs = field(default_factory=Eq8Knobs)
    class_counts: Any = None  # Eq. 8 from these per-class train counts instead of reading the train set
    out_dir: str | None = None


@dataclass
class PipelineStage:
    name: str = "pipeline"
    methods: list[str] = _list("lpld")  # recover methods run over every ratio in `prunes`
    prunes: list[str] = _list("1x", "10x", "40x")  # label pruning ratios (conf/prune/)
    baselines: list[str] = _list("sre2l", "random_real")  # recover methods run at `baseline_prunes` only
    baseline_prunes: list[str] = _list("1x")
    hard_labels: bool = True  # also train the student of `methods[0]` on hard labels (student=hard)
    quant: str | None = None  # null = the quant group of this run
    results_name: str | None = None  # null = pipeline_<model>_ipc<ipc>
    report: bool = True  # print the table and write the Pareto plot at the end
    # extra overrides per step, as Hydra override strings, e.g. "stage.steps.student=['student.epochs=50']";
    # knobs every step must see (recover.*, relabel.*: they decide which images / label store the next step
    # opens) go on the pipeline's own command line, and relabel.* in a step is refused
    steps: dict[str, list[str]] = field(
        default_factory=lambda: {"squeeze": [], "stats": [], "recover": [], "relabel": [], "student": []}
    )


@dataclass
class ShowStage:
    """``stage=show``: print the resolved experiment of ``stage.of`` and the artifacts it reads / writes."""

    name: str = "show"
    of: str = "pipeline"  # the stage to describe (the default job: pipeline)
    # knobs of the shown stage's own node (stage.epochs of squeeze ...): add show=true to that stage's command
    # instead (`python run.py stage=squeeze stage.epochs=5 show=true`)


# ----------------------------------------------------------------------------------------------------------------------
# dataset (conf/dataset/<name>.yaml): one schema per key layout, so each preset's keys (the teacher's identity:
# lpld.artifacts.teacher hashes the dataset node) stay exactly what they were; keys in the YAML files' order
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RecipeConf:
    """``dataset.recipe``: the dataset's value of each knob a stage leaves null (lpld.config.precedence).

    The sections are mappings so that a preset lists only the knobs it sets (and ``~dataset.recipe.<s>.<k>``
    removes one); their keys and values are checked against :data:`RECIPE_SECTIONS` before a stage runs.
    ``ipc_table`` maps an ipc threshold to ``{<section>: {<knob>: value}}`` merged over the sections for runs
    with ipc >= that threshold (the largest matching threshold wins).
    """

    squeeze: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    recover: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    ipc_table: dict[Any, Any] = field(default_factory=dict)  # YAML keys are ints, command-line ones strings
    # image-size threshold -> {<section>: {<knob>: value}} (or {refuse: "<reason and fix>"}), merged over the sections
    # (under ipc_table) for dataset.image_size >= that threshold; dataset.recipe.size_table=null: off (issue 20)
    size_table: dict[Any, Any] | None = field(default_factory=dict)
    # recover method -> recover knobs of that method's official run on this dataset (issue 20: SRe2L's Tiny script
    # uses --r-bn 1, CDA's Tiny command --lr 0.4), merged over `recover` and its ipc_table entry for that method only
    recover_by_method: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeStats:
    mode: str | None = None  # official | exact | ema: what stage=stats writes and recover reads
    batch_size: int | None = None  # images per EMA update of the official pass (in21k: 1024)


@dataclass
class RecipeRecover:
    """The optimisation knobs an optimize recover method takes from the recipe (Appendix C, Tables 11/14/17)."""

    iterations: int | None = None
    lr: float | None = None
    betas: list[float] | None = None
    alpha: float | None = None
    first_bn_multiplier: float | None = None
    tv_l2: float | None = None
    l2: float | None = None
    jitter: int | None = None
    augment: str | None = None  # rrc | roll (roll only: SRe2L small_dataset/recover_cifar.py)


# recipe section -> the schemas whose knobs it may set (a key is checked against the first schema that has it)
RECIPE_SECTIONS: dict[str, tuple[type, ...]] = {
    "squeeze": (SqueezeStage,),
    "stats": (RecipeStats,),
    "recover": (RecipeRecover,),
    "student": (StudentConf, RelabelConf),  # the relabel schedule replays the student's
}
_NOT_RECIPE = {"squeeze": ("name", "val_every", "overwrite"), "student": ("arch", "arch_knobs", "granularity")}

# keys a dataset preset may add with `+dataset.<key>=` although its layout does not list them (opt-in switches,
# and the augmentation knobs of the other layouts), with their types
DATASET_EXTRAS: dict[str, Any] = {
    "jpeg_draft": bool,  # RDED / random-real selection: PIL draft decoding of large JPEGs (README "GPU")
    "val_per_class": int,
    "crop_padding": int,
    "rrc_scale": list[float],
}


@dataclass
class PadCropDataset:
    """Small-image datasets (cifar10, cifar100, cifar10_jpg, fmnist): pad-crop-flip training augmentation."""

    name: str = REQUIRED  # also the artifact folder name
    type: str = REQUIRED  # loader: cifar10 | cifar100 | fmnist | demo | tiny_imagenet | imagefolder
    num_classes: int = REQUIRED
    channels: int = 3
    image_size: int = REQUIRED  # square side in pixels the models see
    mean: list[float] = REQUIRED  # per channel, on [0, 1] pixels
    std: list[float] = REQUIRED
    root: str | None = None  # where the files are (not part of the teacher's identity)
    train_dir: str | None = None
    val_dir: str | None = None
    in_memory: bool = False  # decode every image once into RAM
    download: bool = False  # fetch with torchvision when missing (needs internet)
    train_aug: str | None = None  # pad_crop_flip | rrc_flip; null = pad_crop_flip for image_size <= 32, else rrc_flip
    crop_padding: int = 4  # pad_crop_flip: pixels of zero padding before the random crop
    hflip: bool = True
    eval_crop_ratio: float = 1.0  # eval: resize to image_size / ratio, center-crop image_size
    recipe: RecipeConf = field(default_factory=RecipeConf)


@dataclass
class DemoDataset:
    """The bundled Fashion-MNIST test split (dataset=demo): a stratified train/val split of it."""

    name: str = "demo"
    type: str = "demo"
    num_classes: int = 10
    channels: int = 1
    image_size: int = 28
    mean: list[float] = REQUIRED
    std: list[float] = REQUIRED
    root: str | None = None
    train_dir: str | None = None
    val_dir: str | None = None
    val_per_class: int = 200  # the rest of each class is train
    in_memory: bool = True
    download: bool = False
    train_aug: str | None = None
    crop_padding: int = 2
    hflip: bool = True
    eval_crop_ratio: float = 1.0
    recipe: RecipeConf = field(default_factory=RecipeConf)


@dataclass
class RrcDataset:
    """ImageNet-style datasets (in1k, in21k, tiny): RandomResizedCrop-flip training augmentation."""

    name: str = REQUIRED
    type: str = REQUIRED
    num_classes: int = REQUIRED
    channels: int = 3
    image_size: int = REQUIRED
    mean: list[float] = REQUIRED
    std: list[float] = REQUIRED
    root: str | None = None
    train_dir: str | None = None
    val_dir: str | None = None
    in_memory: bool = False
    download: bool = False
    train_aug: str | None = None
    rrc_scale: list[float] = _list(0.08, 1.0)  # rrc_flip: RandomResizedCrop area range
    hflip: bool = True
    eval_crop_ratio: float = 1.0
    recipe: RecipeConf = field(default_factory=RecipeConf)


@dataclass
class FolderDataset:
    """Any class-folder dataset (dataset=imagefolder): both augmentations' knobs (train_aug picks by size)."""

    name: str = REQUIRED
    type: str = "imagefolder"
    num_classes: int = REQUIRED
    channels: int = 3
    image_size: int = REQUIRED
    mean: list[float] = REQUIRED
    std: list[float] = REQUIRED
    root: str | None = None
    train_dir: str | None = "train"
    val_dir: str | None = "val"
    in_memory: bool = False
    download: bool = False
    train_aug: str | None = None
    crop_padding: int = 4
    rrc_scale: list[float] = _list(0.08, 1.0)
    hflip: bool = True
    eval_crop_ratio: float = 1.0
    recipe: RecipeConf = field(default_factory=RecipeConf)


# ----------------------------------------------------------------------------------------------------------------------
# model (conf/model/<name>.yaml): the registry's common keys plus the architecture's knobs (lpld.models builders'
# keyword-only parameters), one schema per knob set so that each preset's keys (the teacher's identity) stay
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConf:
    """Networks without architecture knobs (resnet*_cifar, mobilenetv2, efficientnet_b0, shufflenetv2)."""

    name: str = REQUIRED  # registry name (lpld.models)
    pretrained: bool = False  # the published ImageNet-1k weights
    checkpoint: str | None = None  # a local torch.save'd state dict (wins over pretrained)
    tag: str | None = None  # extra identity of the artifact paths (<name>-<tag>)


@dataclass
class ConvNetModel:
    """ConvNet-D of the dataset-distillation literature."""

    name: str = "convnet"
    width: int = 128
    depth: int = 3
    norm: str = "batch"  # batch | instance | none
    pretrained: bool = False
    checkpoint: str | None = None
    tag: str | None = None


@dataclass
class ResNetModel:
    """torchvision ResNets with the stem switch (resnet18, resnet50, resnet101)."""

    name: str = REQUIRED
    small_stem: bool = False  # 3x3 stride-1 conv1, no max-pool (CIFAR / Tiny-ImageNet)
    pretrained: bool = False
    checkpoint: str | None = None
    tag: str | None = None


@dataclass
class SwinModel:
    """timm Swin-V2 tiny built for the dataset's image size."""

    name: str = "swinv2_tiny"
    window_size: int | None = None  # null = the largest window <= 8 tiling every stage map
    pretrained: bool = False
    checkpoint: str | None = None
    tag: str | None = None


# ----------------------------------------------------------------------------------------------------------------------
# trainer (conf/trainer/<preset>.yaml): where and how Lightning runs (never part of an artifact's identity except the
# precision of the stats pass and of the student)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class StagePrecision:
    """Per-stage override of ``trainer.precision`` (null: ``trainer.precision``); recover/relabel have their own."""

    squeeze: str | None = None
    stats: str | None = None
    student: str | None = None


@dataclass
class PerfConf:
    """Performance options (lpld.lit.perf.PerfOptions): all but ``channels_last`` act on CUDA devices only."""

    cudnn_benchmark: bool = False
    tf32: bool = False
    channels_last: bool = False
    compile_teacher: bool = False  # torch.compile the frozen teacher (stats, recover, relabel)
    compile_student: bool = False  # torch.compile the trained network (squeeze, student)
    compile_mode: str | None = None  # null | reduce-overhead | max-autotune


@dataclass
class TrainerConf:
    accelerator: str = "cpu"  # cpu | gpu
    devices: Any = 1  # a count (-1: every visible GPU), a list of device ids or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn
    precision: str = "32-true"  # squeeze and student (and any stage not in stage_precision)
    stage_precision: StagePrecision = field(default_factory=StagePrecision)
    perf: PerfConf = field(default_factory=PerfConf)
    num_workers: int = 2  # DataLoader workers


# ----------------------------------------------------------------------------------------------------------------------
# logger, paths, metric
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class LoggerConf:
    """logger=none. ``group``: the W&B group of the runs of one pipeline / sweep (set by the pipeline)."""

    name: str = "none"
    log_images: bool = False
    group: str | None = None


@dataclass
class CsvLoggerConf:
    name: str = "csv"
    dir: str = "${paths.log_dir}"
    log_images: bool = False
    group: str | None = None


@dataclass
class WandbLoggerConf:
    """Lightning's WandbLogger; ``mode`` (not ``offline: true``, which rewrites the environment of later jobs)."""

    name: str = "wandb"
    project: str = "lpld"
    entity: str | None = None
    mode: str = "${oc.env:WANDB_MODE,offline}"
    dir: str = "${oc.env:WANDB_DIR,${paths.log_dir}}"  # logger.dir=... on the command line > WANDB_DIR > log_dir
    log_images: bool = True
    # null = the pipeline's results name (stage=pipeline sets it for its steps), else the sweep's name, else none
    group: str | None = None


@dataclass
class PathsConf:
    """Where things live (conf/paths/default.yaml sets them: environment variables, else below ``root``)."""

    root: str = REQUIRED
    artifacts: str = REQUIRED  # every artifact, at deterministic paths built from config values
    data: str = REQUIRED  # the datasets' default roots
    log_dir: str = REQUIRED  # Hydra's run dirs, logs


@dataclass
class MetricConf:
    """Label-pool candidate selection (LPLD Table 5): random = the store generated at ``prune``."""

    name: str = "random"  # random | confidence | correct | cut_ratio | diff | diff_signed
    order: str = "random"  # easy | hard | uniform (evenly spaced ranks) | random (after calibration); random: unused
    drop_easy: float = 0.0  # Table 5b calibration: share of the easiest batches discarded first
    drop_hard: float = 0.0  # share of the hardest batches discarded first
    source_prune: str = "1x"  # prune option (conf/prune/<name>.yaml) of the store a metric selects from


@dataclass
class ArtifactsStage:
    """``stage=artifacts``: list what exists for the dataset (key values, complete or not)."""

    name: str = "artifacts"
    kind: str | None = None  # one kind only: teacher | stats | images | labels | student | results


# ----------------------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------------------

# ConfigStore group -> {name: schema}; YAML files extend them with `- /schema/<group>/<name>@_here_`
SCHEMAS: dict[str, dict[str, type]] = {
    "schema/recover": recover_schemas(),  # base + every registered method's knob dataclass
    "schema/relabel": {"relabel": RelabelConf},
    "schema/student": {"student": StudentConf},
    "schema/quant": {"quant": QuantConf},
    "schema/prune": {"prune": PruneConf},
    "schema/dataset": {"padcrop": PadCropDataset, "demo": DemoDataset, "rrc": RrcDataset, "folder": FolderDataset},
    "schema/model": {"model": ModelConf, "convnet": ConvNetModel, "resnet": ResNetModel, "swin": SwinModel},
    "schema/trainer": {"trainer": TrainerConf},
    "schema/logger": {"none": LoggerConf, "csv": CsvLoggerConf, "wandb": WandbLoggerConf},
    "schema/paths": {"paths": PathsConf},
    "schema/metric": {"metric": MetricConf},
    "schema/stage": {
        "squeeze": SqueezeStage,
        "stats": StatsStage,
        "recover": RecoverStage,
        "relabel": RelabelStage,
        "student": StudentStage,
        "storage": StorageStage,
        "plan": PlanStage,
        "report": ReportStage,
        "analyze": AnalyzeStage,
        "pipeline": PipelineStage,
        "show": ShowStage,
        "artifacts": ArtifactsStage,
    },
}


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; done when ``lpld.config`` is imported)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=group, name=name, node=node)


# groups whose nodes the schemas type (every group of conf/ but the hydra launcher and `experiment`, which is
# merged into these), and the top-level whole numbers
GROUPS = (
    "dataset",
    "model",
    "stage",
    "recover",
    "prune",
    "relabel",
    "quant",
    "metric",
    "student",
    "logger",
    "trainer",
    "paths",
)
TOP_LEVEL_INTS = {"ipc": 10, "seed": 0, "teacher_seed": 0}  # key -> an example value for the message


@dataclass(frozen=True)
class UnknownKey:
    """A key no schema defines: its dotted name and the valid keys of its node."""

    key: str
    valid: tuple[str, ...]
    schema: str  # the schema that lists the valid keys

    def message(self) -> str:
        return f"{self.key} ({close_keys(self.key, self.valid, self.schema)})"


def close_keys(key: str, valid: Any, where: str = "") -> str:
    """``closest valid keys: a.b, a.c`` for the unknown dotted ``key`` among ``valid`` (its node's keys)."""
    import difflib

    prefix, _, leaf = key.rpartition(".")
    valid = sorted(str(v) for v in valid)
    near = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.6) or difflib.get_close_matches(leaf, valid, 3, 0)
    full = ", ".join(f"{prefix}.{v}" if prefix else v for v in near)
    more = f"; all of them and their defaults: lpld/config/schema.py {where}" if where else ""
    return f"closest valid keys: {full}{more}" if near else f"the node has no keys{more}"


def _fields(kind: type) -> dict[str, Any]:
    import dataclasses

    return {f.name: f for f in dataclasses.fields(kind)}


def _unknown(cfg: Any) -> list[UnknownKey]:
    """Every key of ``cfg``'s groups that its schema does not define (recipe sections and ipc_table entries
    included), with the valid keys of its node."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    bad: list[UnknownKey] = []

    def walk(node: Any, prefix: str, extras: dict[str, Any]) -> None:
        kind = OmegaConf.get_type(node)
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            return  # a plain mapping (arch_knobs, where, steps ...): any key is data
        fields_ = _fields(kind)
        for k in node.keys():
            if k not in fields_ and k not in extras:
                bad.append(UnknownKey(f"{prefix}{k}", tuple(fields_), f"({kind.__name__})"))
            elif k == "recipe" and kind in DATASET_SCHEMAS:
                walk_recipe(node._get_node(k), f"{prefix}{k}.")
            elif isinstance(node._get_node(k), DictConfig):
                walk(node._get_node(k), f"{prefix}{k}.", {})

    def walk_recipe(recipe: Any, prefix: str) -> None:
        walk(recipe, prefix, {})
        for section in RECIPE_SECTIONS:
            sec = recipe.get(section)
            if sec is not None:
                walk_section(sec, section, f"{prefix}{section}.")
        for method, entry in (recipe.get("recover_by_method") or {}).items():
            if entry is not None:
                walk_section(entry, "recover", f"{prefix}recover_by_method.{method}.")
        for table, extra in (("ipc_table", ()), ("size_table", ("refuse",))):
            for ipc, entry in (recipe.get(table) or {}).items():
                _walk_entry(entry, f"{prefix}{table}.{ipc}.", extra)

    def _walk_entry(entry: Any, where: str, extra: tuple[str, ...]) -> None:
        for section in entry or {}:
            if section in extra:
                continue
            if section not in RECIPE_SECTIONS:
                bad.append(UnknownKey(f"{where}{section}", tuple(RECIPE_SECTIONS) + extra, "(RecipeConf)"))
            elif entry[section] is not None:
                walk_section(entry[section], section, f"{where}{section}.")

    def walk_section(sec: Any, section: str, prefix: str) -> None:
        valid = recipe_keys(section)
        for k in sec.keys():
            if k not in valid:
                names = "/".join(s.__name__ for s in RECIPE_SECTIONS[section])
                bad.append(UnknownKey(f"{prefix}{k}", tuple(valid), f"({names}: the recipe knobs)"))

    for group in GROUPS:
        node = cfg.get(group) if hasattr(cfg, "get") else None
        if isinstance(node, DictConfig):
            walk(node, f"{group}.", DATASET_EXTRAS if group == "dataset" else {})
    return bad


def recipe_keys(section: str) -> dict[str, type]:
    """The knobs ``dataset.recipe.<section>`` may set -> the schema that types each."""
    out: dict[str, type] = {}
    for schema in RECIPE_SECTIONS[section]:
        for name in _fields(schema):
            if name not in _NOT_RECIPE.get(section, ()):
                out.setdefault(name, schema)
    return out


def unknown_keys(cfg: Any) -> list[str]:
    """Dotted keys of ``cfg``'s groups that their schemas do not define.

    Hydra refuses ``recover.iteratons=5`` when composing, but ``+recover.iteratons=5`` (append) adds the key to
    the typed node anyway; :func:`check_known_keys` refuses it before a stage runs, so a typo is never ignored.
    """
    return [u.key for u in _unknown(cfg)]


def bad_values(cfg: Any) -> list[str]:
    """One message per value no schema types, that is of the wrong kind: the top-level whole numbers, the
    ``+dataset.<key>`` extras, the recipe sections' knobs, and the numbers of the recover knob dataclasses
    (typed ``Any``: a knob whose default is a whole number takes whole numbers, a real-valued one numbers)."""
    from omegaconf import DictConfig, OmegaConf

    out: list[str] = []
    for key, example in TOP_LEVEL_INTS.items():
        v = cfg.get(key) if hasattr(cfg, "get") else None
        if v is not None and not _whole(v):
            out.append(_not_whole(key, v, example))
    ds = cfg.get("dataset") if hasattr(cfg, "get") else None
    if isinstance(ds, DictConfig):
        for key, kind in DATASET_EXTRAS.items():
            if key in ds and OmegaConf.get_type(ds) in DATASET_SCHEMAS and key not in _fields(OmegaConf.get_type(ds)):
                msg = _typed(kind, ds.get(key), f"dataset.{key}")
                out += [msg] if msg else []
        recipe = ds.get("recipe")
        if isinstance(recipe, DictConfig):
            sections = [(s, recipe.get(s), f"dataset.recipe.{s}") for s in RECIPE_SECTIONS]
            for table in ("ipc_table", "size_table"):
                for ipc, entry in (recipe.get(table) or {}).items():
                    sections += [(s, v, f"dataset.recipe.{table}.{ipc}.{s}") for s, v in (entry or {}).items()]
            for m, v in (recipe.get("recover_by_method") or {}).items():
                sections.append(("recover", v, f"dataset.recipe.recover_by_method.{m}"))
            for section, sec, where in sections:
                if section in RECIPE_SECTIONS and sec is not None:
                    out += _section_values(section, sec, where)
    rc = cfg.get("recover") if hasattr(cfg, "get") else None
    if isinstance(rc, DictConfig):
        out += _any_numbers(rc, "recover.")
    return out


def _whole(v: Any) -> bool:
    import re

    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, str) and re.fullmatch(r"[+-]?\d+", v.strip()) is not None)


def _not_whole(key: str, v: Any, example: Any = None) -> str:
    hint = int(v) if isinstance(v, float) and v == v and abs(v) != float("inf") else example
    return f"{key}={v!r} is not a whole number; set {key}=<integer>" + ("" if hint is None else f", e.g. {key}={hint}")


def _typed(kind: Any, v: Any, key: str) -> str | None:
    """The message for ``v`` not of ``kind`` (bool, int, float, list[float]), else None."""
    from omegaconf import ListConfig

    if v is None:
        return None
    if kind is bool and not isinstance(v, bool):
        return f"{key}={v!r} is not true/false; set {key}=true or {key}=false"
    if kind is int and not _whole(v):
        return _not_whole(key, v)
    if kind is float and (isinstance(v, bool) or not isinstance(v, int | float)):
        return f"{key}={v!r} is not a number; set {key}=<number>"
    if kind == list[float]:
        numbers = isinstance(v, ListConfig | list) and all(isinstance(x, int | float) for x in v)
        if not numbers or any(isinstance(x, bool) for x in v):
            return f"{key}={v!r} is not a list of numbers; set e.g. {key}=[0.08,1.0]"
    return None


def _section_values(section: str, sec: Any, where: str) -> list[str]:
    """The recipe knobs of one section checked against the type of the schema field they stand in for."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    out: list[str] = []
    keys = recipe_keys(section)
    for k in sec.keys():
        if k not in keys or sec.get(k) is None:
            continue
        try:
            OmegaConf.merge(_structured(keys[k]), {k: sec.get(k)})
        except OmegaConfBaseException:
            out.append(_value_message(f"{where}.{k}", sec.get(k), _fields(keys[k])[k].type))
    return out


@functools.cache
def _structured(schema: type) -> Any:
    """The schema as an OmegaConf node (made once: merging a value into it checks the value's type)."""
    from omegaconf import OmegaConf

    return OmegaConf.structured(schema)


def _value_message(key: str, v: Any, annotation: Any) -> str:
    """``<key>=<value> is not <kind>; set <key>=<kind>`` from a field's annotation (a string or a type)."""
    ann = str(annotation)
    if "bool" in ann:
        return f"{key}={v!r} is not true/false; set {key}=true or {key}=false"
    if "list" in ann:
        return f"{key}={v!r} is not a list of numbers; set {key}=[...]"
    if "int" in ann:
        return _not_whole(key, v)
    if "float" in ann:
        return f"{key}={v!r} is not a number; set {key}=<number>"
    return f"{key}={v!r} has the wrong type ({ann})"


def _any_numbers(node: Any, prefix: str) -> list[str]:
    """Numbers of the ``Any``-typed knobs of a typed node, judged by the knob's default (recover's dataclasses)."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    kind = OmegaConf.get_type(node)
    if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
        return []
    out: list[str] = []
    for name, f in _fields(kind).items():
        if name not in node:
            continue
        child = node._get_node(name)
        if isinstance(child, DictConfig):
            out += _any_numbers(child, f"{prefix}{name}.")
            continue
        if f.type not in (Any, "Any"):
            continue
        d = fallback(kind, name)
        v = node.get(name)
        if v is None or isinstance(d, bool) or not isinstance(d, int | float):
            continue
        msg = _typed(int if isinstance(d, int) else float, v, f"{prefix}{name}")
        out += [msg] if msg else []
    return out


def check_known_keys(cfg: Any) -> None:
    """Refuse what the typed schemas cannot: a key no schema defines (a typo appended with ``+``, a recipe knob
    no stage reads) and a value of the wrong kind where the node is not typed (top-level ``ipc`` / ``seed`` /
    ``teacher_seed``, the ``+dataset.<key>`` extras, the recipe sections, recover's ``Any`` knobs).

    Raises:
        ConfigError: each unknown key with the closest valid keys of its node; or each bad value with its key.
    """
    from lpld.errors import ConfigError

    bad = _unknown(cfg)
    if bad:
        what = "; ".join(u.message() for u in bad)
        raise ConfigError(f"unknown config key{'s' if len(bad) > 1 else ''} {what}; check the spelling")
    values = bad_values(cfg)
    if values:
        raise ConfigError("; ".join(values))


DATASET_SCHEMAS = (PadCropDataset, DemoDataset, RrcDataset, FolderDataset)
