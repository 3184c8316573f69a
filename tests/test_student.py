"""Student stage: end to end on a tiny store, targets per option, pools on a real store, resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose_cfg, tiny_overrides, write_image_tree

from lpld.artifacts import images as images_artifact
from lpld.artifacts import results as results_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.config import metric_settings
from lpld.core.io import ArtifactError, atomic_torch_save, fingerprint_state_dict
from lpld.report.records import REQUIRED_FIELDS, load_records
from lpld.stages import ConfigError, dispatch

N_CLASSES, IPC, SIZE = 4, 3, 8


def base_overrides(tmp_path, extra=()):
    root = tmp_path / "data"
    if not root.exists():
        write_image_tree(root, n_classes=N_CLASSES, per_class=6, size=SIZE)
    return [
        *tiny_overrides(tmp_path, root, n_classes=N_CLASSES, size=SIZE),
        f"ipc={IPC}",
        "recover=random_real",
        "dataset.recipe.student.epochs=3",
        "dataset.recipe.student.batch_size=4",
        "dataset.recipe.student.temperature=4.0",
        "dataset.recipe.student.rrc_scale=[0.5,1.0]",
        *extra,
    ]


def save_random_teacher(cfg) -> str:
    from lpld.stages.common import build_teacher_model

    torch.manual_seed(0)
    model = build_teacher_model(cfg)
    state = model.state_dict()
    fp = fingerprint_state_dict(state)
    atomic_torch_save(teacher_artifact.path(cfg), {"state_dict": state, "fingerprint": fp, "val": {}})
    return fp


def prepare_store(tmp_path, extra=()):
    """teacher -> recover (random_real) -> relabel, in process; returns the student config."""
    ov = base_overrides(tmp_path, extra)
    cfg = compose_cfg(["stage=recover", *ov])
    if not teacher_artifact.path(cfg).exists():
        save_random_teacher(cfg)
    if not (images_artifact.path(cfg) / "manifest.json").exists():
        dispatch(cfg)
    dispatch(compose_cfg(["stage=relabel", *ov]))
    return compose_cfg(["stage=student", *ov])


@pytest.fixture(scope="module")
def store_cfg(tmp_path_factory):
    """One images + 1x store per module (tests that write runs use distinct configs / results files)."""
    return prepare_store(tmp_path_factory.mktemp("student"))


def test_student_end_to_end_record_and_rerun(store_cfg, tmp_path):
    from lpld.stages import student

    dispatch(store_cfg)
    recs = load_records(results_artifact.dir(store_cfg) / "results.jsonl")
    assert len(recs) == 1
    rec = recs[0]
    for k in REQUIRED_FIELDS:
        assert k in rec, k
    assert 0.0 <= rec["top1"] <= rec["top5"] <= 1.0
    assert rec["epochs"] == 3 and rec["student_model"] == "convnet" and rec["method"] == "random_real"
    # issue 20: image storage = the stored files' bytes (here random_real's PNGs); raw uint8 pixels beside it
    from lpld.artifacts import images as images_artifact

    files = list((images_artifact.path(store_cfg)).rglob("*.png"))
    assert files and rec["image_bytes"] == rec["image_file_bytes"] == sum(f.stat().st_size for f in files)
    assert rec["label_bytes"] > 0 and rec["image_pixel_bytes"] == N_CLASSES * IPC * 3 * SIZE * SIZE
    assert rec["compression_vs_1x"] == pytest.approx(1.0)  # 1x, unquantized store
    assert rec["config"]["student"]["loss"] == "kl"
    # the rerun of a finished run reuses it and appends nothing
    assert student.run(store_cfg)["reused"] is True
    assert len(load_records(results_artifact.dir(store_cfg) / "results.jsonl")) == 1


def _module_and_batch(cfg, **student_over):
    """A StudentModule + one stored batch of the store of ``cfg`` (for target-level checks)."""
    from lpld.core.images import load_distilled
    from lpld.core.label_store import LabelStore
    from lpld.lit.student_module import StudentModule
    from lpld.stages import student

    store = LabelStore.open(student.label_store_dir(cfg))
    st = student.student_settings(cfg, store.manifest)
    st.update(student_over)
    images, labels, _ = load_distilled(images_artifact.path(cfg))
    m = StudentModule(
        model_cfg=student.student_model_cfg(cfg),
        num_classes=N_CLASSES,
        in_chans=3,
        img_size=SIZE,
        quant_mode=store.manifest["quant"]["mode"],
        **student.training_kwargs(st),
        epochs=st["epochs"],
        steps_per_epoch=3,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        label_smoothing=st["label_smoothing"],
        ema_decay=st["ema_decay"],
    )
    m.set_images(images, labels)
    return m, store.read(0), store


def test_replay_matches_what_the_teacher_labelled(store_cfg):
    """The student's on-device replay + the stored logits equal the teacher's logits on that tensor."""
    from lpld.core.augment import replay, to_model_input
    from lpld.stages.common import dataset_spec

    m, b, store = _module_and_batch(store_cfg)
    spec = dataset_spec(store_cfg)
    m.hparams.mean, m.hparams.std = spec.mean, spec.std
    x = m.replay(b)
    full = replay(to_model_input(m.images_u8, spec.mean, spec.std), b, SIZE)
    assert torch.equal(x, full)
    from lpld.stages.common import build_teacher_model

    teacher = build_teacher_model(store_cfg)
    teacher.load_state_dict(torch.load(teacher_artifact.path(store_cfg), weights_only=True)["state_dict"])
    with torch.no_grad():
        z = teacher.eval()(x)
    assert torch.allclose(z.half().float(), b.logits.float(), atol=1e-2)


def test_dkr_and_ca_change_the_targets(store_cfg):
    over = {"temp_schedule": "step", "temp_step_size": 1, "temp_gamma": 0.5, "temp_floor": 1.5}
    m, b, _ = _module_and_batch(store_cfg, **over, temp_epoch_base=0)
    t0, t1, t2 = (m.teacher_temperature(e) for e in (0, 1, 2))
    assert (t0, t1, t2) == (4.0, 2.0, 1.5)  # 4 * 0.5^e floored at 1.5 (0-based epochs)
    m1, _, _ = _module_and_batch(store_cfg, **over)  # default: the public code's 1-based epochs
    assert [m1.teacher_temperature(e) for e in (0, 1)] == [2.0, 1.5]
    p0, p1 = m.targets(b, t0), m.targets(b, t1)
    want0 = torch.softmax(b.logits.float() / 4.0, 1)
    assert torch.allclose(p0, want0) and not torch.allclose(p0, p1)
    assert torch.allclose(p1, torch.softmax(b.logits.float() / 2.0, 1))
    # CA: student temperature none -> T; fixed -> the value, whatever T
    assert m.student_temp(2.0) == 2.0
    mf, _, _ = _module_and_batch(store_cfg, ca="fixed", ca_value=0.3)
    assert mf.student_temp(2.0) == 0.3 and mf.student_temp(4.0) == 0.3
    z = torch.randn(len(b), N_CLASSES)
    loss_none = m.compute_loss(z, b, slice(0, len(b)), 4.0)[0]
    loss_fixed = mf.compute_loss(z, b, slice(0, len(b)), 4.0)[0]
    from lpld.core.kd_loss import kd_kl

    assert loss_none.item() == pytest.approx(kd_kl(z, want0, 4.0).item(), rel=1e-5)
    assert loss_fixed.item() == pytest.approx(kd_kl(z, want0, 0.3).item(), rel=1e-5)


def test_hard_label_loss_uses_cutmix_mixed_classes(store_cfg):
    from lpld.core.kd_loss import hard_ce
    from lpld.lit.student_module import cutmix_share

    m, b, _ = _module_and_batch(store_cfg, loss="ce")
    m.hparams.loss = {"name": "ce"}
    z = torch.randn(len(b), N_CLASSES)
    got = m.compute_loss(z, b, slice(0, len(b)), 4.0)[0]
    y = m.image_labels[b.index]
    lam = cutmix_share(b.aug, SIZE)
    assert lam is not None and 0.0 <= lam <= 1.0
    want = hard_ce(z, y, y[b.aug.mix_index], lam)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["mr", "ms", "hard"])
def test_quantized_stores_decode_as_specified(tmp_path, mode):
    extra = ["quant=hard"] if mode == "hard" else [f"quant={mode}", "quant.k=2"]
    cfg = prepare_store(tmp_path, extra)
    m, b, store = _module_and_batch(cfg)
    assert store.manifest["quant"]["mode"] == mode
    p = m.targets(b, 4.0)
    assert torch.allclose(p.sum(1), torch.ones(len(b)))
    if mode == "mr":  # softmax over the k stored logits / T, 0 elsewhere
        assert ((p > 0).sum(1) == 2).all()
        assert torch.allclose(p.gather(1, b.topk_indices), torch.softmax(b.topk_values.float() / 4.0, 1))
        assert not torch.allclose(m.targets(b, 1.0), p)  # DKR re-tempers MR targets too
    elif mode == "ms":  # stored top-k probabilities (at T_g = the KD temperature 4), rest spread uniformly
        assert store.manifest["quant"]["temperature"] == 4.0
        assert torch.allclose(p.gather(1, b.topk_indices), b.topk_values.float(), atol=1e-6)
        rest = (1 - b.topk_values.float().sum(1)) / (N_CLASSES - 2)
        mask = torch.ones_like(p, dtype=torch.bool).scatter_(1, b.topk_indices, False)
        assert torch.allclose(p[mask].view(len(b), -1), rest.view(-1, 1).expand(-1, N_CLASSES - 2), atol=1e-6)
        # a metric needing the full logits refuses a top-k store, naming the fix
        _expect_metric_error(cfg, "diff_signed", "quant=none")
    else:  # one-hot on the stored teacher argmax; loss=ce trains on those labels
        _expect_metric_error(cfg, "confidence", "quant=hard")
        assert torch.equal(p.argmax(1), b.hard) and torch.equal(p.max(1).values, torch.ones(len(b)))
        m.hparams.loss = {"name": "ce"}
        z = torch.randn(len(b), N_CLASSES)
        got = m.compute_loss(z, b, slice(0, len(b)), 4.0)[0]
        assert got.item() == pytest.approx(torch.nn.functional.cross_entropy(z, b.hard).item(), rel=1e-6)


def _expect_metric_error(cfg, metric: str, match: str) -> None:
    from lpld.core.images import load_distilled
    from lpld.core.label_store import LabelStore
    from lpld.core.prune_metrics import MetricInputError
    from lpld.stages import student

    mcfg = compose_cfg(["stage=student", *base_overrides(_root(cfg)), f"metric={metric}", "prune=10x"])
    store = LabelStore.open(student.label_store_dir(cfg))
    _, labels, _ = load_distilled(images_artifact.path(cfg))
    with pytest.raises(MetricInputError, match=match):
        student.build_pool(store, labels, metric_settings(mcfg), mcfg.prune, mcfg.seed)


def test_ema_update(store_cfg):
    m, _, _ = _module_and_batch(store_cfg, ema_decay=0.9)
    assert m.ema is not None and m.eval_model() is m.ema
    before = [p.detach().clone() for p in m.ema.parameters()]
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(1.0)
    m._ema_update()
    for pe, p0, p in zip(m.ema.parameters(), before, m.model.parameters()):
        assert torch.allclose(pe, 0.9 * p0 + 0.1 * p)


def _brute_force_ca(z: np.ndarray, p: np.ndarray, lo: float, hi: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """KL(p || softmax(z / t)) (mean over rows) for every t of np.linspace(lo, hi, n), in float64, by a loop."""
    grid = np.linspace(lo, hi, n)
    losses = []
    for t in grid:
        s = z / t
        log_q = s - s.max(axis=1, keepdims=True)
        log_q = log_q - np.log(np.exp(log_q).sum(axis=1, keepdims=True))
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        losses.append(float((plogp - p * log_q).sum(axis=1).mean()))
    return grid, np.asarray(losses)


def test_lpqld_accumulate_ema_run(store_cfg, monkeypatch):
    """student=lpqld (DKR step + CA search) with gradient accumulation and EMA trains and records; the CA
    temperature it keeps is the brute-force argmin over the grid for the last batch it searched on."""
    import lpld.lit.student_module as sm
    from lpld.stages import student

    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real = sm.ca_losses

    def spy(z, p, grid):
        seen.append((z.detach().double().cpu().numpy(), p.detach().double().cpu().numpy()))
        return real(z, p, grid)

    monkeypatch.setattr(sm, "ca_losses", spy)
    cfg = compose_cfg(
        [
            "stage=student",
            *base_overrides(_root(store_cfg)),
            "student=lpqld",
            "student.temp_step_size=1",
            "student.accumulate=2",
            "student.ema_decay=0.5",
            "stage.results_name=lpqld",
            "stage.val_every=0",
        ]
    )
    out = student.run(cfg)
    rec = load_records(results_artifact.dir(cfg) / "lpqld.jsonl")[0]
    assert rec["student"]["ca"] == "search" and rec["student"]["accumulate"] == 2
    assert rec["top1"] == out["top1"]
    ckpt = torch.load(next(student.students_dir(student.label_store_dir(cfg)).rglob("last.ckpt")), weights_only=False)
    t_s = ckpt["lpld_student_temperature"]
    assert len(seen) == 3  # searched once per epoch (3 epochs), on the epoch's last stored batch
    z, p = seen[-1]
    assert z.shape == p.shape and z.shape[1] == N_CLASSES and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    grid, losses = _brute_force_ca(z, p, 0.01, 1.0, 100)  # student.ca_grid's default [0.01, 1.0, 100]
    expected = grid[int(np.argmin(losses))]
    # the module ranks float32 losses: it may pick another grid point only if that one ties within float32 rounding
    i = int(np.argmin(np.abs(grid - t_s)))
    assert abs(grid[i] - t_s) < 1e-9, f"{t_s} is not on the CA grid"
    assert t_s == pytest.approx(expected, abs=1e-9) or losses[i] - losses.min() <= 1e-6 * max(1.0, abs(losses.min()))


def test_metric_pool_selects_by_score_on_real_store(store_cfg):
    """metric=confidence order=easy keeps the highest-scoring stored batches of the 1x store."""
    from lpld.core.images import load_distilled
    from lpld.core.label_store import LabelStore
    from lpld.stages import student

    cfg = compose_cfg(
        ["stage=student", *base_overrides(_root(store_cfg)), "metric=confidence", "metric.order=easy", "prune=10x"]
    )
    store = LabelStore.open(student.label_store_dir(cfg))
    assert store.manifest["prune"]["name"] == "1x"  # the metric reads the 1x store
    _, labels, _ = load_distilled(images_artifact.path(cfg))
    pool = student.build_pool(store, labels, metric_settings(cfg), cfg.prune, cfg.seed)
    m = len(store)
    # brute force: mean max-softmax per stored batch, top pool_size of them
    scores = np.array([torch.softmax(store.read(i).logits.float(), 1).max(1).values.mean().item() for i in range(m)])
    keep = max(1, int(np.floor(m * 0.1 + 1e-6)))
    assert len(pool.rows) == keep
    assert set(pool.rows.tolist()) == set(np.argsort(-scores, kind="stable")[:keep].tolist())
    assert pool.label_bytes < store.manifest["accounting"]["total"]


def _root(cfg):
    from pathlib import Path

    return Path(str(cfg.paths.root))


def test_bad_inputs_raise_clear_errors(store_cfg):
    from lpld.stages import student

    root = _root(store_cfg)
    with pytest.raises(ConfigError, match="batch size"):
        student.run(compose_cfg(["stage=student", *base_overrides(root), "student.batch_size=3"]))
    with pytest.raises(ConfigError, match="temp_schedule"):
        student.run(compose_cfg(["stage=student", *base_overrides(root), "student.temp_schedule=linear"]))
    with pytest.raises(ConfigError, match="metric"):
        student.run(compose_cfg(["stage=student", *base_overrides(root), "metric.name=entropy"]))
    with pytest.raises(ArtifactError, match="stage=relabel"):  # no store for this config
        student.run(compose_cfg(["stage=student", *base_overrides(root), "prune=20x"]))
    # a store made for other images
    other = compose_cfg(["stage=student", *base_overrides(root)])
    man_path = student.label_store_dir(other) / "manifest.json"
    text = man_path.read_text()
    man = json.loads(text)
    man["images_fingerprint"] = "0" * 16
    man_path.write_text(json.dumps(man))
    try:
        with pytest.raises(ArtifactError, match="other images"):
            student.run(other)
    finally:
        man_path.write_text(text)


def test_resume_after_interruption_replays_same_draws(store_cfg, monkeypatch):
    import lightning as L

    from lpld.stages import student

    cfg = compose_cfg(
        [
            "stage=student",
            *base_overrides(_root(store_cfg)),
            "prune=1x",
            "student.granularity=batch",
            "student.temp_schedule=cosine",
            "stage.results_name=resume",
        ]
    )
    seen: list[tuple[int, int]] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, int(batch.position)))

    class Interrupt(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt

    monkeypatch.setattr(student, "extra_callbacks", [Record(), Interrupt()])
    with pytest.raises((RuntimeError, SystemExit)):  # Lightning turns Ctrl-C into SystemExit(1)
        student.run(cfg)
    first = list(seen)
    seen.clear()
    monkeypatch.setattr(student, "extra_callbacks", [Record()])
    student.run(cfg)
    assert {e for e, _ in seen} == {1, 2}  # resumed at epoch 1, did not start over
    assert [p for e, p in seen if e == 1] == [p for e, p in first if e == 1]  # same label-pool draws
