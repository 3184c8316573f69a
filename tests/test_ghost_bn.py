"""Ghost (grouped) BatchNorm of the student (issue 20 item 2; lpld.core.ghost_bn).

References: a brute-force loop of ``F.batch_norm`` over the row pieces (outputs and gradients), hand-computed running
statistics (the first group's update, as nn.DataParallel's replica 0 and DDP's rank 0 keep; or the groups' mean),
``nn.BatchNorm2d`` itself (eval mode, one group), and two simulated ranks with plain BatchNorm whose averaged
gradients must equal the one-process ghost gradient. The config tests check the recipe defaults, the refusals and
that the student stage's module really regroups its BatchNorm layers.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from torch import nn

from lpld.core.ghost_bn import (
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    convert_ghost_bn,
    convert_sync_bn,
    ghost_groups,
)
from lpld.errors import ConfigError

MAN = {"epochs": 2, "granularity": "batch", "quant": {"mode": "none"}}


def _bn(c: int = 3, momentum: float | None = 0.1, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    return bn


def _ghost(bn: nn.Module, groups: int, running: str = "first") -> nn.Module:
    return convert_ghost_bn(copy.deepcopy(bn), groups, running)


def _x(n: int = 12, c: int = 3, s: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, s, s, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_(True)


def _pieces(n: int, groups: int) -> list[slice]:
    size = -(-n // groups)
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@pytest.mark.parametrize("n,groups", [(12, 3), (12, 4), (10, 4), (8, 8)])
def test_training_output_and_gradients_equal_a_per_chunk_loop(n, groups):
    """Training forward = F.batch_norm on each contiguous piece of ceil(n / groups) rows with its own batch
    statistics; gradients w.r.t. input, weight and bias equal the loop's (float64, 1e-12)."""
    bn = _bn()
    gh = _ghost(bn, groups).train()
    x = _x(n)
    w, b = bn.weight.detach().clone().requires_grad_(True), bn.bias.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.cat([F.batch_norm(x2[sl], None, None, w, b, True, 0.0, bn.eps) for sl in _pieces(n, groups)])
    out = gh(x)
    assert isinstance(gh, GhostBatchNorm2d) and gh.groups == groups
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(gh.weight.grad, w.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(gh.bias.grad, b.grad, rtol=0, atol=1e-12)
    # the pieces really are normalised on their own: every piece has zero mean before the affine
    for sl in _pieces(n, groups):
        z = (out[sl] - gh.bias.view(1, -1, 1, 1)) / gh.weight.view(1, -1, 1, 1)
        assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-10


def test_running_stats_follow_the_first_group_by_hand():
    """running='first': one update from the first group's biased mean and unbiased variance, momentum 0.1; the
    counter counts forwards, not groups."""
    bn = _bn()
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    gh = _ghost(bn, 3).train()
    x = _x(12)
    with torch.no_grad():
        gh(x)
        gh(x[[*range(4, 12), *range(0, 4)]])  # a second forward: its first group is rows 4..7 of x
    first, second = x[0:4].detach(), x[4:8].detach()
    m1, v1 = first.mean(dim=(0, 2, 3)), first.var(dim=(0, 2, 3), unbiased=True)
    m2, v2 = second.mean(dim=(0, 2, 3)), second.var(dim=(0, 2, 3), unbiased=True)
    rm = 0.9 * (0.9 * rm0 + 0.1 * m1) + 0.1 * m2
    rv = 0.9 * (0.9 * rv0 + 0.1 * v1) + 0.1 * v2
    torch.testing.assert_close(gh.running_mean, rm, rtol=0, atol=1e-12)
    torch.testing.assert_close(gh.running_var, rv, rtol=0, atol=1e-12)
    assert int(gh.num_batches_tracked) == 2


def test_running_stats_mean_rule_and_cumulative_momentum_by_hand():
    """running='mean': r <- (1 - m) r + m mean_g(s_g); momentum=None: the cumulative factor 1 / count."""
    bn = _bn()
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    gh = _ghost(bn, 3, "mean").train()
    x = _x(12).detach()
    gh(x)
    chunks = [x[sl] for sl in _pieces(12, 3)]
    m = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks]).mean(0)
    v = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(gh.running_mean, 0.9 * rm0 + 0.1 * m, rtol=0, atol=1e-12)
    torch.testing.assert_close(gh.running_var, 0.9 * rv0 + 0.1 * v, rtol=0, atol=1e-12)

    cum = _ghost(_bn(momentum=None), 2).train()  # first rule, cumulative average: factor 1 after one forward
    cum(x)
    torch.testing.assert_close(cum.running_mean, x[0:6].mean(dim=(0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(cum.running_var, x[0:6].var(dim=(0, 2, 3), unbiased=True), rtol=0, atol=1e-12)


def test_eval_mode_is_plain_batchnorm():
    bn = _bn()
    gh = _ghost(bn, 4).eval()
    x = _x(12)
    assert torch.equal(gh(x), bn.eval()(x))


def test_one_group_is_plain_batchnorm_exactly():
    """bn_rows = the whole per-rank forward: the model is left untouched (plain BN, bit for bit); a ghost layer
    forced to one group also equals nn.BatchNorm2d exactly, running statistics included."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _bn().float())
    assert convert_ghost_bn(model, ghost_groups(8, 8)) is model and type(model[1]) is nn.BatchNorm2d
    bn = _bn()
    one = GhostBatchNorm2d(3).double()
    one.load_state_dict(bn.state_dict())
    x = _x(8)
    assert torch.equal(one.train()(x), bn.train()(x))
    assert torch.equal(one.running_mean, bn.running_mean) and torch.equal(one.running_var, bn.running_var)


def test_conversion_keeps_parameters_buffers_and_state_dict():
    """The ghost layers hold the same tensors (an optimizer built before still steps them) and state_dict keys."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5), nn.BatchNorm1d(5))
    model(torch.randn(4, 3, 6, 6))
    keys, w = list(model.state_dict()), model[1].weight
    out = convert_ghost_bn(model, 2)
    assert out is model and isinstance(model[1], GhostBatchNorm2d) and isinstance(model[4], GhostBatchNorm1d)
    assert model[1].weight is w and list(model.state_dict()) == keys
    assert "groups=2" in repr(model[1])
    y = model.train()(torch.randn(8, 3, 6, 6))  # BatchNorm1d over (N, C) pieces too
    assert y.shape == (8, 5)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).double()


def test_one_process_ghost_equals_two_simulated_ranks():
    """The world-size property at the core level: one process with bn_rows = R on 2R rows has the loss and the
    parameter gradients of two ranks holding R rows each with plain BatchNorm (DDP's mean of the per-rank gradients of
    the per-rank mean losses); its running statistics are rank 0's (what DDP's buffer broadcast keeps)."""
    rows = 4
    x = torch.randn(2 * rows, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.arange(2 * rows) % 5
    ghost = convert_ghost_bn(_net(), 2).train()
    loss = F.cross_entropy(ghost(x), y)
    loss.backward()
    ranks = [_net().train() for _ in range(2)]
    rank_losses = []
    for r, net in enumerate(ranks):
        sl = slice(r * rows, (r + 1) * rows)
        lr = F.cross_entropy(net(x[sl]), y[sl])
        lr.backward()
        rank_losses.append(lr.detach())
    torch.testing.assert_close(loss.detach(), torch.stack(rank_losses).mean(), rtol=0, atol=1e-12)
    for (name, p), p0, p1 in zip(ghost.named_parameters(), ranks[0].parameters(), ranks[1].parameters()):
        torch.testing.assert_close(p.grad, (p0.grad + p1.grad) / 2, rtol=0, atol=1e-12, msg=name)
    for (name, b), b0 in zip(ghost.named_buffers(), ranks[0].buffers()):
        torch.testing.assert_close(b, b0, rtol=0, atol=1e-12, msg=name)
    # and plain BatchNorm over the 2R rows is a different experiment (the property is not vacuous)
    plain = _net().train()
    F.cross_entropy(plain(x), y).backward()
    assert not torch.allclose(plain[0].weight.grad, ghost[0].weight.grad, atol=1e-6)


def test_refuses_bn_subclasses_and_bad_groups():
    class FusedBN(nn.BatchNorm2d):  # like timm's BatchNormAct2d: its own forward would be lost
        pass

    with pytest.raises(ConfigError, match="student.bn_rows.*FusedBN"):
        convert_ghost_bn(nn.Sequential(FusedBN(3)), 2)
    with pytest.raises(ConfigError, match="student.sync_bn.*FusedBN"):
        convert_sync_bn(nn.Sequential(FusedBN(3)))
    assert isinstance(convert_sync_bn(nn.Sequential(nn.BatchNorm2d(3)))[0], nn.SyncBatchNorm)
    with pytest.raises(ConfigError, match="bn_running"):
        convert_ghost_bn(nn.BatchNorm2d(3), 2, running="last")
    for bn_rows, rows in ((32, 16), (48, 128), (0, 8)):
        with pytest.raises(ConfigError, match="student.bn_rows"):
            ghost_groups(bn_rows, rows)
    assert ghost_groups(32, 128) == 4


# ----------------------------------------------------------------------------------------------------------------------
# config: recipe defaults, world-size checks, the student module's wiring
# ----------------------------------------------------------------------------------------------------------------------


def _st(*ov: str) -> dict:
    from lpld.config import student_settings

    return student_settings(compose_cfg(["stage=student", *ov]), MAN)


def test_recipe_defaults_and_switches():
    assert (_st("dataset=in1k")["bn_rows"], _st("dataset=in21k")["bn_rows"], _st("dataset=tiny")["bn_rows"]) == (
        32,
        8,
        64,
    )
    assert _st("dataset=in1k")["bn_running"] == "first"
    small = _st("dataset=cifar10_jpg")
    assert "bn_rows" not in small and "sync_bn" not in small  # unchanged keys: earlier student runs keep their key
    assert "bn_rows" not in _st("dataset=in1k", "student.bn_rows=0")  # lpld before issue 20: each rank's forward
    assert _st("dataset=in1k", "student.bn_rows=16", "student.bn_running=mean")["bn_running"] == "mean"
    sync = _st("dataset=in1k", "student.sync_bn=true")  # replaces the recipe's per-replica groups
    assert sync["sync_bn"] is True and "bn_rows" not in sync
    # in1k on 4 devices: 32 rows per rank = one group (the official replica); on 8: one group over 2 ranks
    assert _st("dataset=in1k", "trainer=ddp", "trainer.devices=4")["bn_rows"] == 32
    assert _st("dataset=in1k", "trainer=ddp", "trainer.devices=8")["bn_rows"] == 32


@pytest.mark.parametrize(
    "ov,match",
    [
        (
            ["dataset=in1k", "trainer=ddp", "trainer.devices=3"],
            r"bn_rows=32 .*42.6667 rows .*\[1, 2, 4, 8, 16, 32, 64, 128\]",
        ),
        (["dataset=in1k", "student.bn_rows=48"], r"bn_rows=48 .*the 128 rows .*do not tile"),
        (["dataset=in1k", "student.accumulate=8"], r"bn_rows=32 .*the 16 rows .*world size 1"),  # a group of 2 ranks
        (["dataset=in1k", "trainer=ddp", "trainer.devices=16", "student.bn_rows=24"], r"bn_rows=24 .*8 rows"),
        (["dataset=in1k", "student.bn_rows=16", "student.sync_bn=true"], r"sync_bn=true .*bn_rows=16"),
        (["dataset=in1k", "trainer=ddp_cpu", "trainer.devices=2", "student.sync_bn=true"], r"sync_bn=true needs GPUs"),
        (["dataset=in1k", "student.bn_running=last"], r"unknown student.bn_running"),
        (["dataset=in1k", "student.bn_rows=-1"], r"student.bn_rows=-1"),
    ],
)
def test_refusals_name_the_key_and_the_fix(ov, match):
    with pytest.raises(ConfigError, match=match) as e:
        _st(*ov)
    assert "\n" not in str(e.value)


def test_student_module_regroups_its_batchnorm(monkeypatch):
    """stage=student's build_module hands the resolved knob to the module, whose setup converts the student's
    BatchNorm layers: groups = batch / (accumulate x world x bn_rows)."""
    from lpld.config.student_run import student_model_cfg
    from lpld.stages.common import dataset_spec
    from lpld.stages.student_train import build_module

    def module(*ov, world=1):
        cfg = compose_cfg(["stage=student", "dataset=cifar10_jpg", "model=convnet", "model.width=8", *ov])
        from lpld.config import student_settings

        man = {**MAN, "batch_size": 16, "batches_per_epoch": 2}
        st = student_settings(cfg, man)  # the store's batch (16), not the preset's
        spec = dataset_spec(cfg)
        inp = SimpleNamespace(
            settings=st,
            manifest=man,
            spec=spec,
            seed=0,
            model_cfg=student_model_cfg(cfg),
            teacher=None,
            images=torch.zeros(2, 3, spec.image_size, spec.image_size, dtype=torch.uint8),
            labels=torch.zeros(2, dtype=torch.long),
            images_dir="images",  # where ddp_spawn ranks would reload them (lpld.lit.spawn_images); not read here
            images_manifest={},
        )
        m = build_module(inp)
        m._trainer = SimpleNamespace(world_size=world)  # setup reads the world size from the trainer
        m.setup("fit")
        return [x for x in m.model.modules() if isinstance(x, nn.BatchNorm2d)]

    plain = module()
    assert plain and all(type(x) is nn.BatchNorm2d for x in plain)
    four = module("student.bn_rows=4")
    assert all(isinstance(x, GhostBatchNorm2d) and x.groups == 4 for x in four)
    assert all(x.groups == 2 for x in module("student.bn_rows=4", world=2))
    assert all(
        x.groups == 2 and x.running == "mean"
        for x in module("student.bn_rows=4", "student.bn_running=mean", "student.accumulate=2")
    )
    with pytest.raises(ConfigError, match="student.bn_rows=3"):
        module("student.bn_rows=3", world=2)  # 8 rows per rank: the module refuses too
    with pytest.raises(ConfigError, match="student.bn_rows=6"):
        module("student.bn_rows=6", world=4)  # 4 rows per rank: 6 is not a whole number of ranks


def test_plan_reports_the_student_batchnorm_rows_per_world_size():
    """stage=plan describes the rows each student BatchNorm layer normalises over, and refuses as the stage would."""
    from lpld.config import student_settings
    from lpld.stages.plan import _student_bn

    cfg = compose_cfg(["stage=plan", "dataset=in1k"])
    st = student_settings(cfg, {**MAN, "batch_size": 128})
    assert _student_bn(cfg, st, 128, 1) == {"bn_rows": 32, "bn_groups_per_rank": 4, "bn": "ghost"}
    assert _student_bn(cfg, st, 128, 4) == {"bn_rows": 32, "bn_groups_per_rank": 1, "bn": "ghost"}
    assert _student_bn(cfg, st, 128, 8) == {"bn_rows": 32, "bn_groups_per_rank": 1, "bn": "one group over 2 ranks"}
    with pytest.raises(ConfigError, match=r"bn_rows=32 .*do not tile"):
        _student_bn(cfg, st, 128, 3)
    plain = student_settings(
        compose_cfg(["stage=plan", "dataset=in1k", "student.bn_rows=0"]), {**MAN, "batch_size": 128}
    )
    assert _student_bn(cfg, plain, 128, 8) == {"bn_rows": 16, "bn_groups_per_rank": 1, "bn": "per rank"}


def test_squeeze_bn_rows_groups_the_teacher_and_keeps_old_fingerprints():
    """stage.bn_rows (squeeze): absent from the settings when 0 (teachers trained before keep their fingerprints),
    refused when negative or when it does not tile a rank's rows, and the teacher's BN layers become ghost BN with
    batch / (world x bn_rows) groups."""
    from conftest import compose_cfg

    from lpld.config import squeeze_settings
    from lpld.core.ghost_bn import GhostBatchNorm2d
    from lpld.errors import ConfigError
    from lpld.lit.classifier import ClassifierModule

    assert "bn_rows" not in squeeze_settings(compose_cfg(["stage=squeeze"]))
    st = squeeze_settings(compose_cfg(["stage=squeeze", "stage.bn_rows=4", "stage.batch_size=8"]))
    assert st["bn_rows"] == 4
    with pytest.raises(ConfigError, match="stage.bn_rows=-1"):
        squeeze_settings(compose_cfg(["stage=squeeze", "stage.bn_rows=-1"]))
    m = ClassifierModule({"name": "convnet", "width": 8, "depth": 2}, 4, 1, 8, optim=st)
    m.setup("fit")  # no trainer: world size 1, so 8 rows per forward in 2 groups of 4
    bns = [x for x in m.model.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(x, GhostBatchNorm2d) and x.groups == 2 for x in bns)
    bad = ClassifierModule({"name": "convnet", "width": 8, "depth": 2}, 4, 1, 8, optim={**st, "bn_rows": 3})
    with pytest.raises(ConfigError, match="stage.bn_rows=3"):
        bad.setup("fit")


def test_interleaved_groups_are_the_round_robin_ranks():
    """interleave=True (squeeze: EpochShardSampler deals rows to ranks round-robin): group g = rows g::G, so one
    process with G groups computes, row for row, what G ranks with plain BatchNorm compute on x[r::G]."""
    from lpld.core.ghost_bn import convert_ghost_bn

    torch.manual_seed(0)
    x = torch.randn(12, 3, 4, 4, dtype=torch.float64)
    bn = convert_ghost_bn(nn.BatchNorm2d(3).double(), 3, "first", interleave=True)
    ref = nn.BatchNorm2d(3).double()
    y = bn.train()(x)
    for r in range(3):  # "rank" r: plain BN over its rows
        torch.testing.assert_close(y[r::3], F.batch_norm(x[r::3], None, None, ref.weight, ref.bias, True, 0.0, 1e-5))
    ranks0 = nn.BatchNorm2d(3).double().train()
    ranks0(x[0::3])  # rank 0's buffers survive (DDP broadcast): the first group is rows 0, 3, 6, 9
    torch.testing.assert_close(bn.running_mean, ranks0.running_mean)
    torch.testing.assert_close(bn.running_var, ranks0.running_var)
    contiguous = convert_ghost_bn(nn.BatchNorm2d(3).double(), 3, "first").train()(x)
    assert not torch.allclose(contiguous, y)  # the two groupings differ: the test can fail
