"""Eq. 4 (within-class cosine similarity) and Eq. 5 (MMD^2) against brute-force numpy double loops; stage=analyze."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lpld.core.diversity import (
    class_mean_pairwise_cosine,
    gaussian_kernel,
    median_bandwidth,
    mmd2,
    within_class_cosine,
)


def _brute_cos(f: np.ndarray) -> float:
    n = f.shape[0]
    vals = []
    for i in range(n):
        for j in range(n):
            if i != j:
                vals.append(float(f[i] @ f[j] / (np.linalg.norm(f[i]) * np.linalg.norm(f[j]))))
    return float(np.mean(vals))


def _k(a: np.ndarray, b: np.ndarray, s: float) -> float:
    return math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s))


def _brute_mmd(x: np.ndarray, y: np.ndarray, s: float, unbiased: bool) -> float:
    def mean_k(a, b, same):
        tot, cnt = 0.0, 0
        for i in range(len(a)):
            for j in range(len(b)):
                if same and unbiased and i == j:
                    continue
                tot += _k(a[i], b[j], s)
                cnt += 1
        return tot / cnt

    return mean_k(x, x, True) + mean_k(y, y, True) - 2 * mean_k(x, y, False)


def test_class_cosine_matches_double_loop():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(7, 5, generator=g) + 0.5
    assert class_mean_pairwise_cosine(f) == pytest.approx(_brute_cos(f.numpy().astype(np.float64)), abs=1e-6)


def test_within_class_cosine_mean_std_over_classes():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(13, 6, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1, 0, 3, 2, 1])  # class 3 has one image -> skipped
    res = within_class_cosine(feats, labels)
    ref = {}
    for c in (0, 1, 2):
        ref[c] = _brute_cos(feats[labels == c].numpy().astype(np.float64))
    assert res.skipped == [3]
    assert set(res.per_class) == {0, 1, 2}
    for c, v in ref.items():
        assert res.per_class[c] == pytest.approx(v, abs=1e-6)
    assert res.mean == pytest.approx(np.mean(list(ref.values())), abs=1e-6)
    assert res.std == pytest.approx(np.std(list(ref.values())), abs=1e-6)


def test_cosine_identical_and_orthogonal_images():
    same = torch.ones(4, 3)
    assert class_mean_pairwise_cosine(same) == pytest.approx(1.0)
    ortho = torch.eye(4)
    assert class_mean_pairwise_cosine(ortho) == pytest.approx(0.0, abs=1e-12)
    # scale invariance: cosine ignores feature norms
    g = torch.Generator().manual_seed(2)
    f = torch.rand(5, 8, generator=g)
    scaled = f * torch.tensor([1.0, 10.0, 0.1, 3.0, 7.0])[:, None]
    assert class_mean_pairwise_cosine(scaled) == pytest.approx(class_mean_pairwise_cosine(f), abs=1e-9)


def test_cosine_rejects_bad_input():
    with pytest.raises(ValueError):
        class_mean_pairwise_cosine(torch.randn(1, 4))
    with pytest.raises(ValueError):
        within_class_cosine(torch.randn(3, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_mmd_matches_double_loop(estimator):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=g)
    y = torch.randn(6, 4, generator=g) + 0.7
    sigma = 1.3
    res = mmd2(x, y, sigma=sigma, estimator=estimator)
    ref = _brute_mmd(x.double().numpy(), y.double().numpy(), sigma, unbiased=estimator == "unbiased")
    assert res.mmd2 == pytest.approx(ref, abs=1e-10)
    assert res.sigma == sigma and res.estimator == estimator


def test_mmd_blocked_equals_unblocked():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(23, 3, generator=g)
    y = torch.randn(17, 3, generator=g)
    for est in ("biased", "unbiased"):
        a = mmd2(x, y, sigma=0.9, estimator=est, block=4).mmd2
        b = mmd2(x, y, sigma=0.9, estimator=est, block=1000).mmd2
        assert a == pytest.approx(b, abs=1e-12)


def test_mmd_properties():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 4, generator=g)
    # biased MMD^2 of a sample with itself is exactly 0, and shifting the second sample increases it
    assert mmd2(x, x, sigma=1.0, estimator="biased").mmd2 == pytest.approx(0.0, abs=1e-12)
    near = mmd2(x, x + 0.1, sigma=1.0, estimator="biased").mmd2
    far = mmd2(x, x + 2.0, sigma=1.0, estimator="biased").mmd2
    assert 0 < near < far


def test_median_bandwidth_and_kernel():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([[6.0, 8.0]])
    # pooled pairwise distances: 5, 10, 5 -> median 5
    assert median_bandwidth(x, y) == pytest.approx(5.0)
    k = gaussian_kernel(x, y, sigma=5.0)
    assert k.shape == (2, 1)
    assert float(k[1, 0]) == pytest.approx(math.exp(-25 / 50))
    # default bandwidth = median heuristic
    assert mmd2(x, y, estimator="biased").sigma == pytest.approx(5.0)


def test_median_bandwidth_subsample_is_seeded():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(50, 3, generator=g)
    y = torch.randn(50, 3, generator=g)
    a = median_bandwidth(x, y, max_points=20, generator=torch.Generator().manual_seed(7))
    b = median_bandwidth(x, y, max_points=20, generator=torch.Generator().manual_seed(7))
    assert a == b


def test_mmd_rejects_bad_input():
    with pytest.raises(ValueError):
        mmd2(torch.randn(3, 2), torch.randn(3, 3))
    with pytest.raises(ValueError):
        mmd2(torch.randn(1, 2), torch.randn(3, 2), estimator="unbiased")
    with pytest.raises(ValueError):
        mmd2(torch.randn(3, 2), torch.randn(3, 2), estimator="linear")


# ---- stage=analyze end to end on a tiny random teacher and hand-made distilled folders ----


def _analyze_cfg(tmp_path, **stage):
    from conftest import compose_cfg, frozen

    from lpld.config.schema import AnalyzeStage

    cfg = OmegaConf.create(
        {
            "dataset": compose_cfg(["dataset=demo"], raw=True).dataset,  # the preset as Hydra composes it (schema)
            "model": {
                "name": "convnet",
                "width": 8,
                "depth": 2,
                "norm": "batch",
                "pretrained": False,
                "checkpoint": None,
                "tag": None,
            },
            "stage": OmegaConf.structured(AnalyzeStage),  # the stage's knobs and defaults (lpld.config.schema)
            "recover": {"name": "lpld"},
            "trainer": {"accelerator": "cpu"},
            "logger": {"name": "none", "log_images": False},
            "paths": {
                "root": str(tmp_path),
                "artifacts": str(tmp_path / "art"),
                "data": str(tmp_path / "data"),
                "log_dir": str(tmp_path / "logs"),
            },
            "ipc": 3,
            "seed": 0,
        }
    )
    cfg.stage.real_per_class = 4
    cfg.stage.grid_per_class = 3
    for k, v in stage.items():
        OmegaConf.update(cfg, f"stage.{k}", v)
    return frozen(cfg)


def _write_teacher(cfg):
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.core.io import atomic_torch_save, fingerprint_state_dict
    from lpld.stages.common import build_teacher_model

    torch.manual_seed(0)
    model = build_teacher_model(cfg).eval()
    atomic_torch_save(teacher_artifact.path(cfg), {"state_dict": model.state_dict()})
    return fingerprint_state_dict(model.state_dict())


def _write_distilled(root, teacher_fp, seed, ipc=3, num_classes=10):
    from lpld.core.images import class_dir_name, images_fingerprint, save_png
    from lpld.core.io import atomic_write_json

    g = torch.Generator().manual_seed(seed)
    for c in range(num_classes):
        for i in range(ipc):
            save_png(
                root / class_dir_name(c, f"c{c}") / f"{i:05d}.png",
                torch.randint(0, 256, (1, 28, 28), generator=g, dtype=torch.uint8),
            )
    atomic_write_json(
        root / "manifest.json",
        {
            "method": root.name.split("_")[0],
            "teacher_fingerprint": teacher_fp,
            "complete": True,
            "ipc": ipc,
            "images_fingerprint": images_fingerprint(root),
        },
    )


def test_analyze_stage_end_to_end(tmp_path, capsys):
    from lpld.artifacts import images as images_artifact
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.core.images import load_distilled
    from lpld.data import build_dataset
    from lpld.models import penultimate_features
    from lpld.stages import analyze

    cfg = _analyze_cfg(tmp_path, methods=["lpld", "sre2l", "cda"])  # cda has no images -> skipped
    fp = _write_teacher(cfg)
    dirs = analyze.method_dirs(cfg)
    assert dirs["lpld"] == images_artifact.path(cfg) and dirs["sre2l"].parent == dirs["lpld"].parent
    assert dirs["sre2l"].name.startswith("sre2l_ipc3_seed0_")  # recover=sre2l's images (their knobs signed)
    _write_distilled(dirs["lpld"], fp, seed=1)
    _write_distilled(dirs["sre2l"], fp, seed=2)
    out = analyze.run(cfg)
    res = json.loads((analyze.analysis_dir(cfg) / "analysis.json").read_text())
    assert set(res["methods"]) == {"lpld", "sre2l"}
    assert res["real"]["num_images"] == 40
    # independent recomputation of one method's numbers
    teacher, _ = teacher_artifact.load(cfg)
    imgs, labels, _ = load_distilled(dirs["lpld"])
    from lpld.data.transforms import normalize

    with torch.no_grad():
        f = penultimate_features(teacher, normalize(imgs.float() / 255, cfg.dataset))
    per_class = [_brute_cos(f[labels == c].double().numpy()) for c in range(10)]
    assert res["methods"]["lpld"]["cosine_mean"] == pytest.approx(float(np.mean(per_class)), abs=1e-6)
    train = build_dataset(cfg.dataset, "train")
    idx = analyze.sample_per_class(list(train.targets), 4, 0)
    with torch.no_grad():
        fr = penultimate_features(teacher, torch.stack([train[i][0] for i in idx]))
    ref = mmd2(fr, f, sigma=res["mmd"]["sigma"], estimator="unbiased").mmd2
    assert res["methods"]["lpld"]["mmd2"] == pytest.approx(ref, abs=1e-6)
    assert res["mmd"]["sigma"] == pytest.approx(median_bandwidth(fr), rel=1e-6)
    # Eq. 8 for the demo train set (800 images per class)
    assert res["eq8"]["num_images"] == 8000 and res["eq8"]["min_p"] == pytest.approx(0.1)
    # grids: Fig. 2 style (3 classes x 3 images, 28 px, padding 2) and one file per class
    from lpld.report.grids import read_png_uint8

    grid = read_png_uint8(analyze.analysis_dir(cfg) / "grids" / "lpld.png")
    assert grid.shape == (1, 3 * 30 + 2, 3 * 30 + 2)
    assert torch.equal(grid[:, 2:30, 32:60], imgs[1])
    assert len(list((analyze.analysis_dir(cfg) / "grids" / "lpld").glob("*.png"))) == 10
    assert (analyze.analysis_dir(cfg) / "grids" / "real.png").exists()
    assert "| lpld | 30 |" in capsys.readouterr().out
    assert out["out_dir"] == str(analyze.analysis_dir(cfg))
    # a folder made by another teacher is refused unless allowed
    _write_distilled(dirs["lpld"], "someone-else", seed=1)
    with pytest.raises(Exception, match="allow_other_teacher"):
        analyze.run(cfg)


def test_analyze_eq8_mode_with_counts(tmp_path, capsys):
    from lpld.stages import analyze

    counts = [732] + [1282] * 716 + [1281] * 283
    cfg = _analyze_cfg(tmp_path, mode="eq8", class_counts=counts)
    out = analyze.run(cfg)
    assert out["eq8"]["n"] == 1356
    assert "n >= 1356 batches" in capsys.readouterr().out
    assert json.loads((analyze.analysis_dir(cfg) / "eq8_B256.json").read_text())["n"] == 1356
