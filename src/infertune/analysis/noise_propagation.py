"""Fast sensitivity: the noise each quantized group injects, times how much the graph amplifies it.

Three measurements, from two runs over the evaluation set (the float model with every tensor
exposed, and a *noise probe* of it):

- ``ActivationNoise``: the noise-to-signal power (NSR) each activation's own 8-bit Q/DQ adds,
  applied to the float values (deep in a quantized model the upstream noise would dwarf it);
- ``weight_nsr``: the NSR of each node's quantized weights, from the Q/DQ constants (no data);
- the gain of every node, from a layerwise compare of the float model with ``noise_probe``: the
  float model with rounding noise at every activation the Q/DQ model quantizes, at 1/16 of its
  8-bit step (noise power 1/256, float weights, no clipping).

Why a probe and not the quantized model itself: fully quantized, MiniLM's output is at 6 dB
SQNR, and the noise at every node is mostly what everything upstream left there; gains measured
in that state rank groups worse than gains measured with small noise everywhere (Spearman of
fast vs exact on MiniLM 0.70 from the quantized model in an ad-hoc comparison; from the probe
0.85, rec 0.87, in benchmarks/results/sensitivity.md).
The scores rank groups; they are not the output NSR a group causes alone: in that benchmark
their median ratio to exact mode's is 0.11 on MiniLM and 1.5 on rec, the interquartile range
spanning 4x and 22x.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from infertune.model import Model

PROBE_STEP = 1 / 16  # of each activation's 8-bit quantization step
MAX_GAIN = 10.0  # per node; ad hoc on rec: at 3 the Spearman of fast vs exact drops 0.87 -> 0.80, at 30 to 0.86
ADDITIVE = frozenset({"Add", "Sub", "Sum", "Concat"})
BILINEAR = frozenset({"MatMul"})


def activation_qdq(qdq: Model) -> dict[str, tuple[float, float, int, int]]:
    """Activation -> (scale, zero point, qmin, qmax) of the per-tensor QuantizeLinear reading it."""
    consts = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    params: dict[str, tuple[float, float, int, int]] = {}
    for n in qdq.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in consts or n.input[1] not in consts:
            continue
        scale = consts[n.input[1]]
        zp = consts.get(n.input[2]) if len(n.input) > 2 else None
        if scale.size != 1:
            continue
        info = np.iinfo(zp.dtype if zp is not None else np.uint8)
        params[n.input[0]] = (float(scale.ravel()[0]), float(zp.ravel()[0]) if zp is not None else 0.0,
                              info.min, info.max)
    return params


class ActivationNoise:
    """Noise-to-signal power of each activation's own Q/DQ, applied to the float values."""

    def __init__(self, qdq: Model) -> None:
        self.params = activation_qdq(qdq)
        self.noise: dict[str, float] = dict.fromkeys(self.params, 0.0)
        self.signal: dict[str, float] = dict.fromkeys(self.params, 0.0)

    def add(self, tensors: dict[str, np.ndarray]) -> None:
        for t, (scale, zp, lo, hi) in self.params.items():
            x = tensors.get(t)
            if x is None or x.dtype.kind != "f":
                continue
            x = np.asarray(x, np.float32).ravel()
            if not np.isfinite(x).all():
                x = np.where(np.isfinite(x), x, np.float32(0))
            deq = np.rint(x / np.float32(scale))
            deq += np.float32(zp)
            np.clip(deq, lo, hi, out=deq)
            deq -= np.float32(zp)
            deq *= np.float32(scale)
            deq -= x  # now the error
            self.noise[t] += float(np.dot(deq, deq))
            self.signal[t] += float(np.dot(x, x))

    def nsr(self) -> dict[str, float]:
        return {t: self.noise[t] / self.signal[t] for t in self.params if self.signal[t] > 0}


def noise_probe(source: Model, qdq: Model, step: float = PROBE_STEP) -> Model:
    """``source`` with round-to-nearest noise at ``step`` x the 8-bit step of every float32
    activation ``qdq`` quantizes per tensor, read by the nodes that read it through its Q/DQ there
    (others still read it in float); the rounded tensor is ``<t>_dequantized``, the name layerwise
    compare matches to ``t``."""
    proto = onnx.ModelProto()
    proto.CopyFrom(source.proto)
    g = proto.graph
    types = source.value_info()
    params = {t: p for t, p in activation_qdq(qdq).items()
              if (info := types.get(t)) is not None and info.dtype == "float32"}
    rounded_for = {t: {n.name for n in qdq.consumers().get(f"{t}_dequantized", [])} for t in params}

    def rounding(t: str) -> list[onnx.NodeProto]:
        s = f"{t}_probe_step"
        g.initializer.append(numpy_helper.from_array(np.array(params[t][0] * step, np.float32), s))
        return [helper.make_node("Div", [t, s], [f"{t}_probe_div"], name=f"{t}/probe_div"),
                helper.make_node("Round", [f"{t}_probe_div"], [f"{t}_probe_round"], name=f"{t}/probe_round"),
                helper.make_node("Mul", [f"{t}_probe_round", s], [f"{t}_dequantized"], name=f"{t}/probe_mul")]

    nodes = [p for i in g.input if i.name in params for p in rounding(i.name)]
    for n in g.node:
        for k, i in enumerate(n.input):
            if n.name in rounded_for.get(i, ()):
                n.input[k] = f"{i}_dequantized"
        nodes.append(n)
        nodes += [p for o in n.output if o in params for p in rounding(o)]
    del g.node[:]
    g.node.extend(nodes)
    return Model.from_proto(proto, check=False)


def _nsr(db: float | None) -> float:
    return 0.0 if db is None or (np.isinf(db) and db > 0) else 10 ** (-db / 10)


def propagated_scores(groups: Sequence[str], absorbed: dict[str, str], source: Model, qdq: Model,
                      probe_rows: Sequence, act_nsr: dict[str, float]) -> dict[str, float]:
    """Per group: the NSR its input Q/DQ and weights inject, times their gain to the outputs.

    ``probe_rows``: layerwise compare of ``source`` with its ``noise_probe``. A node's gain is the
    NSR at its output over that at its inputs: the worst input, or for a MatMul of two
    activations their sum (the relative errors of both factors add); for Add, Sub, Sum and Concat
    per input its signal power over the output's (noise simply adds). An Add read only by a
    Softmax whose other inputs carry no noise (an attention mask: its huge values own the sum's
    power) is measured across the Softmax. A reverse pass composes these into the gain from every
    tensor to the model outputs (1 at an output, the largest over a tensor's readers elsewhere).
    A group's score: each input's Q/DQ noise times the gain through the group's own node (a
    tensor read by several nodes is quantized for this one only), plus its weight noise, times
    the gain from its output (after the activation it absorbs) to the model outputs.
    """
    after = {r.tensor: _nsr(r.sqnr_db) for r in probe_rows}
    before = {r.tensor: _nsr(r.raw_sqnr_db) if r.raw_sqnr_db is not None else after[r.tensor] for r in probe_rows}
    power = {r.tensor: r.signal_power for r in probe_rows}
    readers = source.consumers()
    gain_of: dict[str, float] = {}
    across_softmax: dict[str, float] = {}  # masked Add -> NSR gain to its Softmax's output
    masked: set[str] = set()  # those Softmax nodes
    for n in source.graph.node:
        ins = [after[i] for i in n.input if i in after]
        outs = [before[o] for o in n.output if o in before]
        noisy = sum(ins) if n.op_type in BILINEAR and len(set(n.input)) > 1 else max(ins, default=0.0)
        gain_of[n.name] = min(max(outs) / noisy, MAX_GAIN) if outs and noisy > 0 else 1.0
        sm = readers.get(n.output[0], []) if n.op_type in ("Add", "Sub") else []
        if len(sm) == 1 and sm[0].op_type == "Softmax" and sm[0].output[0] in before:
            noisy_in = [i for i in n.input if after.get(i, 0.0) > 0]
            if len(noisy_in) == 1:
                across_softmax[n.name] = min(before[sm[0].output[0]] / after[noisy_in[0]], MAX_GAIN)
                masked.add(sm[0].name)

    def gain(n: onnx.NodeProto, i: str) -> float:
        """How much of input ``i``'s NSR reaches ``n``'s output."""
        if n.name in across_softmax:
            return across_softmax[n.name] if after.get(i, 0.0) > 0 else 0.0
        if n.name in masked:
            return 1.0  # counted by the Add before it
        if n.op_type in ADDITIVE and i in power and power.get(n.output[0], 0.0) > 0:
            return min(power[i] / power[n.output[0]], MAX_GAIN)
        return gain_of[n.name]

    to_output: dict[str, float] = {o.name: 1.0 for o in source.outputs}
    for n in reversed(source.graph.node):  # topological order, reversed
        g_out = max((to_output.get(o, 0.0) for o in n.output), default=0.0)
        for i in n.input:
            to_output[i] = max(to_output.get(i, 0.0), gain(n, i) * g_out)
    w_nsr = weight_nsr(source, qdq)
    nodes = {n.name: n for n in source.graph.node}
    last = {g: g for g in groups}
    for activation, producer in absorbed.items():
        if producer in last:
            last[producer] = activation
    scores = {}
    for g in groups:
        node = nodes.get(g)
        if node is None:
            continue
        out_gain = max((to_output.get(o, 0.0) for o in nodes[last[g]].output), default=0.0)
        injected = sum(act_nsr.get(i, 0.0) * gain(node, i) for i in node.input)
        scores[g] = (injected + w_nsr.get(g, 0.0)) * out_gain
    return scores


def weight_nsr(source: Model, qdq: Model) -> dict[str, float]:
    """Per node of the Q/DQ model: quantization noise-to-signal power of the weights it reads."""
    consts = {i.name: i for i in qdq.graph.initializer}
    src_consts = source.constant_tensors()
    dequantized: dict[str, float] = {}
    for n in qdq.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in consts:
            continue
        w_name = n.input[0].removesuffix("_quantized")
        w = src_consts.get(w_name)
        if w is None or len(n.input) < 2 or n.input[1] not in consts:
            continue
        q = numpy_helper.to_array(consts[n.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(consts[n.input[1]]).astype(np.float64)
        zp = (numpy_helper.to_array(consts[n.input[2]]).astype(np.float64)
              if len(n.input) > 2 and n.input[2] in consts else np.zeros_like(scale))
        if scale.ndim == 1 and scale.size > 1:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        w = np.asarray(w, np.float64)
        if w.shape != q.shape:
            continue
        err = float(np.sum((w - (q - zp) * scale) ** 2))
        sig = float(np.sum(w**2))
        dequantized[n.output[0]] = err / sig if sig else 0.0
    out: dict[str, float] = {}
    for n in qdq.graph.node:
        for i in n.input:
            if i in dequantized:
                out[n.name] = out.get(n.name, 0.0) + dequantized[i]
    return out
