"""Issue 12, items 6 and 8: RDED's ShufflePatches (Table 8) and the official ImageNet-21K random Cutout colour.

Both are relabel augmentations, so each is drawn once (``augment.draw``), stored in (explicit) or re-derived from
(seed) the label-store record, and replayed by the student. The tests pin

* the behaviour against independent computations: a patch-by-patch reassembly of the shuffled image (and RDED's
  strip-by-strip algorithm, ``validation/utils.py`` ``ShufflePatches``), the fill value of a pixel of the drawn
  colour;
* the draws: one permutation per image and axis (not per batch), uniform; colours uniform in 0..255 per image;
* storage and replay: the store's record arrays, accounting, and the replay of explicit and seed stores and of the
  student module equal what the teacher labelled;
* "off" = the bytes written before the switches existed: record digests, replayed tensors and accounting computed
  with the code at the parent commit (values pinned below), and the ``AugConfig`` dict of every store identity;
* the configs: ``experiment=table8_rded`` turns ShufflePatches on with RDED's ``--factor 2``, ``dataset=in21k``
  selects the random colour, everything else keeps both off.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg
from torch import nn

from lpld.core import augment
from lpld.core.augment import AugConfig
from lpld.core.label_store import LabelStore, StoreSpec, accounting, array_layout, finalize, prepare, row_offsets
from lpld.core.quant import QuantConfig
from lpld.core.relabel import generate

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
META = {"images_fingerprint": "img0", "teacher_fingerprint": "t0"}
RANDOM_FILL = {"mix": "cutout", "cutout_fill": "random", "fill_mean": MEAN, "fill_std": STD}


def hand_image(h: int, w: int, c: int = 3) -> torch.Tensor:
    """(1, C, H, W) float image whose every value is distinct: 10000 c + 100 y + x."""
    cc, yy, xx = torch.meshgrid(torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    return (cc * 10000 + yy * 100 + xx).to(torch.float32).unsqueeze(0)


def brute_force_shuffle(img: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """(C, H, W) reassembled patch by patch: output patch (i, j) = source patch (rows[i], cols[j]); rest dropped."""
    f = len(rows)
    th, tw = img.shape[1] // f, img.shape[2] // f
    out = torch.empty(img.shape[0], f * th, f * tw)
    for i, j in itertools.product(range(f), range(f)):
        src = img[:, rows[i] * th : (rows[i] + 1) * th, cols[j] * tw : (cols[j] + 1) * tw]
        out[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw] = src
    return out


def rded_shuffle(img: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """RDED's ``ShufflePatches.forward`` with the shuffle replaced by the given orders: column strips, transpose,
    row strips, transpose back (strips of side ``size // f``, the offset loop of ``shuffle_weight``)."""

    def strips(x: torch.Tensor, order: list[int]) -> torch.Tensor:
        f, tw = len(order), x.shape[-1] // len(order)
        patches = [x[..., i * tw : i * tw + tw] for i in range(f)]
        return torch.cat([patches[k] for k in order], -1)

    x = strips(img, cols).permute(0, 2, 1)
    return strips(x, rows).permute(0, 2, 1)


# ----------------------------------------------------------------------------------------------------------------------
# ShufflePatches
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("f,side", [(2, 12), (3, 14), (4, 16)])
def test_shuffle_patches_full_crop_is_the_reassembled_image(f, side):
    """A whole-image crop of the shuffled image is exactly the brute-force reassembly (14 px, f=3: 2 px dropped)."""
    used = f * (side // f)
    cfg = AugConfig(out_size=used, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, mix="none", shuffle_patches=f)
    img = hand_image(side, side)
    rec = augment.draw(cfg, 6, (side, side), seed=5)
    assert rec.patch_perm is not None and rec.patch_perm.shape == (6, 2, f)
    assert torch.equal(rec.crops, torch.tensor([[0, 0, used, used]] * 6))  # drawn on the reassembled size
    out = augment.apply(img, torch.zeros(6, dtype=torch.int64), rec, used)
    for b in range(6):
        rows, cols = rec.patch_perm[b, 0].tolist(), rec.patch_perm[b, 1].tolist()
        want = brute_force_shuffle(img[0], rows, cols)
        assert torch.equal(out[b], want)
        assert torch.equal(rded_shuffle(img[0], rows, cols), want)  # RDED's strip algorithm = patch permutation


def test_shuffle_patches_then_crop_flip_equals_crop_of_the_reassembled_image():
    """With random crops and flips, replay = crop + resize + flip of the brute-force reassembly, bit for bit."""
    f, side = 2, 16
    cfg = AugConfig(out_size=16, scale=(0.25, 1.0), mix="none", shuffle_patches=f)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 3, side, side, generator=g)
    index = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1])
    rec = augment.draw(cfg, index.numel(), (side, side), seed=11)
    out = augment.apply(imgs, index, rec, 16)
    assert not torch.equal(rec.patch_perm[:, 0], rec.patch_perm[:, 1]), "rows and columns must be drawn separately"
    for b in range(index.numel()):
        rows, cols = rec.patch_perm[b, 0].tolist(), rec.patch_perm[b, 1].tolist()
        shuffled = brute_force_shuffle(imgs[index[b]], rows, cols).unsqueeze(0)
        ref = augment.resized_crop(shuffled, torch.tensor([0]), rec.crops[b : b + 1], 16)
        if rec.flips[b]:
            ref = ref.flip(-1)
        assert torch.equal(out[b : b + 1], ref)


def test_shuffle_patches_draws_one_uniform_permutation_per_image_and_axis():
    """RDED shuffles per image (a transform of the dataset), rows and columns independently, uniformly."""
    n = 6000
    rec = augment.draw(AugConfig(out_size=16, shuffle_patches=2), n, (16, 16), seed=3)
    swapped = (rec.patch_perm[:, :, 0] == 1).numpy()  # (n, 2): row / column strips swapped
    assert abs(swapped[:, 0].mean() - 0.5) < 0.03 and abs(swapped[:, 1].mean() - 0.5) < 0.03
    assert abs((swapped[:, 0] & swapped[:, 1]).mean() - 0.25) < 0.03  # independent axes
    rec3 = augment.draw(AugConfig(out_size=18, shuffle_patches=3), n, (18, 18), seed=4)
    counts: dict[tuple[int, ...], int] = {}
    for p in rec3.patch_perm[:, 1].tolist():
        counts[tuple(p)] = counts.get(tuple(p), 0) + 1
    assert set(counts) == set(itertools.permutations(range(3)))
    assert max(abs(v / n - 1 / 6) for v in counts.values()) < 0.03


def test_shuffle_patches_keeps_the_other_parameters_of_the_seed():
    """Drawn last: the crops, flips and CutMix of a seed are those of the switch off (divisible image side)."""
    on = augment.draw(AugConfig(out_size=24, shuffle_patches=2), 9, (24, 24), seed=8)
    off = augment.draw(AugConfig(out_size=24), 9, (24, 24), seed=8)
    off.patch_perm = on.patch_perm
    assert on.equals(off)


def test_shuffle_patches_refuses_strips_smaller_than_the_factor():
    """RDED's last-strip branch (``i != factor - 1`` on a pixel offset) would fire: refused, not silently different."""
    with pytest.raises(ValueError, match="shuffle_patches"):
        AugConfig(out_size=8, shuffle_patches=3)
    with pytest.raises(ValueError, match="shuffle_patches"):
        AugConfig(out_size=8, shuffle_patches=1)
    with pytest.raises(ValueError, match="at least"):
        augment.draw(AugConfig(out_size=16, shuffle_patches=3), 2, (8, 8), seed=0)


# ----------------------------------------------------------------------------------------------------------------------
# random Cutout colour
# ----------------------------------------------------------------------------------------------------------------------


def test_random_cutout_fills_each_box_with_its_recorded_pixel_colour():
    """Inside the box: exactly the normalized value of a pixel of the drawn colour; outside: the zero-fill output."""
    u8 = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    imgs = augment.to_model_input(u8, MEAN, STD)
    cfg = AugConfig(out_size=16, **RANDOM_FILL)
    rec = augment.draw(cfg, 4, (16, 16), seed=9)
    assert rec.cutout_rgb is not None and rec.cutout_rgb.dtype == torch.uint8 and rec.cutout_rgb.shape == (4, 3)
    out = augment.apply(imgs, torch.arange(4), rec, 16)
    zero = augment.apply(imgs, torch.arange(4), augment.draw(AugConfig(out_size=16, mix="cutout"), 4, (16, 16), 9), 16)
    for b in range(4):
        y1, x1, y2, x2 = rec.cutout[b].tolist()
        assert y2 > y1 and x2 > x1
        colour = rec.cutout_rgb[b].view(1, 3, 1, 1).expand(1, 3, y2 - y1, x2 - x1).contiguous()
        assert torch.equal(out[b, :, y1:y2, x1:x2], augment.to_model_input(colour, MEAN, STD)[0])
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        assert torch.equal(out[b][:, ~inside], zero[b][:, ~inside])
        assert torch.all(zero[b][:, inside] == 0)  # the default: 0 in normalized space
    # the same boxes as zero fill (the colour is drawn after them)
    assert torch.equal(rec.cutout, augment.draw(AugConfig(out_size=16, mix="cutout"), 4, (16, 16), 9).cutout)


def test_random_cutout_colour_is_uniform_over_0_255_per_image():
    """CutoutPILWithCoords: ``random.randint(0, 255)`` per channel, per image (inclusive bounds)."""
    rgb = augment.draw(AugConfig(out_size=8, **RANDOM_FILL), 20000, (8, 8), seed=1).cutout_rgb.long()
    assert int(rgb.min()) == 0 and int(rgb.max()) == 255
    assert abs(rgb.float().mean().item() - 127.5) < 1.5
    assert len({tuple(c) for c in rgb[:50].tolist()}) == 50  # a colour per image, not per batch


def test_random_fill_needs_cutout_and_the_normalization():
    with pytest.raises(ValueError, match="mix=cutout"):
        AugConfig(out_size=8, mix="cutmix", cutout_fill="random", fill_mean=MEAN, fill_std=STD)
    with pytest.raises(ValueError, match="fill_mean"):
        AugConfig(out_size=8, mix="cutout", cutout_fill="random")
    with pytest.raises(ValueError, match="cutout_fill"):
        AugConfig(out_size=8, mix="cutout", cutout_fill="grey")


# ----------------------------------------------------------------------------------------------------------------------
# store: record layout, accounting, replay (explicit and seed), student
# ----------------------------------------------------------------------------------------------------------------------


class Recorder(nn.Module):
    """A teacher that keeps every input it labels."""

    def __init__(self, classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, classes))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.inner(x)


def _spec(aug: AugConfig, record: str) -> StoreSpec:
    return StoreSpec(30, 6, (12, 12), 8, 4, "2x", 0.5, "batch", QuantConfig("mr", 2), aug, record, 5)


BOTH = {"shuffle_patches": 2, **RANDOM_FILL}


@pytest.mark.parametrize("record", ["explicit", "seed"])
def test_store_records_and_replays_both_switches(tmp_path, record):
    u8 = torch.randint(0, 256, (30, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    images = augment.to_model_input(u8, MEAN, STD)
    spec = _spec(AugConfig(out_size=12, **BOTH), record)
    path = tmp_path / record
    assert prepare(path, spec, META) == "new"
    teacher = Recorder(6)
    generate(path, teacher, images)
    finalize(path)
    store = LabelStore.open(path, verify="full")
    assert len(store) == len(teacher.seen)
    for i in range(len(store)):
        b = store.read(i)
        e, bi = (int(v) for v in store.batch_ids[i])
        want = augment.draw(spec.aug, len(b), spec.image_hw, augment.batch_seed(5, e, bi))
        assert b.aug.equals(want) and b.aug.patch_perm is not None and b.aug.cutout_rgb is not None
        assert torch.equal(augment.replay(images, b, 12), teacher.seen[i])
    comp = store.manifest["accounting"]["components"]
    r = int(store.manifest["num_rows"])
    if record == "explicit":  # counted as record storage (the paper counts every augmentation parameter)
        assert comp["patch_perm"] == r * 2 * 2 and comp["cutout_fill"] == r * 3
        assert store.manifest["accounting"]["records_bytes"] >= comp["patch_perm"] + comp["cutout_fill"]
    else:  # re-derived from the batch seed
        assert "patch_perm" not in comp and "cutout_fill" not in comp


def test_student_module_replays_the_shuffled_and_filled_batch():
    """``StudentModule.replay`` (this batch's uint8 images only) equals the teacher-time ``apply``."""
    from lpld.core.label_store import StoredBatch
    from lpld.lit.student_module import StudentModule

    m = StudentModule(
        model_cfg={"name": "convnet", "width": 8, "depth": 2},
        num_classes=5,
        in_chans=3,
        img_size=8,
        quant_mode="none",
        loss={"name": "kl", "gamma": 0.1, "t2": False},
        temp={"t0": 4.0, "schedule": "none"},
        ca={"mode": "none", "value": None},
        optim={"name": "adamw", "lr": 1e-3},
        epochs=2,
        steps_per_epoch=1,
        mean=MEAN,
        std=STD,
    )
    u8 = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    m.set_images(u8, torch.arange(7) % 5)
    index = torch.tensor([3, 0, 3, 6])
    rec = augment.draw(AugConfig(out_size=8, **BOTH), 4, (8, 8), seed=1)
    stored = StoredBatch(index=index, aug=rec, logits=torch.zeros(4, 5, dtype=torch.float16))
    teacher_time = augment.apply(augment.to_model_input(u8, MEAN, STD), index, rec, 8)
    assert torch.equal(m.replay(stored), teacher_time)


def test_replay_with_both_switches_stays_on_the_device_without_host_syncs():
    """The student replays on the GPU: no op may mix host and device tensors or read device data back."""
    from test_device import META, DeviceGuard

    rec = augment.record_to(augment.draw(AugConfig(out_size=8, **BOTH), 4, (8, 8), seed=1), META)
    images = torch.empty(7, 3, 8, 8, device=META)
    with DeviceGuard():
        out = augment.apply(images, torch.tensor([3, 0, 3, 6], device=META), rec, 8)
    assert out.device == META and out.shape == (4, 3, 8, 8)
    assert rec.patch_perm.device == META and rec.cutout_rgb.device == META


def test_relabel_stage_stores_what_the_teacher_saw_with_both_switches(tmp_path):
    """stage=relabel (Lightning predict loop) with both switches: every stored label is the teacher's output on
    ``apply`` of the stored record, and the record is the seed's draw (fmnist: 1 channel, 28 px, f = 2)."""
    from test_relabel_stage import _setup

    from lpld.artifacts import labels as labels_artifact
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.core.images import load_distilled
    from lpld.stages import relabel

    extra = ["relabel.shuffle_patches=2", "relabel.mix=cutout", "relabel.cutout_fill=random", "prune=1x"]
    cfg = _setup(tmp_path, extra)
    relabel.run(cfg)
    store = LabelStore.open(labels_artifact.path(cfg), verify="full")
    spec = store.spec
    assert spec.aug.shuffle_patches == 2 and spec.aug.fill_mean == tuple(cfg.dataset.mean)
    teacher, _ = teacher_artifact.load(cfg)
    u8, _, _ = load_distilled(Path(store.manifest["meta"]["images_dir"]))
    x_all = augment.to_model_input(u8, tuple(cfg.dataset.mean), tuple(cfg.dataset.std))
    for i in range(len(store)):
        b = store.read(i)
        e, bi = (int(v) for v in store.batch_ids[i])
        assert b.aug.equals(augment.draw(spec.aug, len(b), spec.image_hw, augment.batch_seed(spec.seed, e, bi)))
        with torch.no_grad():
            z = teacher(augment.replay(x_all, b, spec.aug.out_size)).float()
        order = torch.argsort(z, dim=1, descending=True, stable=True)[:, :3]
        assert torch.equal(b.topk_indices, order)
        assert torch.equal(b.topk_values, z.gather(1, order).half())


# ----------------------------------------------------------------------------------------------------------------------
# off = the bytes of before (values computed with the parent commit's lpld/core/augment.py and label_store.py)
# ----------------------------------------------------------------------------------------------------------------------

OLD_RECORD_DIGESTS = {
    "cutmix-True": "595a02bf6779ca6f",
    "cutmix-False": "f9895bde2c21a2c8",
    "cutout-True": "302ceb5a91ef39f2",
    "cutout-False": "24d5647485d8cbc4",
    "none-True": "66a0df5c0c2668b3",
    "none-False": "eaad115130917ab5",
}
OLD_REPLAY_DIGESTS = {"cutmix": "c032e81df241e7c6", "cutout": "e9a74832bebea174"}
OLD_ACCOUNTING = {
    "cutmix": {"records_bytes": 1364, "total": 2452, "npy_headers": 1408, "on_disk_arrays": 3860},
    "cutout": {"records_bytes": 1660, "total": 2748, "npy_headers": 1152, "on_disk_arrays": 3900},
    "none": {"records_bytes": 1080, "total": 2168, "npy_headers": 1024, "on_disk_arrays": 3192},
}
OLD_AUG_DICT = {
    "out_size": 12,
    "scale": [0.08, 1.0],
    "ratio": [0.75, 1.3333333333333333],
    "flip": True,
    "mix": "cutmix",
    "cutmix_alpha": 1.0,
    "cutout_factor": 0.5,
}


def _digest(rec: augment.AugRecord) -> str:
    h = hashlib.sha256()
    for t in (rec.crops, rec.flips, rec.mix_index, rec.box, rec.cutout):
        if t is not None:
            h.update(t.numpy().tobytes())
    h.update(repr(rec.lam).encode())
    return h.hexdigest()[:16]


def test_off_records_and_replay_are_the_old_bytes():
    for key, want in OLD_RECORD_DIGESTS.items():
        mix, flip = key.split("-")
        rec = augment.draw(AugConfig(out_size=24, mix=mix, flip=flip == "True"), 10, (24, 24), 12345)
        assert rec.patch_perm is None and rec.cutout_rgb is None and rec.fill_norm is None
        assert _digest(rec) == want, key
    u8 = torch.arange(5 * 3 * 24 * 24).reshape(5, 3, 24, 24).remainder(256).to(torch.uint8)
    imgs = augment.to_model_input(u8, MEAN, STD)
    for mix, want in OLD_REPLAY_DIGESTS.items():
        x = augment.apply(imgs, torch.arange(5), augment.draw(AugConfig(out_size=24, mix=mix), 5, (24, 24), 7), 24)
        assert hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16] == want, mix


def test_off_layout_accounting_and_identity_are_the_old_ones():
    assert AugConfig(out_size=12).to_dict() == OLD_AUG_DICT
    assert AugConfig.from_dict(OLD_AUG_DICT) == AugConfig(out_size=12)  # stores written before the switches
    for mix, want in OLD_ACCOUNTING.items():
        spec = StoreSpec(30, 12, (12, 12), 8, 6, "3x", 0.6, "batch", QuantConfig("mr", 4), AugConfig(12, mix=mix))
        ids = spec.batch_ids()
        layout = array_layout(spec, len(ids), int(row_offsets(spec, ids)[-1]))
        assert not {"patch_perm", "cutout_rgb"} & {a.name for a in layout}
        acc = accounting(layout)
        assert {k: acc[k] for k in want} == want, mix
    on = AugConfig(out_size=12, shuffle_patches=2).to_dict()
    assert on == {**OLD_AUG_DICT, "shuffle_patches": 2}
    assert AugConfig.from_dict(json.loads(json.dumps(on))) == AugConfig(out_size=12, shuffle_patches=2)


# ----------------------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------------------


def _aug(overrides: list[str]) -> AugConfig:
    from lpld.artifacts import labels as labels_artifact

    return labels_artifact.store_spec(compose_cfg(overrides)).aug


T8 = ["experiment=table8_rded", "dataset=in1k", "model=resnet18", "ipc=10"]


def test_table8_turns_shuffle_patches_on_with_rdeds_factor_for_producer_and_consumer():
    relabel, student = _aug([*T8, "stage=relabel"]), _aug([*T8, "stage=student"])
    assert relabel == student and relabel.shuffle_patches == 2 and relabel.cutout_fill == "zero"
    assert relabel.to_dict()["shuffle_patches"] == 2
    assert (
        _aug([*T8, "stage=relabel", "relabel.shuffle_patches=0"]).to_dict()
        == _aug(
            ["dataset=in1k", "model=resnet18", "ipc=10", "stage=relabel", "dataset.recipe.student.rrc_scale=[0.5,1.0]"]
        ).to_dict()
    )


def test_in21k_selects_the_random_colour_with_its_normalization():
    a = _aug(["dataset=in21k", "stage=relabel"])
    cfg = compose_cfg(["dataset=in21k"])
    assert a.mix == "cutout" and a.cutout_fill == "random" and a.shuffle_patches == 0
    assert a.fill_mean == tuple(cfg.dataset.mean) and a.fill_std == tuple(cfg.dataset.std)
    assert _aug(["dataset=in21k", "stage=student"]) == a
    # another mix keeps the plain identity; the lpld choice stays a switch
    assert _aug(["dataset=in21k", "stage=relabel", "relabel.mix=cutmix"]).cutout_fill == "zero"
    plain = {k: v for k, v in a.to_dict().items() if k not in ("cutout_fill", "fill_mean", "fill_std")}
    assert _aug(["dataset=in21k", "stage=relabel", "relabel.cutout_fill=zero"]).to_dict() == plain


@pytest.mark.parametrize("overrides", [[], ["dataset=in1k", "stage=relabel"], ["dataset=tiny", "stage=relabel"]])
def test_other_configs_keep_both_switches_off(overrides):
    d = _aug(overrides).to_dict()
    assert not {"shuffle_patches", "cutout_fill", "fill_mean", "fill_std"} & set(d)
