"""Typed schemas of the knob groups, registered with Hydra's ConfigStore (structured configs).

Every default lives here, once. The YAML files of ``conf/`` extend these schemas through their defaults
list (``- /schema/<group>/<name>@_here_``) and keep only what differs (a method's name, a preset's values),
so an unknown key (``recover.iteratons=5``) is refused when the config is composed, naming the key.

A knob whose default is ``None`` and which carries ``metadata={"recipe": <fallback>}`` (made by
:func:`recipe_knob`) takes the dataset's recipe value when unset, and the fallback when the recipe has
none: the precedence is written once in :mod:`lpld.config.precedence`.

Field types: strings, booleans and lists are typed. Whole-number and other numeric knobs are ``Any``:
lpld checks them itself (``lpld.stages.check_config_types``, the settings resolvers) so that a bad
value (``recover.iterations=1.5``, ``recover.lr=fast``) is refused with a message naming the fix.
"""

from __future__ import annotations

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
# recover (conf/recover/<method>.yaml)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RecoverBase:
    """Knobs of every recover method: how the work is split (not part of the output identity) and safety."""

    name: str = "lpld"
    classes_per_batch: Any = None  # classes per device batch (results do not depend on it); null = auto:
    max_batch_images: Any = 256  # ... as many classes as fit in this many images per device batch
    class_start: Any = 0  # synthesise classes [class_start, class_end)
    class_end: Any = None  # null = num_classes
    overwrite: bool = False  # replace a folder written with another config
    allow_other_teacher: bool = False  # accept class-wise stats recorded with another teacher
    stats_path: str | None = None  # null = the stats artifact of this config


@dataclass
class RecoverOptimize(RecoverBase):
    """Methods that optimise images from noise by BN matching (lpld, lpld_c; LPLD Eq. 6, Appendix C)."""

    # null = dataset.recipe.recover.<key> (Appendix C, Tables 11/14/17), else the fallback
    iterations: Any = recipe_knob(1000)
    lr: Any = recipe_knob(0.1)
    alpha: Any = recipe_knob(0.05, "BN-matching weight (Eq. 6 alpha)")
    first_bn_multiplier: Any = recipe_knob(10.0, "extra weight of the first BN layer (SRe2L-family code: 10)")
    tv_l2: Any = recipe_knob(1.0e-4, "total-variation L2 prior")
    l2: Any = recipe_knob(1.0e-5, "image L2-norm prior")
    jitter: Any = recipe_knob(4, "max random roll in pixels per step")
    betas: Any = recipe_knob([0.5, 0.9], "Adam betas")
    rrc_scale_min: Any = 0.08  # RandomResizedCrop area range per step
    rrc_scale_max: Any = 1.0
    flip: bool = True  # random horizontal flip per step
    init: str = "random"  # Gaussian noise (the only initialisation of Table 11)
    precision: str = "32-true"  # the math is defined in fp32 (batching equivalence, resume equality)
    # class-wise statistics file to read: null = the mode stage=stats writes for this dataset (recipe.stats.mode)
    stats_mode: str | None = None


@dataclass
class RecoverSlot(RecoverOptimize):
    """SRe2L-style methods: a batch holds image j of every class of a group (sre2l; Eq. 3)."""

    name: str = "sre2l"
    group_classes: Any = None  # null = min(num_classes, 100) (SRe2L's batch of 100 classes)


@dataclass
class CdaSchedule:
    schedule: str = "cosine"  # step | linear | cosine
    milestone: Any = 1.0  # fraction of the iterations spent annealing (CDA/README.md runs: --milestone 1)


@dataclass
class RecoverCda(RecoverSlot):
    """CDA: SRe2L + a curriculum on RandomResizedCrop's lower scale bound."""

    name: str = "cda"
    cda: CdaSchedule = field(default_factory=CdaSchedule)


@dataclass
class RdedKnobs:
    factor: Any = 2  # patches per side (image_size must be divisible by it)
    candidates_per_class: Any = 300  # real images sampled per class (RDED's mipc)
    crops_per_image: Any = 5  # random crops scored per real image; the best represents it
    crop_scale: Any = _list(0.08, 1.0)  # RandomResizedCrop area range of the crops
    # official: RDED's square crops (size/factor), scored zero-padded, rank-interleaved tiling | lpld: 3:4-4:3
    # crops scored full size, consecutive
    style: str = "official"


@dataclass
class RecoverRded(RecoverBase):
    """RDED (optimisation-free): stitch the teacher's most confident real-image crops."""

    name: str = "rded"
    rded: RdedKnobs = field(default_factory=RdedKnobs)


# ----------------------------------------------------------------------------------------------------------------------
# relabel (conf/relabel/<name>.yaml): what determines the label store's bytes
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RelabelConf:
    """FKD-style soft-label generation (the student replays this schedule). Unset knobs take the dataset's
    ``recipe.student`` value: the relabel schedule is the student's."""

    epochs: Any = recipe_knob(None, "student epochs of the full schedule (recipe student.epochs)")
    batch_size: Any = recipe_knob(None, "student batch size (recipe student.batch_size)")
    record_mode: str = "explicit"  # explicit: every augmentation parameter (paper accounting) | seed: one seed/batch
    mix: str | None = recipe_knob("cutmix", "cutmix | cutout | none (recipe student.mix; cutout for in21k)")
    rrc_scale: Any = recipe_knob([0.08, 1.0], "RandomResizedCrop area range (recipe student.rrc_scale)")
    rrc_ratio: Any = _list(0.75, 1.3333333333333333)
    flip: bool | None = recipe_knob(True, "horizontal flip (recipe student.flip; in21k: false)")
    cutmix_alpha: Any = 1.0
    cutout_factor: Any = 0.5
    # issue 12 (docs/fidelity.md): the official 21K Cutout colour and RDED's ShufflePatches (Table 8)
    cutout_fill: str | None = recipe_knob("zero", "zero (0, normalised) | random (RGB 0..255 per image; in21k)")
    shuffle_patches: Any = recipe_knob(0, "RDED ShufflePatches before the crop: 0 off | f (table8_rded: 2)")
    # short last batch of each epoch: auto = dropped when pruning (official generator) | true (paper: always)
    # | false (always kept)
    drop_last: Any = "auto"
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
    epochs: Any = recipe_knob(None, "null = recipe, else the store's epochs")
    batch_size: Any = None  # must equal the label store's batch size (checked); null = the store's
    optimizer: str | None = recipe_knob("adamw", "adamw | sgd | adam")
    lr: Any = recipe_knob(1e-3)
    weight_decay: Any = recipe_knob(0.01)
    wd_exclude_bn_bias: bool | None = recipe_knob(True, "no decay on BN/bias params (official get_parameters)")
    momentum: Any = recipe_knob(0.9, "sgd only")
    warmup_epochs: Any = recipe_knob(0, "linear warm-up from warmup_start x lr")
    warmup_start: Any = 0.01
    scheduler: str | None = recipe_knob("cosine", "cosine | smooth_cosine | constant")
    label_smoothing: Any = recipe_knob(0.0, "smooths the soft target (kl, mse_gt) or hard labels (ce)")
    smoothing_space: str | None = recipe_knob("probs", "probs: (1-eps)p + eps/C | logits (official in21k)")
    loss: str = "kl"  # kl (KL at temperature T) | mse_gt (G-VBSM MSE + gamma x CE) | ce (hard labels)
    gamma: Any = 0.1  # mse_gt: weight of the ground-truth cross-entropy
    mse_target: str | None = recipe_knob("logits", "mse_gt: logits (G-VBSM) | probs")
    kd_t2: bool | None = recipe_knob(False, "KL x T^2 (official LPLD/LPQLD code: Tiny-ImageNet only)")
    temperature: Any = recipe_knob(4.0, "T0 of the stored labels (in1k: 20)")
    # Dynamic Knowledge Reuse (LPQLD): none | step | step_reverse | cosine | cosine_reverse
    temp_schedule: str = "none"
    temp_step_size: Any = 30  # step: epochs per step
    temp_gamma: Any = 0.7  # step: decay per step
    temp_floor: Any = 2.0  # step: lower bound (0 = none)
    temp_min: Any = 1.0  # cosine: end temperature
    temp_epoch_base: Any = 1  # epoch number of the first epoch in the DKR formulas (1: the public LPQLD code)
    # Calibrated Alignment (LPQLD): the student's softmax temperature. none (= T) | fixed | search
    ca: str = "none"
    ca_value: Any = 1.0  # fixed value, or the start value of search
    ca_grid: Any = _list(0.01, 1.0, 100)  # search: lo, hi, number of evenly spaced candidates
    granularity: str | None = None  # label pool: epoch | batch (ILP); null = the store's
    accumulate: Any = 1  # gradient accumulation: slices per stored batch (one optimizer step per stored batch)
    ema_decay: Any = 0.0  # > 0: validate an EMA of the weights


# ----------------------------------------------------------------------------------------------------------------------
# quant, prune
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class QuantConf:
    """Label quantization (LPQLD): none | mr | ms | hard, ``k`` kept classes."""

    name: str = REQUIRED  # every option names itself (conf/quant/<name>.yaml)
    mode: str = REQUIRED  # the label codec (lpld.core.quant registry)
    k: Any = 0
    temperature: Any = 1.0  # ms: null = the student's KD temperature; unused by the other modes


@dataclass
class PruneConf:
    """Label pruning (LPLD Sec. 3.3): keep a (1 - ratio) share of the relabel schedule's batches."""

    name: str = REQUIRED  # every option names itself (conf/prune/<name>.yaml)
    ratio: Any = REQUIRED  # share of the schedule's batches dropped: 1 - 1/factor
    granularity: str = "batch"  # batch = the improved label pool | epoch = whole epochs


# ----------------------------------------------------------------------------------------------------------------------
# stage nodes (conf/stage/<name>.yaml): how a stage runs; `name` selects the stage module
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SqueezeStage:
    """Train the teacher. ``None`` = ``dataset.recipe.squeeze.<key>``, else the fallback."""

    name: str = "squeeze"
    epochs: Any = recipe_knob(10)
    batch_size: Any = recipe_knob(128)
    optimizer: str | None = recipe_knob("sgd", "sgd | adamw | adam")
    lr: Any = recipe_knob(0.05)
    weight_decay: Any = recipe_knob(5e-4)
    momentum: Any = recipe_knob(0.9)
    warmup_epochs: Any = recipe_knob(0)
    label_smoothing: Any = recipe_knob(0.0)
    val_every: Any = 1  # epochs between validations
    overwrite: bool = False  # retrain even if a finished teacher exists


@dataclass
class StatsStage:
    """Class-wise BN statistics of the teacher over the train set (one pass, eval mode)."""

    name: str = "stats"
    # null = dataset.recipe.stats.mode (in1k/tiny/in21k: official; small datasets: exact), else exact.
    # official: ClassAwareBatchNorm2d's EMA (momentum 0.1, biased var, init 0/1) as the LPLD code
    # exact: pooled float64 mean/var over every image | ema: official update with unbiased var
    mode: str | None = None
    momentum: Any = 0.1  # official / ema modes
    batch_size: Any = 256  # the official forward pass's batch (the EMA depends on it; exact does not)
    augment: bool | None = None  # null = true for official (RandomResizedCrop + flip), else false
    max_images: Any = None  # limit for quick runs; null = the whole train set
    overwrite: bool = False


@dataclass
class RecoverStage:
    name: str = "recover"
    progress_every: Any = 25  # iterations between progress-bar / W&B loss updates
    log_images: bool = True  # a uint8 grid per device batch to W&B (when logger.log_images)


@dataclass
class RelabelStage:
    """How stage=relabel runs (not what it writes: that is the ``relabel`` group)."""

    name: str = "relabel"
    chunk: Any = 32  # batches between commits (resume granularity)
    batches_per_forward: Any = None  # stored batches per teacher forward (null: fill 256 rows)
    num_workers: Any = None  # DataLoader workers for augmentation (null: trainer.num_workers)
    allow_other_teacher: bool = False
    overwrite: bool = False  # replace an existing store made from a different config


@dataclass
class StudentStage:
    name: str = "student"
    store: str | None = None  # explicit label-store directory; null = the relabel stage's path for this config
    verify: str = "fast"  # label-store integrity check on open: fast | full | none
    allow_other_teacher: bool = False  # accept images synthesised by a different teacher than model=
    val_every: Any = 10  # epochs between validations (the final validation always runs)
    val_batch_size: Any = 256
    results_name: str = "results"  # records go to <artifacts>/<dataset>/results/<results_name>.jsonl
    overwrite: bool = False  # retrain even if this exact run already finished
    num_workers: Any = 0  # DataLoader workers for the stored batches; null = trainer.num_workers
    ckpt_every: Any = 1  # epochs between checkpoints: an interrupted run resumes from the newest one


@dataclass
class StorageStage:
    name: str = "storage"
    path: str | None = None
    image_bytes_per_image: Any = None  # null = uint8 pixels; e.g. 16000 for ImageNet JPEGs (Table 24)
    verify: str = "fast"  # fast | full | none (when reading a store)


@dataclass
class PlanStage:
    name: str = "plan"
    world_size: Any = None  # null = the trainer preset's devices x num_nodes
    runtime_gib: Any = 3.0  # Python + PyTorch + CUDA runtime per rank (host), added to the host estimates
    tasks_per_node: Any = None  # for the SLURM memory line; null = min(world_size, 8)


@dataclass
class ReportStage:
    name: str = "report"
    results: str | None = None  # a .jsonl file or a folder of them; null = results_name, else the results folder
    results_name: str | None = None  # a results file of this dataset by name (what student/pipeline wrote)
    rows: list[str] = _list("ipc")  # record fields (or config paths) indexing the rows
    cols: list[str] = _list("prune")  # ... and the columns
    value: str = "top1"  # numeric field shown in the cells
    where: dict[str, Any] = field(default_factory=dict)  # keep only records whose fields equal these
    digits: Any = 1  # decimals in the cells
    scale: Any = 100.0  # multiply values before formatting (fractions -> percent)
    ddof: Any = 1  # std over seeds: 1 = sample std, 0 = population std
    title: str | None = None  # heading of report.md; null = derived from the results file name
    pareto: bool = True  # also draw top-1 vs total storage
    pareto_group: str = "method"  # one colour per value of this field
    out_dir: str | None = None  # null = <results folder>/reports/<results file stem, or "all">


@dataclass
class Eq8Knobs:
    """Eq. 8 / Appendix E.3 (defaults = the appendix's values)."""

    batch_size: Any = 256
    T: Any = 0.05
    delta: Any = 0.2
    eps: Any = 0.1  # BN momentum
    C: Any = 1.0
    tau: Any = 0.01


@dataclass
class AnalyzeStage:
    name: str = "analyze"
    mode: str = "full"  # full | eq8
    methods: list[str] = _list("lpld", "sre2l", "cda")
    image_dirs: dict[str, Any] = field(default_factory=dict)  # extra {label: /path/to/distilled dir}
    missing: str = "skip"  # a listed method without images: skip (logged) | error
    allow_other_teacher: bool = False
    real_per_class: Any = 50  # real train images sampled per class; null = all
    feature_batch_size: Any = 256
    mmd_estimator: str = "unbiased"  # unbiased (U-statistic) | biased (Eq. 5 as printed)
    mmd_bandwidth: Any = None  # Gaussian kernel sigma; null = median heuristic on the real features
    mmd_max_points: Any = 2048
    grid_classes: Any = 3
    grid_per_class: Any = 10
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


# ----------------------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------------------

# ConfigStore group -> {name: schema}; YAML files extend them with `- /schema/<group>/<name>@_here_`
SCHEMAS: dict[str, dict[str, type]] = {
    "schema/recover": {
        "base": RecoverBase,
        "optimize": RecoverOptimize,
        "slot": RecoverSlot,
        "cda": RecoverCda,
        "rded": RecoverRded,
    },
    "schema/relabel": {"relabel": RelabelConf},
    "schema/student": {"student": StudentConf},
    "schema/quant": {"quant": QuantConf},
    "schema/prune": {"prune": PruneConf},
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
    },
}


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; done when ``lpld.config`` is imported)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=group, name=name, node=node)


def unknown_keys(cfg: Any) -> list[str]:
    """Dotted keys of the typed nodes of ``cfg`` that their schema does not define.

    Hydra refuses ``recover.iteratons=5`` when composing, but ``+recover.iteratons=5`` (append) adds the key to
    the typed node anyway; :func:`check_known_keys` refuses it before a stage runs, so a typo is never ignored.
    """
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    bad: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        kind = OmegaConf.get_type(node)
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            return  # a plain mapping (arch_knobs, where, steps ...): any key is data
        fields_ = {f.name for f in dataclasses.fields(kind)}
        for k in node.keys():
            if k not in fields_:
                bad.append(f"{prefix}{k}")
            elif isinstance(node._get_node(k), DictConfig):
                walk(node._get_node(k), f"{prefix}{k}.")

    for group in ("recover", "relabel", "student", "quant", "prune", "stage"):
        node = cfg.get(group) if hasattr(cfg, "get") else None
        if isinstance(node, DictConfig):
            walk(node, f"{group}.")
    return bad


def check_known_keys(cfg: Any) -> None:
    """Refuse keys the typed schemas do not define (e.g. a typo appended with ``+``), naming them.

    Raises:
        ConfigError: the unknown keys and where the valid ones are listed.
    """
    from lpld.errors import ConfigError

    bad = unknown_keys(cfg)
    if bad:
        raise ConfigError(
            f"unknown config key(s) {', '.join(bad)}: not a knob of their group (the valid knobs and their defaults "
            "are in lpld/config/schema.py); check the spelling"
        )
