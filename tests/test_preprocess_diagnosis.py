"""Each planted preprocessing mismatch is named, on the digits CNN and on natural photos."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import DIGITS
from infertune.analysis.preprocess_diagnosis import diagnose
from infertune.errors import UsageError
from infertune.model import Model
from infertune.preprocess import PreprocessSpec
from models import _model, _w

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _digit_images(n: int = 12) -> list[np.ndarray]:
    """8x8 digits blown up (bicubic) to 30x30 and tinted, so grey conversion depends on channel order."""
    from PIL import Image
    from sklearn.datasets import load_digits

    tint = np.array([1.0, 0.7, 0.3])
    out = []
    for d in load_digits().images[:n] * (255.0 / 16.0):
        big = np.asarray(Image.fromarray(d.astype(np.uint8)).resize((30, 30), Image.Resampling.BICUBIC), np.float64)
        out.append(np.clip(big[:, :, None] * tint, 0, 255).astype(np.uint8))
    return out


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:  # china.jpg, flower.jpg
        h, w = img.shape[:2]
        out += [img[: h // 2, : w // 2], img[h // 2 :, w // 2 :], img[: h // 2, w // 2 :], img]
    return out


def _photo_model() -> Model:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits = [_w("w", (8, 3, 3, 3), 40), _w("b", (8,), 41, 0.1), _w("wf", (10, 512), 42, 0.1), _w("bf", (10,), 43)]
    return Model.from_proto(_model(nodes, [x], [y], inits, "photo_cnn"))


DIGITS_SPEC = PreprocessSpec(color="GRAY", resize=(8, 8), interpolation="box", scale=1 / 255)
PHOTO_SPEC = PreprocessSpec(color="RGB", resize=36, interpolation="bilinear", center_crop=(32, 32), scale=1 / 255,
                            mean=IMAGENET[0], std=IMAGENET[1])

# planted mismatch -> (deployed spec, images flipped?, the transform that must be named)
PLANTED = {
    "channel order": (lambda s: s, True),
    "scale": (lambda s: replace(s, scale=1.0), False),
    "normalisation": (lambda s: replace(s, mean=(0.5,), std=(0.5,)) if s.color == "GRAY"
                      else replace(s, mean=(0.0,), std=(1.0,)), False),
    "layout": (lambda s: replace(s, layout="NHWC"), False),
    "interpolation": (lambda s: replace(s, interpolation="nearest"), False),
    "dtype": (lambda s: replace(s, dtype="uint8"), False),
}


@pytest.fixture(scope="module")
def cases():
    return {"digits": (Model.load(DIGITS / "digits_cnn.onnx"), _digit_images(), DIGITS_SPEC),
            "photos": (_photo_model(), _photos(), PHOTO_SPEC)}


@pytest.mark.parametrize("kind", ["digits", "photos"])
@pytest.mark.parametrize("planted", list(PLANTED))
def test_each_planted_mismatch_is_named(cases, kind, planted):
    model, images, good = cases[kind]
    deploy, flip = PLANTED[planted]
    given = [im[:, :, ::-1].copy() for im in images] if flip else images
    # the reference: outputs of the right pipeline on the right images
    reference = diagnose(model, images, good, reference_spec=good)
    assert reference.explained_by is None and reference.finding.startswith("no preprocessing mismatch")
    from infertune import backends

    runner = backends.compile(model)
    ref_outputs = [runner.run({model.inputs[0].name: good.apply(im)}) for im in images]
    d = diagnose(model, given, deploy(good), reference_outputs=ref_outputs)
    assert d.explained_by == planted, d.to_dict()
    assert d.finding.startswith(f"preprocessing mismatch: {planted}")


def test_two_specs_mode_and_bad_calls(cases):
    model, images, good = cases["photos"]
    d = diagnose(model, images, replace(good, scale=1.0), reference_spec=good)
    assert d.explained_by == "scale"
    with pytest.raises(UsageError):
        diagnose(model, images, good)
    two = replace(good, scale=1.0, interpolation="nearest")
    d = diagnose(model, images, two, reference_spec=good)
    assert d.explained_by is None and "more than one transform differs" in d.finding


def test_cli_names_the_mismatch(cases, tmp_path, capsys):
    import json

    from PIL import Image

    from infertune.cli import main

    model, images, good = cases["photos"]
    d = tmp_path / "images"
    d.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(d / f"{i:02d}.png")
    onnx_path = tmp_path / "m.onnx"
    onnx.save(model.proto, str(onnx_path))
    good.save(tmp_path / "good.json")
    replace(good, color="BGR").save(tmp_path / "deployed.json")
    assert main(["diagnose-preprocess", str(onnx_path), str(d), "--spec", str(tmp_path / "deployed.json"),
                 "--reference-spec", str(tmp_path / "good.json"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["explained_by"] == "channel order"
    assert main(["diagnose-preprocess", str(onnx_path), str(d), "--spec", str(tmp_path / "deployed.json")]) == 2
    assert "exactly one of" in capsys.readouterr().err
