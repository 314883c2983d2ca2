"""Tiny ONNX models built in code with onnx.helper, registered in one place.

Every builder returns an ``onnx.ModelProto`` with real (seeded random) weights. ``MODELS``
maps a name to a builder so tests can loop over all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, inits=(), name="tiny", opset=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                          producer_name="infertune-tests")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _w(name: str, shape, seed: int, scale: float = 0.5) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def conv() -> onnx.ModelProto:
    """x[N,3,16,16] -> Conv(8 out, 3x3, pad 1, stride 1) + bias -> Relu -> y[N,8,16,16]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return _model(nodes, [x], [y], [_w("w", (8, 3, 3, 3), 1), _w("b", (8,), 2)], "conv")


def grouped_conv() -> onnx.ModelProto:
    """x[1,4,10,10] -> Conv(group 2, 6 out, 3x3, stride 2, no pad) -> y[1,6,4,4]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 10, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4, 4])
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="gconv", group=2,
                              strides=[2, 2], kernel_shape=[3, 3])]
    return _model(nodes, [x], [y], [_w("w", (6, 2, 3, 3), 3)], "grouped_conv")


def conv_transpose() -> onnx.ModelProto:
    """x[1,4,5,5] -> ConvTranspose(weight [4,3,2,2], stride 2) -> y[1,3,10,10]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 10, 10])
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv",
                              strides=[2, 2], kernel_shape=[2, 2])]
    return _model(nodes, [x], [y], [_w("w", (4, 3, 2, 2), 4)], "conv_transpose")


def gemm() -> onnx.ModelProto:
    """x[N,32] -> Gemm(transB, W [10,32]) + bias -> Softmax -> probs[N,10] (a classifier)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])
    nodes = [
        helper.make_node("Gemm", ["x", "W", "B"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    return _model(nodes, [x], [y], [_w("W", (10, 32), 5), _w("B", (10,), 6)], "gemm")


def attention() -> onnx.ModelProto:
    """Batched attention: q,k,v [B,H,S,D] -> softmax(q @ k^T) @ v, with symbolic B and S."""
    shape = ["B", 2, "S", 8]
    q, k, v = (helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv")
    o = helper.make_tensor_value_info("o", TensorProto.FLOAT, shape)
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="pv"),
    ]
    return _model(nodes, [q, k, v], [o], name="attention")


def reshape_matmul() -> onnx.ModelProto:
    """A MatMul after a data-dependent Reshape: static inference cannot tell its shape."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["R", 5])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("ReduceProd", ["s"], ["n"], name="numel", keepdims=1),
        helper.make_node("Div", ["n", "k24"], ["rows"], name="rows"),
        helper.make_node("Concat", ["rows", "k24"], ["newshape"], name="cat", axis=0),
        helper.make_node("Reshape", ["x", "newshape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "W"], ["y"], name="mm"),
    ]
    inits = [numpy_helper.from_array(np.array([24], np.int64), "k24"), _w("W", (24, 5), 7)]
    return _model(nodes, [x], [y], inits, "reshape_matmul")


def if_subgraph() -> onnx.ModelProto:
    """An If whose branches hold a Relu / Neg: peers crash on subgraphs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    out_then = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])
    out_else = helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4])
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="then_relu")],
                               "then", [], [out_then])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="else_neg")],
                               "else", [], [out_else])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="positive"),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g,
                         else_branch=else_g),
    ]
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    return _model(nodes, [x], [y], inits, "if_subgraph")


def stateful_vad() -> onnx.ModelProto:
    """Like silero VAD: input [1,16], state [2,1,16], scalar int64 sr; the MatMul sits inside an If on
    sr == 16000 (its weight an initializer of the branch), a Where on the same condition picks the new
    state. Outputs: output [1,1] (a probability) and stateN [2,1,16]."""
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 16])
    state = helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, 1, 16])
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1])
    state_n = helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, 16])

    def branch(name: str, seed: int) -> onnx.GraphProto:
        feat = helper.make_tensor_value_info(f"{name}_feat", TensorProto.FLOAT, [1, 16])
        nodes = [helper.make_node("MatMul", ["input", f"{name}_w"], [f"{name}_mm"], name=f"{name}_matmul"),
                 helper.make_node("Relu", [f"{name}_mm"], [f"{name}_feat"], name=f"{name}_relu")]
        return helper.make_graph(nodes, name, [], [feat], initializer=[_w(f"{name}_w", (16, 16), seed)])

    nodes = [
        helper.make_node("Equal", ["sr", "rate16k"], ["is16k"], name="is_16k"),
        helper.make_node("If", ["is16k"], ["feat"], name="by_rate", then_branch=branch("k16", 40),
                         else_branch=branch("k8", 41)),
        helper.make_node("Add", ["state", "feat"], ["pre"], name="mix"),
        helper.make_node("Tanh", ["pre"], ["tanh_state"], name="squash"),
        helper.make_node("Expand", ["is16k", "state_shape"], ["gate"], name="gate"),
        helper.make_node("Where", ["gate", "tanh_state", "state"], ["stateN"], name="keep_or_update"),
        helper.make_node("MatMul", ["feat", "head_w"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["output"], name="prob"),
    ]
    inits = [numpy_helper.from_array(np.array(16000, np.int64), "rate16k"),
             numpy_helper.from_array(np.array([2, 1, 16], np.int64), "state_shape"), _w("head_w", (16, 1), 42)]
    return _model(nodes, [inp, state, sr], [out, state_n], inits, "stateful_vad")


def duplicate_names() -> onnx.ModelProto:
    """Two nodes share a name and one has none: ONNX Runtime refuses this as it is."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="dup"),
        helper.make_node("Neg", ["a"], ["b"], name="dup"),
        helper.make_node("Abs", ["b"], ["y"], name=""),
    ]
    return _model(nodes, [x], [y], name="duplicate_names")


def two_inputs() -> onnx.ModelProto:
    """ids int64 [N,S] and a float mask [N,S]: Gather embeddings, scale by the mask."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "S"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["N", "S"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 4])
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"], name="embed"),
        helper.make_node("Unsqueeze", ["attention_mask", "axes"], ["m"], name="unsq"),
        helper.make_node("Mul", ["e", "m"], ["y"], name="mask"),
    ]
    inits = [_w("emb", (100, 4), 8), numpy_helper.from_array(np.array([2], np.int64), "axes")]
    return _model(nodes, [ids, mask], [y], inits, "two_inputs")


def small_cnn() -> onnx.ModelProto:
    """x[N,3,12,12] -> Conv-Relu -> MaxPool -> Conv-Relu + residual Add -> GAP -> Flatten -> Gemm -> logits[N,10]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Add", ["r2", "p1"], ["res"], name="residual"),
        helper.make_node("GlobalAveragePool", ["res"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits = [_w("w1", (8, 3, 3, 3), 10), _w("b1", (8,), 11, 0.1), _w("w2", (8, 8, 3, 3), 12, 0.2),
             _w("b2", (8,), 13, 0.1), _w("wf", (10, 8), 14), _w("bf", (10,), 15, 0.1)]
    return _model(nodes, [x], [y], inits, "small_cnn")


def masked_matmul() -> onnx.ModelProto:
    """s = x + mask (mask holds -inf) feeds one MatMul; a second MatMul reads x directly."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 8])
    y1 = helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", 4])
    y2 = helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 4])
    nodes = [
        helper.make_node("Add", ["x", "mask"], ["s"], name="apply_mask"),
        helper.make_node("MatMul", ["s", "W1"], ["y1"], name="masked_mm"),
        helper.make_node("MatMul", ["x", "W2"], ["y2"], name="plain_mm"),
    ]
    return _model(nodes, [x, mask], [y1, y2], [_w("W1", (8, 4), 16), _w("W2", (8, 4), 17)], "masked_matmul")


def mlp_bias() -> onnx.ModelProto:
    """x[N,8,16] -> MatMul -> Add(bias) -> MatMul -> y: ort-cpu quantizes the bias Add, OpenVINO refuses that."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16])
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="bias"),
             helper.make_node("MatMul", ["hb", "W2"], ["y"], name="mm2")]
    return _model(nodes, [x], [y], [_w("W1", (16, 16), 18, 0.3), _w("b", (16,), 19, 1.0), _w("W2", (16, 16), 20, 0.3)],
                  "mlp_bias")


def linear_bias(shape=("N", 8, 16)) -> onnx.ModelProto:
    """x[shape] -> MatMul(W 16x32) -> Add(bias) -> y: a transformer's projection whose output is read in float."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], 32])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
             helper.make_node("Add", ["h", "b"], ["y"], name="bias")]
    return _model(nodes, [x], [y], [_w("W", (16, 32), 1, 0.3), _w("b", (32,), 2, 1.0)], "linear_bias")


def masked_attention() -> onnx.ModelProto:
    """One self-attention block as BERT exports it: x[N,16,32] -> query/key/value MatMuls ->
    q @ k^T * 1/sqrt(32) + mask (0 or float32 min per key position) -> Softmax -> @ v -> output
    MatMul -> + x."""
    s, d = 16, 32
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", s, d])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, s])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", s, d])
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="query"),
             helper.make_node("MatMul", ["x", "Wk"], ["k"], name="key"),
             helper.make_node("MatMul", ["x", "Wv"], ["v"], name="value"),
             helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["qk"], name="scores"),
             helper.make_node("Mul", ["qk", "scale"], ["scaled"], name="scale"),
             helper.make_node("Add", ["scaled", "mask"], ["masked"], name="apply_mask"),
             helper.make_node("Softmax", ["masked"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["ctx"], name="context"),
             helper.make_node("MatMul", ["ctx", "Wo"], ["o"], name="out_proj"),
             helper.make_node("Add", ["o", "x"], ["y"], name="residual")]
    inits = [_w("Wq", (d, d), 40, 0.4), _w("Wk", (d, d), 41, 0.4), _w("Wv", (d, d), 42, 0.2),
             _w("Wo", (d, d), 43, 0.2), numpy_helper.from_array(np.array(1 / np.sqrt(d), np.float32), "scale")]
    return _model(nodes, [x, mask], [y], inits, "masked_attention")


def _const(name: str, value) -> onnx.NodeProto:
    """A Constant node (how Paddle exports hold weights and scalars)."""
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=numpy_helper.from_array(np.asarray(value, np.float32), name))


def _conv_bn(prefix: str, x: str, c_in: int, c_out: int, seed: int) -> tuple[list[onnx.NodeProto], str]:
    """Conv (weight in a Constant node, no bias) -> BatchNormalization (Constant parameters)."""
    rng = np.random.default_rng(seed)
    params = {"w": rng.standard_normal((c_out, c_in, 3, 3)) * 0.4, "scale": rng.uniform(0.5, 1.5, c_out),
              "bias": rng.standard_normal(c_out) * 0.2, "mean": rng.standard_normal(c_out) * 0.2,
              "var": rng.uniform(0.5, 2.0, c_out)}
    nodes = [_const(f"{prefix}_{k}", v) for k, v in params.items()]
    nodes += [helper.make_node("Conv", [x, f"{prefix}_w"], [f"{prefix}_conv"], name=f"{prefix}_conv",
                               kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
              helper.make_node("BatchNormalization", [f"{prefix}_conv", *(f"{prefix}_{k}" for k in
                               ("scale", "bias", "mean", "var"))], [f"{prefix}_bn"], name=f"{prefix}_bn",
                               epsilon=1e-5)]
    return nodes, f"{prefix}_bn"


def _hardswish(prefix: str, x: str, paddle_order: bool) -> tuple[list[onnx.NodeProto], str]:
    """x * Clip(x + 3, 0, 6) / 6, as Paddle orders it (Add->Clip->Mul->Div) or Add->Clip->Div->Mul."""
    nodes = [_const(f"{prefix}_three", 3.0), _const(f"{prefix}_zero", 0.0), _const(f"{prefix}_six", 6.0),
             _const(f"{prefix}_six_div", 6.0),
             helper.make_node("Add", [x, f"{prefix}_three"], [f"{prefix}_add"], name=f"{prefix}_add"),
             helper.make_node("Clip", [f"{prefix}_add", f"{prefix}_zero", f"{prefix}_six"], [f"{prefix}_clip"],
                              name=f"{prefix}_clip")]
    if paddle_order:
        nodes += [helper.make_node("Mul", [x, f"{prefix}_clip"], [f"{prefix}_mul"], name=f"{prefix}_mul"),
                  helper.make_node("Div", [f"{prefix}_mul", f"{prefix}_six_div"], [f"{prefix}_out"],
                                   name=f"{prefix}_div")]
    else:
        nodes += [helper.make_node("Div", [f"{prefix}_clip", f"{prefix}_six_div"], [f"{prefix}_div"],
                                   name=f"{prefix}_div"),
                  helper.make_node("Mul", [f"{prefix}_div", x], [f"{prefix}_out"], name=f"{prefix}_mul")]
    return nodes, f"{prefix}_out"


def paddle_block() -> onnx.ModelProto:
    """A Paddle-style block, opset 11, every weight in a Constant node: x[N,3,12,12] -> Conv-BN ->
    HardSwish (Paddle's Add->Clip->Mul->Div) -> Conv-BN -> HardSwish (Add->Clip->Div->Mul) -> y
    [N,8,12,12], then GlobalAveragePool -> Flatten -> Gemm(transB) -> BN -> probs[N,4]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12, 12])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])
    nodes, t = _conv_bn("b1", "x", 3, 8, 11)
    more, t = _hardswish("hs1", t, paddle_order=True)
    nodes += more
    more, t = _conv_bn("b2", t, 8, 8, 12)
    nodes += more
    more, _ = _hardswish("hs2", t, paddle_order=False)
    nodes += more
    nodes.append(helper.make_node("Identity", ["hs2_out"], ["y"], name="y_identity"))
    rng = np.random.default_rng(13)
    nodes += [_const("fc_w", rng.standard_normal((4, 8)) * 0.5), _const("fc_b", rng.standard_normal(4) * 0.1),
              _const("fc_scale", rng.uniform(0.5, 1.5, 4)), _const("fc_bias", rng.standard_normal(4) * 0.2),
              _const("fc_mean", rng.standard_normal(4) * 0.2), _const("fc_var", rng.uniform(0.5, 2.0, 4)),
              helper.make_node("GlobalAveragePool", ["hs2_out"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"], name="fc", transB=1),
              helper.make_node("BatchNormalization", ["fc", "fc_scale", "fc_bias", "fc_mean", "fc_var"], ["probs"],
                               name="fc_bn")]
    return _model(nodes, [x], [y, probs], name="paddle_block", opset=11)


def activations() -> onnx.ModelProto:
    """Decomposed activations after 1x1 convolutions (opset 13, initializers): a HardSigmoid gate
    Clip(c + 3, 0, 6) / 6 multiplying the input, PP-OCRv4's Swish c * Sigmoid(c * 1.0), GELU in its erf
    form ((c * (1 + Erf(c / sqrt 2))) * 0.5) and its tanh form (c * (0.5 * (1 + Tanh(sqrt(2/pi) *
    (c + 0.044715 c^3))))), each between two convolutions."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    inits = [_w(f"w{i}", (4, 4, 1, 1), 20 + i) for i in range(5)]
    scalars = {"three": 3.0, "zero": 0.0, "six": 6.0, "one": 1.0, "half": 0.5, "sqrt2": np.sqrt(2.0),
               "c": np.sqrt(2 / np.pi), "k": 0.044715}
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars.items()]
    mk = helper.make_node
    nodes = [mk("Conv", ["x", "w0"], ["c0"], name="conv0"),
             mk("Add", ["c0", "three"], ["g_add"], name="gate_add"),
             mk("Clip", ["g_add", "zero", "six"], ["g_clip"], name="gate_clip"),
             mk("Div", ["g_clip", "six"], ["gate"], name="gate_div"),
             mk("Mul", ["x", "gate"], ["gated"], name="gate_mul"),
             mk("Conv", ["gated", "w1"], ["c1"], name="conv1"),
             mk("Mul", ["c1", "one"], ["c1_beta"], name="swish_beta"),
             mk("Sigmoid", ["c1_beta"], ["c1_sig"], name="swish_sigmoid"),
             mk("Mul", ["c1", "c1_sig"], ["swish"], name="swish_mul"),
             mk("Conv", ["swish", "w2"], ["c2"], name="conv2"),
             mk("Div", ["c2", "sqrt2"], ["e_div"], name="gelu_div"),
             mk("Erf", ["e_div"], ["e_erf"], name="gelu_erf"),
             mk("Add", ["e_erf", "one"], ["e_add"], name="gelu_add"),
             mk("Mul", ["c2", "e_add"], ["e_mul"], name="gelu_mul"),
             mk("Mul", ["e_mul", "half"], ["gelu"], name="gelu_half"),
             mk("Conv", ["gelu", "w3"], ["c3"], name="conv3"),
             mk("Pow", ["c3", "three"], ["t_cube"], name="tanh_cube"),
             mk("Mul", ["k", "t_cube"], ["t_k"], name="tanh_k"),
             mk("Add", ["c3", "t_k"], ["t_inner"], name="tanh_inner"),
             mk("Mul", ["c", "t_inner"], ["t_scaled"], name="tanh_scaled"),
             mk("Tanh", ["t_scaled"], ["t_tanh"], name="tanh"),
             mk("Add", ["t_tanh", "one"], ["t_one"], name="tanh_one"),
             mk("Mul", ["half", "t_one"], ["t_half"], name="tanh_half"),
             mk("Mul", ["c3", "t_half"], ["gelu_tanh"], name="tanh_mul"),
             mk("Conv", ["gelu_tanh", "w4"], ["y"], name="conv4")]
    return _model(nodes, [x], [y], inits, "activations", opset=13)
def _channel_scaled(name: str, shape, seed: int, low: float, high: float) -> onnx.TensorProto:
    """Random weights whose output channels (axis 0) span ``low`` .. ``high`` in magnitude."""
    rng = np.random.default_rng(seed)
    spread = np.logspace(np.log10(low), np.log10(high), shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    w = rng.standard_normal(shape) * spread
    return numpy_helper.from_array(w.astype(np.float32), name)


def cle_chain() -> onnx.ModelProto:
    """Four layers, three equalisable pairs: Conv(3->8)+bias -> Relu -> depthwise Conv(8, group 8, its
    weight in a Constant node as Paddle exports it) -> Clip(0, 6) -> Conv 1x1 (8->6, no bias) ->
    BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm(6->4). Conv1's output channels
    span four decades in magnitude."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    dw = _channel_scaled("dw_value", (8, 1, 3, 3), 22, 0.5, 2.0)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Constant", [], ["dw"], name="dw_const", value=dw),
        helper.make_node("Conv", ["r1", "dw", "b2"], ["c2"], name="dwconv", pads=[1, 1, 1, 1], kernel_shape=[3, 3],
                         group=8),
        helper.make_node("Clip", ["c2", "zero", "six"], ["r2"], name="relu6"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="pwconv", kernel_shape=[1, 1]),
        helper.make_node("BatchNormalization", ["c3", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    rng = np.random.default_rng(23)
    inits = [_channel_scaled("w1", (8, 3, 3, 3), 21, 0.01, 10.0), _w("b1", (8,), 24, 0.1), _w("b2", (8,), 25, 0.1),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six"),
             _channel_scaled("w3", (6, 8, 1, 1), 26, 0.1, 3.0),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, 6).astype(np.float32), "gamma"),
             _w("beta", (6,), 27, 0.2), _w("mean", (6,), 28, 0.2),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, 6).astype(np.float32), "var"),
             _w("wf", (4, 6), 29), _w("bf", (4,), 30, 0.1)]
    return _model(nodes, [x], [y], inits, "cle_chain")


def smooth_block() -> onnx.ModelProto:
    """A transformer-like block with an outlier channel: x[N,16,32] -> LayerNormalization (its
    gamma makes channel 5 ~40x the others) -> ln; ln -> MatMul(Wa) + ba -> Relu -> MatMul(Wc) and
    ln -> MatMul(Wb), summed -> y. ln feeds only MatMuls (the division folds into the
    normalisation); the Relu output feeds one MatMul (an explicit Mul goes before it)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 32])
    gamma = np.ones(32, np.float32)
    gamma[5] = 40.0
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["ln", "Wa"], ["a"], name="mm_a"),
        helper.make_node("Add", ["a", "ba"], ["ab"], name="bias_a"),
        helper.make_node("Relu", ["ab"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "Wc"], ["c"], name="mm_c"),
        helper.make_node("MatMul", ["ln", "Wb"], ["b"], name="mm_b"),
        helper.make_node("Add", ["c", "b"], ["y"], name="sum"),
    ]
    wa = _w("Wa", (32, 48), 31, 0.2)
    inits = [numpy_helper.from_array(gamma, "gamma"), _w("beta", (32,), 32, 0.1), wa, _w("ba", (48,), 33, 0.1),
             _channel_scaled("Wc", (48, 32), 34, 0.01, 1.0), _w("Wb", (32, 32), 35, 0.2)]
    return _model(nodes, [x], [y], inits, "smooth_block")


def outlier_matmul() -> onnx.ModelProto:
    """x[N,8,32] -> MatMul(W [32,24]) -> y: with inputs whose channel 3 is ~50x the others
    (the tests plant it), SmoothQuant has something to smooth and an alpha to choose."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 24])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    return _model(nodes, [x], [y], [_w("W", (32, 24), 36, 0.3)], "outlier_matmul")


def imbalanced_convnet(silu: bool = False, kernel: int = 1) -> onnx.ModelProto:
    """x[N,3,16,16] -> Conv(3->16, 3x3) + bias -> Relu -> Conv 1x1 (16->8) + bias -> y. Conv1's output
    channels span three decades and Conv2 weighs its small channels up, so every channel matters
    to y: one per-tensor range for the activation between them rounds the small channels away,
    which cross-layer equalisation undoes (FP32 outputs unchanged). ``silu``: SiLU (Sigmoid, Mul) in
    place of the Relu, as YOLOv8 exports it: not positively homogeneous, so equalisation cannot
    scale through it. ``kernel`` 3: Conv2 is a padded 3x3 of stride 2 (y [N,8,8,8]), as YOLOv8's stem
    and downsampling convolutions are."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    side = 16 if kernel == 1 else 8
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, side, side])
    spread = np.logspace(-3, 0, 16).astype(np.float32)
    rng = np.random.default_rng(37)
    w1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * spread[:, None, None, None]
    w2 = rng.standard_normal((8, 16, kernel, kernel)).astype(np.float32) * (0.1 / spread)[None, :, None, None]
    activation = [helper.make_node("Sigmoid", ["c1"], ["s1"], name="silu1_sigmoid"),
                  helper.make_node("Mul", ["c1", "s1"], ["r1"], name="silu1")] if silu else \
        [helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        *activation,
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", kernel_shape=[1, 1]) if kernel == 1 else
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2", kernel_shape=[kernel, kernel],
                         pads=[kernel // 2] * 4, strides=[2, 2]),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array((spread * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), _w("b2", (8,), 38, 0.1)]
    name = "silu_convnet" if silu else "imbalanced_convnet"
    return _model(nodes, [x], [y], inits, name if kernel == 1 else f"{name}_{kernel}x{kernel}")


def tailed_convnet() -> onnx.ModelProto:
    """x[N,3,16,16] -> Conv 3x3 -> SiLU (Sigmoid, Mul) -> a[N,16,16,16] -> Conv 1x1 -> y[N,8,16,16], as
    YOLOv8's stem: fed inputs with rare spikes (``tailed_feeds``), ``a`` has a long tail in every channel
    (most values within a few units, a few hundredths of them tens of times larger)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16, 16])
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Sigmoid", ["c1"], ["s1"], name="silu_sigmoid"),
        helper.make_node("Mul", ["c1", "s1"], ["a"], name="silu"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["y"], name="conv2", kernel_shape=[1, 1]),
    ]
    inits = [_w("w1", (16, 3, 3, 3), 41, 0.3), _w("b1", (16,), 42, 0.1), _w("w2", (8, 16, 1, 1), 43, 0.3),
             _w("b2", (8,), 44, 0.1)]
    return _model(nodes, [x], [y], inits, "tailed_convnet")


def tailed_feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Inputs of ``tailed_convnet``: standard normal, one value in a hundred 30x larger."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((1, 3, 16, 16))
        out.append({"x": (x * np.where(rng.random(x.shape) < 0.01, 30.0, 1.0)).astype(np.float32)})
    return out


def _rounding_biased(name: str, shape, axis: int, seed: int, step: float = 0.01) -> onnx.TensorProto:
    """Weights whose round-to-nearest errors do not cancel: per channel (``axis``) one weight is
    127 steps (it sets the int8 scale to ``step``), every other one k + 0.4 steps, so nearest
    rounding takes 0.4 steps off almost every weight."""
    rng = np.random.default_rng(seed)
    w = (rng.integers(-100, 100, shape) + 0.4) * step
    index = [slice(None)] * len(shape)
    for i in range(len(shape)):
        if i != axis:
            index[i] = 0
    w[tuple(index)] = 127 * step
    return numpy_helper.from_array(w.astype(np.float32), name)


def bias_shift_net() -> onnx.ModelProto:
    """x[N,4,8,8] -> Conv 3x3 (no bias) -> Relu -> GlobalAveragePool -> Flatten -> Gemm (bias) ->
    MatMul (no bias) -> y[N,5]; each weight rounds systematically one way and every layer's input has
    a positive mean, so each quantized layer's mean output shifts (two of them have no bias to correct)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["h"], name="fc", transB=1),
        helper.make_node("MatMul", ["h", "wm"], ["y"], name="mm"),
    ]
    inits = [_rounding_biased("wc", (6, 4, 3, 3), 0, 39), _rounding_biased("wg", (7, 6), 0, 40),
             numpy_helper.from_array(np.full(7, 3.0, np.float32), "bg"), _rounding_biased("wm", (7, 5), 1, 42)]
    return _model(nodes, [x], [y], inits, "bias_shift_net")


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv": conv,
    "grouped_conv": grouped_conv,
    "conv_transpose": conv_transpose,
    "gemm": gemm,
    "attention": attention,
    "reshape_matmul": reshape_matmul,
    "if_subgraph": if_subgraph,
    "stateful_vad": stateful_vad,
    "duplicate_names": duplicate_names,
    "two_inputs": two_inputs,
    "small_cnn": small_cnn,
    "masked_matmul": masked_matmul,
    "mlp_bias": mlp_bias,
    "masked_attention": masked_attention,
    "paddle_block": paddle_block,
    "activations": activations,
    "cle_chain": cle_chain,
    "smooth_block": smooth_block,
    "outlier_matmul": outlier_matmul,
    "imbalanced_convnet": imbalanced_convnet,
    "silu_convnet": lambda: imbalanced_convnet(silu=True),
    "silu_convnet_3x3": lambda: imbalanced_convnet(silu=True, kernel=3),
    "tailed_convnet": tailed_convnet,
    "bias_shift_net": bias_shift_net,
}
