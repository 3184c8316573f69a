"""Model registry: every architecture builds for 1/3 channels at small sizes, structure, checkpoints,
penultimate features, pretrained weights from a (fake) local cache and the fast offline failure.

No test downloads anything: pretrained tests either point the caches at tmp_path or simulate offline.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import lpld.models.pretrained as pretrained_mod
from lpld.core.bn_hooks import bn_layers
from lpld.models import (
    MODEL_REGISTRY,
    ModelCheckpointError,
    PretrainedWeightsError,
    build_model,
    classifier_module,
    forward_with_features,
    host_reachable,
    model_names,
    penultimate_features,
)
from lpld.models.swin import auto_window_size, stage_resolutions
from lpld.models.torchvision_models import adapt_rgb_kernel
from lpld.stages import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
# independent list: which registry models must carry BatchNorm layers (BN matching needs them)
NO_BN = {"swinv2_tiny"}
EXPECTED_NAMES = {
    "convnet", "resnet18", "resnet50", "resnet101", "resnet18_cifar", "resnet50_cifar", "resnet101_cifar",
    "mobilenetv2", "efficientnet_b0", "shufflenetv2", "swinv2_tiny",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No cached weights anywhere and every host unreachable; a download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(pretrained_mod, "host_reachable", lambda *a, **k: False)

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path


def cfg(name: str, **kw) -> dict:
    return {"name": name, "pretrained": False, "checkpoint": None, "tag": None, **kw}


def test_registry_has_every_architecture():
    # plus `timm`: any timm model by name (knob arch), the fallback of student.arch (tests/test_student_arch.py)
    assert set(model_names()) == EXPECTED_NAMES | {"timm"}


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
@pytest.mark.parametrize("chans,size", [(1, 28), (3, 32)])
def test_forward_shape_bn_and_features(name, chans, size):
    torch.manual_seed(0)
    model = build_model(cfg(name), num_classes=7, in_chans=chans, img_size=size).eval()
    assert model.lpld_model_name == name
    x = torch.randn(2, chans, size, size)
    with torch.no_grad():
        logits, feats = forward_with_features(model, x)
        assert logits.shape == (2, 7)
        assert torch.isfinite(logits).all()
        head = classifier_module(model)
        assert head.out_features == 7
        # the captured features are exactly the classifier's input: applying it reproduces the logits
        assert feats.shape == (2, head.in_features)
        torch.testing.assert_close(head(feats), logits)
        torch.testing.assert_close(penultimate_features(model, x), feats)
    assert (len(bn_layers(model)) > 0) == (name not in NO_BN)
    # one train step runs (BN in train mode with batch 2 at the smallest maps)
    model.train()
    model(x).sum().backward()


def test_penultimate_matches_manual_resnet_and_convnet():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    m = build_model(cfg("resnet18"), 5, 3, 32).eval()
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        h = m.layer4(m.layer3(m.layer2(m.layer1(h))))
        ref = torch.flatten(m.avgpool(h), 1)
        torch.testing.assert_close(penultimate_features(m, x), ref)
    c = build_model(cfg("convnet"), 5, 3, 32).eval()
    with torch.no_grad():
        torch.testing.assert_close(penultimate_features(c, x), c.features(x).flatten(1))


@pytest.mark.parametrize("size,side", [(28, 3), (32, 4), (64, 8)])
def test_convnet_structure(size, side):
    m = build_model(cfg("convnet", width=128, depth=3, norm="batch"), 10, 1, size)
    blocks = list(m.features)
    assert len(blocks) == 3
    for i, block in enumerate(blocks):
        conv, norm, act, pool = list(block)
        assert isinstance(conv, nn.Conv2d) and conv.out_channels == 128 and conv.kernel_size == (3, 3)
        assert conv.in_channels == (1 if i == 0 else 128) and conv.padding == (1, 1)
        assert isinstance(norm, nn.BatchNorm2d) and isinstance(act, nn.ReLU)
        assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.stride == 2
    assert m.classifier.in_features == 128 * side * side
    assert len(bn_layers(m)) == 3


def test_convnet_norm_options_and_knobs():
    m_in = build_model(cfg("convnet", norm="instance"), 10, 3, 32)
    gns = [mod for mod in m_in.modules() if isinstance(mod, nn.GroupNorm)]
    assert len(gns) == 3 and all(g.num_groups == 128 and g.num_channels == 128 and g.affine for g in gns)
    assert not bn_layers(m_in)
    m_none = build_model(cfg("convnet", norm="none"), 10, 3, 32)
    assert not bn_layers(m_none) and not any(isinstance(mod, nn.GroupNorm) for mod in m_none.modules())
    m_small = build_model(cfg("convnet", width=16, depth=2), 4, 3, 32)
    assert len(m_small.features) == 2 and m_small.classifier.in_features == 16 * 8 * 8
    with pytest.raises(ConfigError, match="norm"):
        build_model(cfg("convnet", norm="layer"), 10, 3, 32)
    with pytest.raises(ConfigError, match="img_size"):
        build_model(cfg("convnet", depth=3), 10, 3, 4)


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet50_cifar", "resnet101_cifar"])
def test_small_stem(name):
    m = build_model(cfg(name), 10, 3, 32)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.padding == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    # the stem keeps the spatial size: layer1 sees 32x32 (ImageNet stem: 8x8)
    seen = {}

    def hook(_m, _i, out):
        seen["shape"] = out.shape

    m.layer1.register_forward_hook(hook)
    m.eval()(torch.randn(2, 3, 32, 32))
    assert seen["shape"][-2:] == (32, 32)
    # the body is torchvision's own ResNet
    assert isinstance(m, tvm.ResNet)


def test_small_stem_knob_equals_cifar_name():
    torch.manual_seed(1)
    a = build_model(cfg("resnet18", small_stem=True), 10, 3, 32)
    torch.manual_seed(1)
    b = build_model(cfg("resnet18_cifar"), 10, 3, 32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    plain = build_model(cfg("resnet18"), 10, 3, 32)
    assert plain.conv1.kernel_size == (7, 7) and isinstance(plain.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "efficientnet_b0", "shufflenetv2", "swinv2_tiny"])
def test_first_conv_takes_in_chans(name):
    m = build_model(cfg(name), 10, 1, 32)
    first = next(mod for mod in m.modules() if isinstance(mod, nn.Conv2d))
    assert first.in_channels == 1


@pytest.mark.parametrize("container", ["raw", "state_dict", "model", "lightning", "ddp", "safetensors"])
def test_checkpoint_round_trip(tmp_path, container):
    torch.manual_seed(0)
    src = build_model(cfg("convnet", width=8), 3, 1, 28)
    with torch.no_grad():  # make BN buffers non-default so they are checked too
        src(torch.randn(4, 1, 28, 28))
    src.eval()
    sd = src.state_dict()
    payload = {
        "raw": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "fingerprint": "abc"},
        "lightning": {"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "criterion.w": torch.ones(1)}},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "safetensors": sd,
    }[container]
    if container == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "teacher.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "teacher.pt"
        torch.save(payload, path)
    torch.manual_seed(123)  # a different init, so equality can only come from the checkpoint
    dst = build_model(cfg("convnet", width=8, checkpoint=str(path)), 3, 1, 28).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_checkpoint_skips_pretrained_download(tmp_path, offline):
    src = build_model(cfg("resnet18"), 10, 3, 32)
    path = tmp_path / "t.pt"
    torch.save(src.state_dict(), path)
    # pretrained + checkpoint: the checkpoint wins and nothing is fetched (offline fixture would fail it)
    dst = build_model(cfg("resnet18", pretrained=True, checkpoint=str(path)), 10, 3, 32)
    assert torch.equal(dst.conv1.weight, src.conv1.weight)


def test_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelCheckpointError, match="does not exist"):
        build_model(cfg("convnet", checkpoint=str(missing)), 10, 3, 32)
    # right architecture, wrong class count: names the checkpoint, the model and the mismatched key
    other = tmp_path / "ten_classes.pt"
    torch.save(build_model(cfg("convnet"), 10, 3, 32).state_dict(), other)
    with pytest.raises(ModelCheckpointError) as e:
        build_model(cfg("convnet", checkpoint=str(other)), 100, 3, 32)
    msg = str(e.value)
    assert str(other) in msg and "'convnet'" in msg and "classifier.weight" in msg and "shape" in msg
    # a different architecture: missing / unexpected keys
    with pytest.raises(ModelCheckpointError, match="missing key.*unexpected key"):
        build_model(cfg("resnet18", checkpoint=str(other)), 10, 3, 32)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelCheckpointError, match="could not read"):
        build_model(cfg("convnet", checkpoint=str(junk)), 10, 3, 32)
    no_sd = tmp_path / "no_sd.pt"
    torch.save({"epoch": 1, "note": "x"}, no_sd)
    with pytest.raises(ModelCheckpointError, match="no state dict"):
        build_model(cfg("convnet", checkpoint=str(no_sd)), 10, 3, 32)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown model.name='resnet19'.*convnet.*resnet18_cifar"):
        build_model(cfg("resnet19"), 10, 3, 32)
    with pytest.raises(ConfigError, match="does not accept.*widht"):
        build_model(cfg("convnet", widht=64), 10, 3, 32)
    with pytest.raises(ConfigError, match="pretrained"):
        build_model(cfg("convnet", pretrained="yes"), 10, 3, 32)
    with pytest.raises(ConfigError, match="no published weights"):
        build_model(cfg("convnet", pretrained=True), 10, 3, 32)
    with pytest.raises(ConfigError, match="small_stem"):
        build_model(cfg("resnet18", small_stem="false"), 10, 3, 32)
    with pytest.raises(ConfigError, match="in_chans"):
        build_model(cfg("convnet"), 10, 0, 32)


def test_conf_files_build(tmp_path):
    files = sorted(CONF_DIR.glob("*.yaml"))
    expected = {
        "convnet", "convnet_in", "resnet18", "resnet18_cifar", "resnet50", "resnet101", "mobilenetv2",
        "efficientnet_b0", "shufflenetv2", "swinv2_tiny",
    }  # fmt: skip
    assert {f.stem for f in files} >= expected
    from conftest import compose_cfg

    composed = {f.stem: compose_cfg([f"model={f.stem}"]).model for f in files}  # YAML + schema (lpld.config)
    for stem, data in composed.items():
        assert data["name"] in MODEL_REGISTRY
        # an architecture option loads no weights; a dataset's teacher option may (teacher_in1k: torchvision's)
        assert {"pretrained", "checkpoint", "tag"} <= set(data) and (
            data["pretrained"] is False or stem == "teacher_in1k"
        )
    conv = composed["convnet"]
    assert (conv.width, conv.depth, conv.norm, conv.checkpoint, conv.tag) == (128, 3, "batch", None, None)
    assert composed["convnet_in"].norm == "instance"
    # DictConfig input works and matches the dict input
    torch.manual_seed(0)
    a = build_model(conv, 10, 1, 28)
    torch.manual_seed(0)
    b = build_model(dict(conv), 10, 1, 28)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for light in ("resnet18_cifar", "swinv2_tiny", "shufflenetv2"):
        m = build_model(composed[light], 10, 3, 32)
        assert m.lpld_model_name == light


def test_swin_window_choice():
    assert stage_resolutions(224) == [56, 28, 14, 7]
    assert stage_resolutions(28) == [7, 4, 2, 1]
    assert auto_window_size(224) == 7 and auto_window_size(256) == 8 and auto_window_size(64) == 8
    assert auto_window_size(96) == 6 and auto_window_size(36) == 8  # 9,5,3,2: nothing tiles -> padded 8
    # brute-force property: the chosen window (when not the fallback) tiles every larger stage map
    for size in range(8, 300, 4):
        w = auto_window_size(size)
        sides = stage_resolutions(size)
        tiles = all(s <= w or s % w == 0 for s in sides)
        better = [v for v in range(w + 1, 9) if all(s <= v or s % v == 0 for s in sides)]
        assert not better
        assert tiles or w == 8
    m = build_model(cfg("swinv2_tiny", window_size=4), 10, 3, 32)
    assert [layer.blocks[0].window_size for layer in m.layers] == [(4, 4), (4, 4), (2, 2), (1, 1)]


def test_adapt_rgb_kernel():
    w = torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(adapt_rgb_kernel(w, 1), w.sum(1, keepdim=True))
    # grey input replicated to RGB gives the same response as the summed kernel on the grey input
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(
        nn.functional.conv2d(x.expand(-1, 3, -1, -1), w), nn.functional.conv2d(x, adapt_rgb_kernel(w, 1))
    )
    w5 = adapt_rgb_kernel(w, 5)
    assert w5.shape == (4, 5, 3, 3)
    torch.testing.assert_close(w5[:, :3], w * 0.6)
    torch.testing.assert_close(w5[:, 3:], w[:, :2] * 0.6)


# ------------------------------------------------------------------------------------ pretrained


def test_host_reachable_is_fast():
    # 192.0.2.1 is TEST-NET-1 (never routed): the probe must give up within its bound
    for host in ("192.0.2.1", "no-such-host.invalid"):
        t = time.perf_counter()
        assert host_reachable(host, 443) is False
        assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "efficientnet_b0", "shufflenetv2", "swinv2_tiny"])
def test_pretrained_offline_fails_fast(offline, name):
    t = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as e:
        build_model(cfg(name, pretrained=True), 1000, 3, 32)
    assert time.perf_counter() - t < 1.0
    msg = str(e.value)
    assert f"could not download weights for {name} (no network?)" in msg
    assert "model.pretrained=false" in msg and "model.checkpoint=" in msg


def test_pretrained_offline_hf_offline_env(offline, monkeypatch):
    monkeypatch.setattr(pretrained_mod, "host_reachable", lambda *a, **k: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="HF_HUB_OFFLINE"):
        build_model(cfg("swinv2_tiny", pretrained=True), 1000, 3, 32)


def test_pretrained_torchvision_from_cache(offline):
    """Cached weights load with no network; head replaced for 10 classes; 1-channel conv1 adapted."""
    torch.manual_seed(0)
    published = tvm.resnet18(num_classes=1000).state_dict()
    url = tvm.ResNet18_Weights.IMAGENET1K_V1.url
    ckpt_dir = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    torch.save(published, ckpt_dir / os.path.basename(url))

    m = build_model(cfg("resnet18", pretrained=True), 10, 1, 32)
    sd = m.state_dict()
    torch.testing.assert_close(sd["conv1.weight"], published["conv1.weight"].sum(1, keepdim=True))
    for k in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "bn1.bias"):
        assert torch.equal(sd[k], published[k])
    assert sd["fc.weight"].shape == (10, 512)
    full = build_model(cfg("resnet18", pretrained=True), 1000, 3, 32).state_dict()
    assert all(torch.equal(full[k], published[k]) for k in published)


def test_pretrained_timm_from_cache(offline):
    """timm weights found in the (fake) Hugging Face cache load offline at another size / window / chans."""
    import timm

    torch.manual_seed(0)
    published = timm.create_model("swinv2_tiny_window8_256", pretrained=False).state_dict()
    repo = Path(offline) / "hf_cache" / "models--timm--swinv2_tiny_window8_256.ms_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    torch.save(published, snap / "pytorch_model.bin")

    m = build_model(cfg("swinv2_tiny", pretrained=True), 10, 3, 32)
    sd = m.state_dict()
    for k in ("patch_embed.proj.weight", "layers.2.blocks.3.mlp.fc1.weight", "layers.0.blocks.0.attn.cpb_mlp.0.weight"):
        assert torch.equal(sd[k], published[k]), k
    assert sd["head.fc.weight"].shape == (10, 768)
    m.eval()(torch.randn(2, 3, 32, 32))
