"""Resolved knobs of stage=student (LPLD "validate"; LPQLD's DKR and CA), validated once."""

from __future__ import annotations

from typing import Any

from lpld.config.frozen import memoized
from lpld.config.precedence import Knobs, node_get, section_recipe
from lpld.config.schema import StudentConf
from lpld.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd", "adam")  # lpld.lit.student_module.configure_optimizers
LR_SCHEDULERS = ("cosine", "smooth_cosine", "constant")  # smooth_cosine: RDED/LPLD --smoothing_lr


@memoized("student")
def student_settings(cfg: Any, store_manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Resolved student knobs: ``student.<key>`` > ipc_table > dataset ``recipe.student`` > schema default.

    Args:
        cfg: the composed config.
        store_manifest: the label store's manifest. Its epochs are the fallback of ``student.epochs`` when the
            recipe has none, its granularity that of ``student.granularity`` and its quant mode is checked
            against ``loss=mse_gt``. Without it (planning, logging), the relabel knobs and ``prune`` / ``quant``
            of this config stand in: they are what the store of this config is made from.

    Raises:
        ConfigError: an unknown choice or an out-of-range number, naming the key.
    """
    from lpld.data.config import to_plain

    k = Knobs(cfg.get("student"), section_recipe(cfg.dataset, cfg.get("ipc"), "student"), StudentConf)
    man = store_manifest if store_manifest is not None else _manifest_of_config(cfg)
    epochs = k.get("epochs")
    out = {
        "epochs": int(man.get("epochs") if epochs is None else epochs),
        "optimizer": str(k.get("optimizer")),
        "lr": float(k.get("lr")),
        "weight_decay": float(k.get("weight_decay")),
        # official students decay only weight matrices / kernels (utils.get_parameters); false = decay all
        "wd_exclude_bn_bias": bool(k.get("wd_exclude_bn_bias")),
        "momentum": float(k.get("momentum")),
        "warmup_epochs": float(k.get("warmup_epochs")),
        "warmup_start": float(k.get("warmup_start")),
        "scheduler": str(k.get("scheduler")),
        "label_smoothing": float(k.get("label_smoothing")),
        "loss": str(k.get("loss")),
        "gamma": float(k.get("gamma")),
        "mse_target": str(k.get("mse_target")),  # mse_gt: G-VBSM's raw logits (official) | probs
        "smoothing_space": str(k.get("smoothing_space")),  # label smoothing on probs | logits (in21k)
        "kd_t2": bool(k.get("kd_t2")),
        "temperature": float(k.get("temperature")),
        "temp_schedule": str(k.get("temp_schedule")),
        "temp_step_size": int(k.get("temp_step_size")),
        "temp_gamma": float(k.get("temp_gamma")),
        "temp_floor": float(k.get("temp_floor")),
        "temp_min": float(k.get("temp_min")),
        "temp_epoch_base": int(k.get("temp_epoch_base")),  # DKR: 1-based epochs as the public LPQLD code
        "ca": str(k.get("ca")),
        "ca_value": float(k.get("ca_value")),
        "ca_grid": [float(v) for v in to_plain(k.get("ca_grid"))],
        "granularity": str(node_get(cfg.student, "granularity") or man.get("granularity") or "batch"),
        # issue 20: the official trainer's epoch draws (prune.draw) and last-batch swap (relabel.drop_last=swap)
        **pool_draw_settings(cfg),
        "accumulate": int(k.get("accumulate")),
        "ema_decay": float(k.get("ema_decay")),
        "batch_size": node_get(cfg.student, "batch_size"),  # the store's batch (checked against it)
    }
    labels = str(node_get(cfg.student, "labels") or "stored")  # only when online: stored runs keep their keys
    out.update({"labels": labels} if labels != "stored" else {})
    if labels == "generator":
        out.update({f"generator_{n}": int(k.get(f"generator_{n}")) for n in ("width", "depth", "passes")})
        out["generator_lr"] = float(k.get("generator_lr"))
    out.update(bn_settings(cfg, k, man))  # only when set: runs without ghost / sync BN keep their keys
    sched = str(k.get("label_schedule"))  # only when scheduled: unscheduled runs keep their keys
    if sched != "none":
        hard = k.get("hard_epochs")
        out.update(label_schedule=sched, hard_epochs=None if hard is None else int(hard))
        out["hard_smoothing"] = float(k.get("hard_smoothing"))
    _validate(out)
    qmode = str((man.get("quant") or {}).get("mode", "none"))
    if out["loss"] == "mse_gt" and out["mse_target"] == "logits" and qmode != "none":
        raise ConfigError(
            f"student.loss=mse_gt matches the teacher's full logits (G-VBSM), but this label store is quant={qmode}; "
            "relabel with quant=none, or set student.mse_target=probs (MSE between distributions)"
        )
    return out


def bn_settings(cfg: Any, k: Knobs, man: dict[str, Any]) -> dict[str, Any]:
    """The student's BatchNorm grouping (lpld.core.ghost_bn), checked against the trainer preset's world size.

    Returns ``{}`` (each rank's forward normalised as one group: lpld before issue 20), ``{"bn_rows": R,
    "bn_running": rule}`` (ghost BN: groups of R rows at any world size) or ``{"sync_bn": True}``. ``student.bn_rows``
    0 and null (with no recipe value) both mean the whole per-rank forward; ``student.sync_bn=true`` replaces the
    recipe's ``bn_rows`` and is refused with an explicit one.

    Raises:
        ConfigError: a negative ``bn_rows``, an unknown ``bn_running``, ``sync_bn`` with an explicit ``bn_rows``, or a
            grouping this world size cannot run (:func:`bn_layout`).
    """
    from lpld.core.ghost_bn import RUNNING_RULES

    raw = k.get("bn_rows")
    rows = int(raw) if raw is not None else 0
    if rows < 0:
        raise ConfigError(f"student.bn_rows={rows} must be >= 1 (rows per BatchNorm group) or 0 (each rank's forward)")
    running = str(k.get("bn_running"))
    if running not in RUNNING_RULES:
        raise ConfigError(f"unknown student.bn_running={running!r}; valid: {', '.join(RUNNING_RULES)}")
    sync = bool(k.get("sync_bn"))
    if sync and rows:
        explicit = node_get(cfg.get("student"), "bn_rows")
        if explicit is not None and int(explicit) != 0:
            raise ConfigError(
                f"student.sync_bn=true normalises over every rank's rows, student.bn_rows={int(explicit)} over groups "
                "of a fixed size: set one of them (student.bn_rows=0 with sync_bn, or student.sync_bn=false)"
            )
        rows = 0  # the recipe's per-replica grouping yields to an asked-for SyncBatchNorm
    out: dict[str, Any] = {"bn_rows": rows, "bn_running": running} if rows else {}
    out.update({"sync_bn": True} if sync else {})
    from lpld.config.relabel import relabel_settings
    from lpld.config.student_run import world_size

    batch = man.get("batch_size") or relabel_settings(cfg)["batch_size"]
    if batch is not None:
        trainer = cfg.get("trainer")
        accel = str(node_get(trainer, "accelerator") or "cpu")
        bn_layout(out, int(batch), int(k.get("accumulate")), world_size(cfg), accel)
    return out


def bn_layout(bn: dict[str, Any], batch: int, accumulate: int, world: int, accelerator: str = "gpu") -> tuple[int, int]:
    """Where the student's BatchNorm groups lie: (groups in one rank's forward, ranks one group spans).

    One rank's forward holds ``rows = batch / (accumulate x world)`` rows (``lpld.lit.student_module.rank_rows``).
    ``bn_rows`` dividing ``rows`` gives ``(rows / bn_rows, 1)`` (ghost BN on each rank); ``rows`` dividing
    ``bn_rows`` gives ``(1, bn_rows / rows)`` when that many consecutive ranks tile the world (a group all-reduced
    over them, ``lpld.core.ghost_bn.convert_cross_rank_bn``); without ``bn_rows``, ``(1, 1)``.

    Args:
        bn: :func:`bn_settings`' output (``bn_rows`` / ``sync_bn`` keys when set).
        batch: the stored batch (the student's global batch of one optimizer step).
        accumulate: ``student.accumulate`` (forwards per stored batch on each rank).
        world: processes the trainer runs.
        accelerator: the trainer's (SyncBatchNorm runs on GPUs only).

    Raises:
        ConfigError: ``bn_rows`` and one rank's rows do not tile each other (naming the world sizes that fit);
            ``sync_bn`` on several CPU processes.
    """
    if bn.get("sync_bn") and world > 1 and accelerator == "cpu":
        raise ConfigError(
            f"student.sync_bn=true needs GPUs (torch's SyncBatchNorm refuses CPU tensors); the trainer runs {world} "
            "CPU processes; run on GPUs, or set student.sync_bn=false"
        )
    rows = int(bn.get("bn_rows") or 0)
    if not rows:
        return 1, 1

    def layout(w: int) -> tuple[int, int] | None:
        if batch % (accumulate * w):
            return None
        per = batch // (accumulate * w)
        if per >= rows and per % rows == 0:
            return per // rows, 1
        if 0 < per < rows and rows % per == 0 and w % (rows // per) == 0:
            return 1, rows // per
        return None

    got = layout(world)
    if got is not None:
        return got
    fits = [w for w in range(1, batch + 1) if layout(w) is not None]
    per = batch / (accumulate * world)
    raise ConfigError(
        f"student.bn_rows={rows} (BatchNorm rows per group) and the {per:g} rows of one rank's forward (batch {batch} "
        f"/ (accumulate {accumulate} x world size {world})) do not tile each other. Use trainer.devices (x "
        f"trainer.num_nodes) in {fits}, or student.sync_bn=true (BatchNorm over all ranks' rows), or student.bn_rows=0 "
        "(each rank's rows)"
    )


def pool_draw_settings(cfg: Any) -> dict[str, Any]:
    """How each student epoch draws from the label pool: ``draw`` (``prune.draw``) and ``swap_last`` (true when
    ``relabel.drop_last=swap``: a drawn last batch of a stored epoch is trained as the batch before it).

    Raises:
        ConfigError: an unknown ``prune.draw``.
    """
    from lpld.config.relabel import relabel_settings
    from lpld.core.label_pool import DRAWS

    draw = str(node_get(cfg.get("prune"), "draw") or "with_replacement")
    if draw not in DRAWS:
        raise ConfigError(f"unknown prune.draw={draw!r}; valid: {', '.join(DRAWS)}")
    return {"draw": draw, "swap_last": relabel_settings(cfg)["drop_last"] == "swap"}


def _manifest_of_config(cfg: Any) -> dict[str, Any]:
    """What the store of this config will record (epochs, granularity, quant mode), without opening it."""
    from lpld.config.relabel import quant_settings, relabel_settings

    epochs = relabel_settings(cfg)["epochs"]
    if epochs is None:
        raise ConfigError("student needs epochs: set student.epochs (or relabel.epochs) or a dataset recipe")
    prune = cfg.get("prune")
    return {"epochs": epochs, "granularity": node_get(prune, "granularity"), "quant": quant_settings(cfg)}


def _validate(st: dict[str, Any]) -> None:
    """Every choice and range of the student knobs, checked once (the LightningModule trusts them)."""
    from lpld.core.kd_loss import MSE_TARGETS, SMOOTHING_SPACES, list_student_losses
    from lpld.core.label_pool import GRANULARITIES
    from lpld.core.temperature import CA_MODES, SCHEDULES

    checks = [
        ("loss", list_student_losses()),
        ("temp_schedule", SCHEDULES),
        ("ca", CA_MODES),
        ("granularity", GRANULARITIES),
        ("mse_target", MSE_TARGETS),
        ("smoothing_space", SMOOTHING_SPACES),
        ("optimizer", OPTIMIZERS),
        ("scheduler", LR_SCHEDULERS),
    ]
    for key, valid in checks:
        if (st[key].lower() if key == "optimizer" else st[key]) not in valid:
            raise ConfigError(f"unknown student.{key}={st[key]!r}; valid: {', '.join(valid)}")
    from lpld.core.online_labels import LABEL_SOURCES

    if st.get("labels", "stored") not in LABEL_SOURCES:
        raise ConfigError(f"unknown student.labels={st['labels']!r}; valid: {', '.join(LABEL_SOURCES)}")
    from lpld.core.label_schedule import list_label_schedules

    if st.get("label_schedule", "none") not in list_label_schedules():
        valid = ", ".join(list_label_schedules())
        raise ConfigError(f"unknown student.label_schedule={st['label_schedule']!r}; valid: {valid}")
    h = st.get("hard_epochs")
    if h is not None and not 0 <= h <= st["epochs"]:
        raise ConfigError(f"student.hard_epochs={h} must lie in [0, student.epochs={st['epochs']}] (null: half)")
    if not 0.0 <= st.get("hard_smoothing", 0.0) < 1.0:
        raise ConfigError(f"student.hard_smoothing={st['hard_smoothing']} must lie in [0, 1)")
    if st["epochs"] < 1:
        raise ConfigError(f"student.epochs must be >= 1, got {st['epochs']}")
    if st["accumulate"] < 1:
        raise ConfigError(f"student.accumulate must be >= 1, got {st['accumulate']}")
    if len(st["ca_grid"]) != 3:
        raise ConfigError(f"student.ca_grid must be [lo, hi, n], got {st['ca_grid']}")


@memoized("metric")
def metric_settings(cfg: Any) -> dict[str, Any]:
    """The label-pool selection (LPLD Table 5): metric name, order, easy/hard drop shares, source store."""
    from lpld.core.label_pool import ORDERS
    from lpld.core.prune_metrics import list_prune_metrics

    m = cfg.get("metric") or {"name": "random"}
    out = {
        "name": str(m.get("name", "random")),
        "order": str(m.get("order", "random")),
        "drop_easy": float(m.get("drop_easy", 0.0)),
        "drop_hard": float(m.get("drop_hard", 0.0)),
        "source_prune": str(m.get("source_prune", "1x")),
    }
    if out["name"] not in list_prune_metrics():
        raise ConfigError(f"unknown metric={out['name']!r}; valid: {', '.join(list_prune_metrics())}")
    if out["name"] != "random" and out["order"] not in ORDERS:
        raise ConfigError(f"unknown metric.order={out['order']!r}; valid: {', '.join(ORDERS)}")
    return out
