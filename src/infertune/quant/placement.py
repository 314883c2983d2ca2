"""Where Q/DQ go: which nodes run in INT8, which tensors need ranges, which weights quantize.

Rules per target are data (``TARGETS``). ``ort-cpu`` follows what ONNX Runtime's CPU graph
optimiser actually fuses (measured on ORT 1.32, see docs/ort-fusion.md):

- compute ops (Conv, MatMul, Gemm) always run in INT8: activation inputs get Q/DQ, constant
  weights get int8 per-channel DQ; Conv and Gemm also need a Q on their output to fuse
  (QLinearConv / QGemm); MatMul gets one only when a consumer runs in INT8 (QLinearMatMul),
  otherwise it fuses to MatMulIntegerToFloat and its output stays float;
- a Relu (or Clip from 0) right after such a node is absorbed: the Q goes after it;
- ops with fused 8-bit kernels (Add, Mul, Concat, pools, Sigmoid, ...) and data-movement ops
  (MaxPool, Reshape, Transpose, ...) join only when all their activation inputs are already
  8-bit, so they never add a Q that costs more than it saves; data-movement outputs share
  their input's scale (ORT drops such Q/DQ pairs only when the parameters match).

``tensorrt`` follows TensorRT's explicit-quantisation placement: Q/DQ at the inputs of the
ops TensorRT quantises (weighted ops, pools, residual Add), int8 symmetric, none on outputs.
Nodes inside If/Loop/Scan subgraphs stay float.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from infertune.errors import UsageError
from infertune.model import Model, iter_graphs
from infertune.quant.qparams import QParams, compute_qparams


@dataclass(frozen=True)
class TargetRules:
    name: str
    activation_dtype: str  # numpy dtype name
    activation_symmetric: bool
    compute_ops: frozenset[str]  # always quantized (unless excluded)
    output_q_ops: frozenset[str]  # compute ops that need a Q on their output to fuse
    fused_ops: frozenset[str]  # 8-bit kernels: join when all activation inputs are 8-bit
    passthrough_ops: frozenset[str]  # run on 8-bit data unchanged; output shares input qparams
    absorbed_ops: frozenset[str]  # activations folded into the producer's output Q
    input_only_ops: frozenset[str] = frozenset()  # (tensorrt) Q/DQ on inputs when they join
    prepare: bool = False  # quantize prepares the float graph first by default (quant.prepare)
    share_dq: bool = False  # float readers of a Q/DQ'd convolution output read its DQ output too
    int16_pairs: bool = False  # CPU kernels sum u8 x s8 pairs in int16 without VNNI: 7 bits where they overflow
    # a signed range gets int8 with zero point 0 when that step is at most this many times the asymmetric one's
    symmetric_within: float = 0.0
    # a signed range a zero-padded convolution reads gets int8 with zero point 0, whatever it costs in step
    symmetric_padded: bool = False

    def activation_qparams(self, lo: float, hi: float, dtype: str | None = None) -> QParams:
        """Scale and zero point of an activation ranged [lo, hi] on this target; ``dtype`` (a recipe's record)
        fixes the kind instead of the rule: int8 with zero point 0, or uint8 with one."""
        if dtype is not None:
            return compute_qparams(lo, hi, dtype, dtype == "int8")
        plain = compute_qparams(lo, hi, self.activation_dtype, self.activation_symmetric)
        if self.symmetric_within and lo < 0 < hi and not self.activation_symmetric:
            sym = compute_qparams(lo, hi, "int8", True)
            if sym.scale <= self.symmetric_within * plain.scale:
                return sym
        return plain


_MOVEMENT = frozenset({"MaxPool", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                       "Resize", "DepthToSpace", "SpaceToDepth", "Identity", "Slice",
                       "Gather", "Split", "Expand", "Tile"})

Target = Literal["ort-cpu", "tensorrt", "openvino", "openvino-padded-int8"]
TARGETS: dict[Target, TargetRules] = {
    "ort-cpu": TargetRules(
        name="ort-cpu",
        activation_dtype="uint8",
        activation_symmetric=False,
        compute_ops=frozenset({"Conv", "MatMul", "Gemm"}),
        output_q_ops=frozenset({"Conv", "Gemm"}),
        fused_ops=frozenset({"Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool",
                             "Sigmoid", "LeakyRelu"}),
        passthrough_ops=_MOVEMENT,
        absorbed_ops=frozenset({"Relu", "Clip"}),
        prepare=True,
        int16_pairs=True,
    ),
    "tensorrt": TargetRules(
        name="tensorrt",
        activation_dtype="int8",
        activation_symmetric=True,
        compute_ops=frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"}),
        output_q_ops=frozenset(),
        fused_ops=frozenset(),
        passthrough_ops=frozenset(),
        absorbed_ops=frozenset(),
        input_only_ops=frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "Add"}),
    ),
}
# OpenVINO's low-precision transformations take Q/DQ on the inputs of the ops they quantize and
# refuse a quantized constant operand of Add/Mul (a bias): TensorRT's placement, uint8 asymmetric.
# Graph preparation on: its compile failed on a Paddle detector whose BatchNormalization was left unfolded.
# (TensorRT folds and fuses at build time, and its placement was validated on graphs as exported: off.)
# share_dq: a Conv output read both through Q/DQ (by a Conv or pool) and directly in float (by an SE gate's
# Mul) made OpenVINO 2026.4 compute garbage when compiled with dynamic dims (PP-OCRv4 det: IoU 0.33 vs
# 0.87 static); with every reader on the DQ output the same file gives 0.871 dynamic and static, where it
# gave 0.872 static before (rec: 3 of 200 lines read differently at full INT8, det latency unchanged).
# Only convolution outputs: sharing every tensor also quantized MiniLM's residual stream (LayerNorm
# outputs read in float by the residual Add), full INT8 embedding cosine 0.9936 -> 0.9894 on OpenVINO.
# int16_pairs: OpenVINO documents the saturation of 8-bit dot products on CPUs without VNNI and prescribes
# 7-bit weights (docs.openvino.ai, "Saturation (overflow) issue workaround"). Measured on an AVX2 EPYC, full
# INT8 with 8-bit weights, the same file computed exactly in float vs on OpenVINO: rec text identical 93.5% vs
# 55.5%, YOLOv8n box F1 0.927 vs 0.771, MiniLM cosine 0.9935 vs 0.9934; with 7-bit weights on OpenVINO
# 61.0%, 0.900 and 0.9925: the runtime then computes what the recipe says, but 7-bit rounding costs as much.
# So quantize gives 7 bits per layer, where the pair sums overflow (quant.pair_overflow, same table).
# symmetric_within: a zero point costs OpenVINO's 8-bit MatMul and convolution a compensation term per
# output. MiniLM, full INT8 + SmoothQuant placed for OpenVINO, 2 threads, each file in its own process
# (benchmarks/results/zero_point.md, Intel Xeon with AMX): uint8 with zero points 3.24 ms, this rule 2.78 ms,
# int8 zero point 0 everywhere 2.66 ms; tune's choice then ran beside NNCF's file at 3.04 vs 3.20 ms
# (tune.md), where it had run at 3.28 vs 2.88 before. Zero point 0 on a range
# [lo, hi] with lo < 0 < hi widens the step by 2 max(-lo, hi) / (hi - lo): 1.0x for a balanced range
# (MiniLM's LayerNorm outputs: 36 of its 48 ranges within 1.25x), 2x for one like a SiLU's or GELU's
# output ([-0.28, 20]), which keeps its zero point. Within 1.25x the tensor loses at most 1.9 dB.
# symmetric_padded (off; on in openvino-padded-int8): a zero point costs most on a padded convolution's input
# (oneDNN pads with the zero point and compensates each output position the padding touches). zero_point.md,
# 2 threads: YOLOv8n with it on, 33 of its 60 signed ranges int8, 4.67 -> 3.93 ms (no zero point at all: 3.76)
# at box F1 0.9350 -> 0.9274 (0.8849 without any); rapidocr's recognizer 2.69 -> 2.56 ms at text identical
# 98.2% -> 83.7%. Model-dependent: not a default; tune measures it (``LEANER``).
TARGETS["openvino"] = TargetRules(**{**TARGETS["tensorrt"].__dict__, "name": "openvino",
                                     "activation_dtype": "uint8", "activation_symmetric": False, "prepare": True,
                                     "share_dq": True, "int16_pairs": True, "symmetric_within": 1.25})
TARGETS["openvino-padded-int8"] = replace(TARGETS["openvino"], name="openvino-padded-int8", symmetric_padded=True)
# a placement with fewer zero points than a target's own, which tune tries on its fastest passing variant
LEANER = {"openvino": "openvino-padded-int8"}

# op type -> index of the weight input, and how to find its output-channel axis
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


def weight_axis(node: onnx.NodeProto, rank: int) -> int:
    """Output-channel axis of the weight input of ``node`` (per-channel scales along it)."""
    op = node.op_type
    if op == "Conv":
        return 0  # [M, C/group, k...]
    if op == "ConvTranspose":
        return 1  # [C, M/group, k...]
    if op == "Gemm":
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute
                        if a.name == "transB"), 0)
        return 0 if trans_b else 1  # B is [N, K] with transB, else [K, N]
    if op == "MatMul":
        return rank - 1  # [..., K, N]
    raise ValueError(f"no weight axis rule for {op}")


@dataclass(frozen=True)
class WeightUse:
    node: str
    input_index: int
    tensor: str
    axis: int

    def to_dict(self) -> dict:
        return {"node": self.node, "input": self.input_index, "tensor": self.tensor,
                "axis": self.axis}


@dataclass
class QuantPlan:
    """The decisions of placement, before any range is known."""

    target: str
    quantized_nodes: list[str]
    activations: list[str]  # tensors needing their own range, in topological order
    shared: dict[str, str]  # tensor -> tensor whose qparams it reuses (passthrough outputs)
    replaced: set[str]  # tensors that every consumer reads dequantized (producer emits 8-bit)
    consumers_q: dict[str, list[str]]  # tensor -> quantized nodes reading it dequantized
    weights: list[WeightUse]
    float_nodes: dict[str, str]  # node -> why it stays float
    absorbed: dict[str, str] = field(default_factory=dict)  # absorbed node -> its producer

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "quantized_nodes": self.quantized_nodes,
            "activations": self.activations,
            "shared": self.shared,
            "weights": [w.to_dict() for w in self.weights],
            "float_nodes": self.float_nodes,
            "absorbed": self.absorbed,
        }


@dataclass(frozen=True)
class Exclusions:
    """Nodes kept float: by exact name, by op type, or by regular expression on the name."""

    names: frozenset[str] = frozenset()
    op_types: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, items: Iterable[str]) -> Exclusions:
        """'op:Softmax', 're:^/head/', or a node name."""
        names, ops, pats = set(), set(), []
        for item in items:
            if item.startswith("op:"):
                ops.add(item[3:])
            elif item.startswith("re:"):
                try:
                    re.compile(item[3:])
                except re.error as e:
                    raise UsageError(f"bad exclusion regex {item[3:]!r}: {e}") from None
                pats.append(item[3:])
            else:
                names.add(item)
        return cls(frozenset(names), frozenset(ops), tuple(pats))

    def reason(self, node: onnx.NodeProto) -> str | None:
        if node.name in self.names:
            return "excluded by name"
        if node.op_type in self.op_types:
            return f"excluded by op type {node.op_type}"
        for p in self.patterns:
            if re.search(p, node.name):
                return f"excluded by regex {p!r}"
        return None

    def check_against(self, model: Model) -> None:
        """Unknown names are an error (a typo would otherwise silently quantize the node)."""
        known = {n.name for g in iter_graphs(model.graph) for n in g.node}
        unknown = sorted(self.names - known)
        if unknown:
            raise UsageError(f"--exclude names no node: {', '.join(unknown[:5])}")

    def to_dict(self) -> dict:
        return {"names": sorted(self.names), "op_types": sorted(self.op_types),
                "patterns": list(self.patterns)}


def plan(model: Model, target: str = "ort-cpu", exclusions: Exclusions | None = None) -> QuantPlan:
    """Decide placement for ``model`` on ``target``."""
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    exclusions = exclusions or Exclusions()
    exclusions.check_against(model)
    planner = _Planner(model, TARGETS[target], exclusions)
    planner.select()
    planner.drop_unread_outputs()
    quantized = [n for n in planner.quantized if n.name in planner.qset]
    activations, consumers_q, replaced = planner.tensors(quantized)
    for g in list(iter_graphs(model.graph))[1:]:
        for n in g.node:
            if n.op_type in planner.rules.compute_ops:
                planner.float_nodes[n.name] = "inside an If/Loop/Scan subgraph"
    return QuantPlan(target=target, quantized_nodes=[n.name for n in quantized],
                     activations=activations, shared=planner.shared, replaced=replaced,
                     consumers_q=consumers_q, weights=planner.weights(quantized), float_nodes=planner.float_nodes,
                     absorbed=planner.absorbed)


class _Planner:
    """The state of one ``plan``: which nodes run in 8-bit and which tensors are 8-bit after them."""

    def __init__(self, model: Model, rules: TargetRules, exclusions: Exclusions) -> None:
        self.model, self.rules, self.exclusions = model, rules, exclusions
        self.const_arrays = model.constant_tensors()
        self.constants = set(self.const_arrays)
        self.consumers = model.consumers()
        self.graph_outputs = {o.name for o in model.graph.output}
        self.float_nodes: dict[str, str] = {}
        self.quantized: list[onnx.NodeProto] = []
        self.qset: set[str] = set()
        self.eight_bit: set[str] = set()  # tensors available as 8-bit after a quantized producer
        self.shared: dict[str, str] = {}
        self.absorbed: dict[str, str] = {}
        self.out_tensor: dict[str, str] = {}  # quantized node -> tensor its output Q sits on

    def acts(self, node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i and i not in self.constants]

    def select(self) -> None:
        """One pass in topological order: each candidate node joins INT8 when the rules allow."""
        rules = self.rules
        for node in self.model.graph.node:
            if node.name in self.absorbed:
                continue
            op = node.op_type
            if not (op in rules.compute_ops or op in rules.fused_ops or op in rules.passthrough_ops
                    or op in rules.input_only_ops):
                continue
            excluded = self.exclusions.reason(node)
            if excluded:
                self.float_nodes[node.name] = excluded
                continue
            if self._joins(node):
                self._quantize(node)

    def _joins(self, node: onnx.NodeProto) -> bool:
        op, rules = node.op_type, self.rules
        if _is_split_sum(node, self.model):
            return False
        if op in rules.compute_ops:
            if op != "MatMul" and len(node.input) > 1 and node.input[1] not in self.constants:
                self.float_nodes[node.name] = f"{op} weight is not a constant"
                return False
            return True
        if op in rules.input_only_ops:
            return op != "Add" or _is_residual_add(node, self.model, self.constants)
        a = self.acts(node)
        return bool(a) and all(t in self.eight_bit for t in a)  # else joining adds a Q that costs more than it saves

    def _quantize(self, node: onnx.NodeProto) -> None:
        rules = self.rules
        self.quantized.append(node)
        self.qset.add(node.name)
        out = node.output[0]
        if node.op_type in rules.passthrough_ops:
            src = self.acts(node)[0]
            self.shared[out] = self.shared.get(src, src)
            self.eight_bit.add(out)
            self.out_tensor[node.name] = out
            return
        if rules.output_q_ops or node.op_type in rules.fused_ops:
            nxt = self.consumers.get(out, [])
            if (len(nxt) == 1 and nxt[0].op_type in rules.absorbed_ops and out not in self.graph_outputs
                    and _absorbable(nxt[0], self.const_arrays) and not self.exclusions.reason(nxt[0])):
                self.absorbed[nxt[0].name] = node.name
                out = nxt[0].output[0]
            self.eight_bit.add(out)
            self.out_tensor[node.name] = out

    def drop_unread_outputs(self) -> None:
        """An output Q nobody reads in 8-bit only costs time and precision: MatMul drops it (fusing
        to MatMulIntegerToFloat); fused and data-movement ops leave INT8 altogether, which can in
        turn leave their producer without 8-bit readers, so repeat until nothing changes."""
        changed = True
        while changed:
            changed = False
            for node in reversed(self.quantized):
                out = self.out_tensor.get(node.name)
                if node.name not in self.qset or out is None or node.op_type in self.rules.output_q_ops:
                    continue
                if any(c.name in self.qset for c in self.consumers.get(out, [])):
                    continue
                self.eight_bit.discard(out)
                self.out_tensor.pop(node.name)
                for k, v in list(self.absorbed.items()):
                    if v == node.name:
                        del self.absorbed[k]
                if node.op_type in self.rules.fused_ops or node.op_type in self.rules.passthrough_ops:
                    self.qset.discard(node.name)
                    self.shared.pop(node.output[0], None)
                    changed = True

    def tensors(self, quantized: list[onnx.NodeProto]) -> tuple[list[str], dict[str, list[str]], set[str]]:
        """Tensors needing their own range (topological order), readers per tensor, and the
        tensors every consumer reads dequantized."""
        consumers_q: dict[str, list[str]] = {}
        for node in quantized:
            for t in self.acts(node):
                consumers_q.setdefault(t, []).append(node.name)
            if node.op_type in self.rules.fused_ops:  # QLinearAdd/Mul/Concat need constant operands in 8-bit too
                for t in node.input:
                    if t in self.const_arrays and self.const_arrays[t].dtype == np.float32:
                        consumers_q.setdefault(t, []).append(node.name)
        replaced = set(self.out_tensor.values())
        activations = [t for t in sorted(set(consumers_q) | replaced, key=_order_key(self.model))
                       if t not in self.shared]
        return activations, consumers_q, replaced

    def weights(self, quantized: list[onnx.NodeProto]) -> list[WeightUse]:
        uses = []
        for node in quantized:
            idx = WEIGHT_INPUT.get(node.op_type)
            if idx is None or idx >= len(node.input) or node.input[idx] not in self.constants:
                continue
            w = node.input[idx]
            uses.append(WeightUse(node.name, idx, w, weight_axis(node, self.const_arrays[w].ndim)))
        return uses


def _absorbable(node: onnx.NodeProto, const_arrays: dict) -> bool:
    if node.op_type == "Relu":
        return True
    if node.op_type == "Clip":  # Clip(min=0, max) folds into the Q's range
        if len(node.input) > 1 and node.input[1] in const_arrays:
            return float(const_arrays[node.input[1]]) == 0.0
    return False


def _is_split_sum(node: onnx.NodeProto, model: Model) -> bool:
    """An Add of two layers of one weight: the parts of a split activation (``range_split``). Their sum was
    one layer's output, which no Q/DQ rounded: it stays float."""
    if node.op_type != "Add" or len(node.input) != 2:
        return False
    producers = model.producers()
    pair = [producers.get(i) for i in node.input]
    return all(
        p is not None and p.op_type in ("Conv", "MatMul", "Gemm") and len(p.input) > 1 for p in pair) and \
        pair[0].input[1] == pair[1].input[1]


def _is_residual_add(node: onnx.NodeProto, model: Model, constants: set[str]) -> bool:
    """An Add of two activations, one of them from a convolution (ResNet-style), maybe after its activation."""
    producers = model.producers()
    ins = [i for i in node.input if i]
    if len(ins) != 2 or any(i in constants for i in ins):
        return False

    def from_conv(t: str) -> bool:
        p = producers.get(t)
        if p is not None and p.op_type in ("Relu", "Clip", "LeakyRelu", "BatchNormalization"):
            p = producers.get(p.input[0])
        return p is not None and p.op_type in ("Conv", "ConvTranspose")

    return any(from_conv(i) for i in ins)


def _order_key(model: Model):
    order = {i.name: -1 for i in model.inputs}
    for k, t in enumerate(model.tensor_order()):
        order.setdefault(t, k)
    return lambda t: order.get(t, len(order))


def padded_conv_inputs(model: Model) -> set[str]:
    """The tensors a convolution reads as its data input with zero padding (``pads``, or ``auto_pad`` SAME_*)."""
    out = set()
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.input:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if any(attrs.get("pads", ())) or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
                out.add(node.input[0])
    return out


def padded_zero_points(qmodel: Model) -> int:
    """How many zero-padded convolutions of a Q/DQ model read their input through a non-zero zero point."""
    inits = {i.name: i for i in qmodel.graph.initializer}
    dq = {n.output[0]: n for n in qmodel.graph.node if n.op_type == "DequantizeLinear"}
    count = 0
    for t in padded_conv_inputs(qmodel):
        node = dq.get(t)
        zp = inits.get(node.input[2]) if node is not None and len(node.input) > 2 else None
        count += zp is not None and bool(np.any(numpy_helper.to_array(zp)))
    return count


def candidate_tensors(model: Model, target: str) -> list[str]:
    """Every float tensor any exclusion set could ask a range for: the activation inputs and outputs
    (and float constant operands) of all nodes the target can run in INT8, in topological order.
    Calibrating these once lets any exclusion set be rebuilt without data (sensitivity, budgets)."""
    rules = TARGETS[target]
    ops = (rules.compute_ops | rules.fused_ops | rules.passthrough_ops | rules.absorbed_ops
           | rules.input_only_ops)
    const_arrays = model.constant_tensors()
    info = model.value_info()
    inputs = {i.name: i for i in model.inputs}
    out: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in ops:
            continue
        weight = WEIGHT_INPUT.get(node.op_type) if node.op_type in rules.compute_ops else None
        for k, t in enumerate(node.input):
            if not t or k == weight or (node.op_type in rules.compute_ops and k > 1):
                continue
            if k > 0 and (node.op_type in rules.passthrough_ops or node.op_type in rules.absorbed_ops):
                continue  # shapes, indices, clip bounds
            if t in const_arrays:
                if node.op_type in rules.fused_ops and const_arrays[t].dtype == np.float32:
                    out.add(t)
                continue
            out.add(t)
        out.update(o for o in node.output[:1] if o)

    def is_float(t: str) -> bool:
        ti = inputs.get(t) or info.get(t)
        return t in const_arrays or ti is None or ti.dtype in ("float32", "", None)

    return sorted((t for t in out if is_float(t)), key=_order_key(model))
