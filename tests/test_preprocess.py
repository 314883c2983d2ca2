from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from infertune.errors import UsageError
from infertune.preprocess import PreprocessSpec


def _img(h=30, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_json_round_trip(tmp_path):
    spec = PreprocessSpec(color="BGR", resize=256, interpolation="bicubic", center_crop=(224, 224),
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), layout="NHWC")
    spec.save(tmp_path / "s.json")
    assert PreprocessSpec.load(tmp_path / "s.json") == spec


def test_each_step_against_numpy():
    img = _img()
    # layout, BGR, scale, mean/std
    spec = PreprocessSpec(color="BGR", mean=(1, 2, 3), std=(2, 4, 8), scale=1.0, layout="NHWC")
    want = (img[:, :, ::-1].astype(np.float32) - [1, 2, 3]) / [2, 4, 8]
    np.testing.assert_allclose(spec.apply(img)[0], want, rtol=1e-6)
    nchw = PreprocessSpec(scale=1.0).apply(img)
    assert nchw.shape == (1, 3, 30, 40) and nchw.dtype == np.float32
    np.testing.assert_array_equal(nchw[0], img.transpose(2, 0, 1).astype(np.float32))
    # shorter side resize + centre crop, against Pillow itself
    out = PreprocessSpec(resize=20, interpolation="bilinear", center_crop=(16, 16), scale=1.0,
                         layout="NHWC", dtype="uint8").apply(img)
    ref = np.asarray(Image.fromarray(img[:, :, 0]).resize((27, 20), Image.Resampling.BILINEAR))
    top, left = (20 - 16) // 2, (27 - 16) // 2
    np.testing.assert_array_equal(out[0, :, :, 0], ref[top : top + 16, left : left + 16])
    gray = PreprocessSpec(color="GRAY", scale=1.0, dtype="uint8").apply(img)
    pil_gray = np.asarray(Image.fromarray(img).convert("L"))
    assert gray.shape == (1, 1, 30, 40)
    assert np.abs(gray[0, 0].astype(int) - pil_gray).max() <= 1


@pytest.mark.parametrize("bad", [
    {"color": "YUV"}, {"interpolation": "cubic"}, {"layout": "CHW"}, {"std": (0,)},
    {"mean": (1, 2)},
])
def test_bad_specs_are_usage_errors(bad):
    with pytest.raises(UsageError):
        PreprocessSpec(**bad)


def test_unknown_keys_rejected():
    with pytest.raises(UsageError, match="unknown keys rezise"):
        PreprocessSpec.from_dict({"rezise": 3})
