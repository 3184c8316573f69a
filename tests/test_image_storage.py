"""Issue 20, item 7: distilled images are stored as the official recover scripts store them.

LPLD ``recover/data_synthesis_class.py`` ``save_images`` (SRe2L and RDED the same): ``image_np * 255`` cast with
``astype(np.uint8)`` (truncation of the clipped [0, 1] image) and ``pil_image.save('...jpg')`` (JPEG at PIL's
default quality 75). Relabel and the student read the decoded JPEG pixels; the storage is the stored bytes.
``recover.image_format=png recover.quantize=round`` is the lossless switch (lpld before).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import compose_cfg
from PIL import Image

from lpld.core.images import (
    image_file_bytes,
    jpeg_bytes,
    list_images,
    load_distilled,
    png_bytes,
    to_uint8,
    write_class_images,
)
from lpld.core.io import atomic_write_json


def test_truncate_and_round_hand_values():
    # de-normalised values (mean 0, std 1): 0.5 * 255 = 127.5 -> 127 truncated, 128 rounded; out of range clamps
    v = torch.tensor([0.0, 0.5, 0.999, 1.0, 1.2, -0.1, 3.7 / 255, 200.2 / 255]).view(1, 1, 1, -1)
    trunc = to_uint8(v, (0.0,), (1.0,), "truncate").flatten().tolist()
    rnd = to_uint8(v, (0.0,), (1.0,), "round").flatten().tolist()
    assert trunc == [0, 127, 254, 255, 255, 0, 3, 200]
    assert rnd == [0, 128, 255, 255, 255, 0, 4, 200]
    # the official expression on the same float32 values
    official = (np.clip(v.numpy(), 0, 1) * 255).astype(np.uint8).flatten().tolist()
    assert trunc == official
    # normalised input: x * std + mean first
    x = (torch.full((1, 3, 1, 1), 0.3) - 0.5) / 0.25
    assert to_uint8(x, (0.5,) * 3, (0.25,) * 3, "truncate").flatten().tolist() == [76] * 3  # 0.3 * 255 = 76.5
    with pytest.raises(ValueError, match="recover.quantize"):
        to_uint8(v, (0.0,), (1.0,), "ceil")


def _img(seed: int = 0, c: int = 3, hw: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (c, hw, hw), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("channels", [3, 1])
def test_jpeg_bytes_are_the_official_pil_save(tmp_path, channels):
    """The official call: ``Image.fromarray(hwc_uint8).save('x.jpg')`` (no quality argument)."""
    img = _img(1, channels)
    arr = img.permute(1, 2, 0).numpy()
    path = tmp_path / "x.jpg"
    Image.fromarray(arr[:, :, 0] if channels == 1 else arr).save(path)
    assert jpeg_bytes(img) == path.read_bytes()
    assert jpeg_bytes(img, 75) == path.read_bytes() and jpeg_bytes(img, 90) != path.read_bytes()


def _write_folder(root, imgs: list[torch.Tensor], settings: dict) -> None:
    """A complete two-class images folder as stage=recover leaves it (manifest without fingerprints)."""
    for c in range(2):
        write_class_images(root / f"{c:04d}_c{c}", torch.stack(imgs[c * 2 : c * 2 + 2]), settings)
    atomic_write_json(root / "manifest.json", {"complete": True})


def test_jpeg_folder_is_read_as_the_decoded_jpeg_pixels(tmp_path):
    imgs = [_img(s) for s in range(4)]
    _write_folder(tmp_path, imgs, {"image_format": "jpeg", "quantize": "truncate", "jpeg_quality": 75})
    files = list_images(tmp_path)
    assert [f.name for _, f in files] == ["00000.jpg", "00001.jpg"] * 2 and [c for c, _ in files] == [0, 0, 1, 1]
    loaded, labels, _ = load_distilled(tmp_path, verify=False)
    for i, img in enumerate(imgs):
        # independent decode of the bytes the official save would write
        want = np.asarray(Image.open(io.BytesIO(jpeg_bytes(img))))
        assert np.array_equal(loaded[i].permute(1, 2, 0).numpy(), want)
    assert not torch.equal(loaded, torch.stack(imgs))  # lossy: relabel and the student see JPEG pixels
    assert labels.tolist() == [0, 0, 1, 1]
    # storage: the stored bytes, i.e. the JPEG files
    assert image_file_bytes(tmp_path) == sum(len(jpeg_bytes(i)) for i in imgs)


def test_png_switch_round_trips_exactly(tmp_path):
    imgs = [_img(s) for s in range(4)]
    _write_folder(tmp_path, imgs, {"image_format": "png", "quantize": "round"})
    loaded, _, _ = load_distilled(tmp_path, verify=False)
    assert torch.equal(loaded, torch.stack(imgs))
    assert image_file_bytes(tmp_path) == sum(len(png_bytes(i)) for i in imgs)
    assert all(f.suffix == ".png" for _, f in list_images(tmp_path))


def _recover(*overrides: str):
    from lpld.artifacts import images
    from lpld.config import recover_settings

    cfg = compose_cfg(["dataset=in1k", "model=resnet18", "ipc=10", "stage=recover", *overrides])
    return recover_settings(cfg), images.key(cfg)


def test_config_default_is_official_and_the_key_covers_the_format():
    from lpld.errors import ConfigError

    s, key = _recover()
    assert (s["image_format"], s["quantize"], s["jpeg_quality"]) == ("jpeg", "truncate", 75)
    png, key_png = _recover("recover.image_format=png", "recover.quantize=round")
    # the lossless switch adds nothing: folders written before issue 20 keep their keys (test_config_schema pins)
    assert not {"image_format", "quantize", "jpeg_quality"} & set(png)
    _, key_round = _recover("recover.quantize=round")
    _, key_q = _recover("recover.jpeg_quality=90")
    assert len({key, key_png, key_round, key_q}) == 4
    for m in ("sre2l", "cda", "rded"):  # every synthesising method stores its images the same way
        assert _recover(f"recover={m}")[0]["image_format"] == "jpeg"
    real = _recover("recover=random_real")[0]  # real pixels stay exact (conf/recover/random_real.yaml): png + round
    assert not {"image_format", "quantize", "jpeg_quality"} & set(real)
    with pytest.raises(ConfigError, match="recover.image_format"):
        _recover("recover.image_format=webp")
    with pytest.raises(ConfigError, match="recover.quantize"):
        _recover("recover.quantize=ceil")
    with pytest.raises(ConfigError, match="recover.jpeg_quality"):
        _recover("recover.jpeg_quality=0")
