"""FP16 conversion for GPU targets: compute in float16, I/O and sensitive ops kept in float32.

Every node that computes on float32 tensors runs in float16 unless a rule keeps it in float32:
reductions and ops whose float16 results lose too much (``KEEP_FP32``: normalisations, softmax,
exponentials and logarithms, cumulative sums), ops whose output type is fixed by an attribute
(Cast, ConstantOfShape, random generators), Q/DQ nodes, nodes inside If/Loop/Scan bodies, and
nodes named in ``keep_nodes``.

Naming: an fp16 node reads and writes ``<tensor>__fp16``; a float32 node reads ``<tensor>``.
Where the two meet, one Cast per tensor and direction is inserted. Float constants read by
float16 nodes get a float16 copy, their values clipped to the float16 range (counted). Graph
inputs and outputs keep their names and float32 types.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from infertune.errors import ModelError, UsageError
from infertune.model import Model, iter_graphs

FP16_MAX = float(np.finfo(np.float16).max)
SUFFIX = "__fp16"

KEEP_FP32: dict[str, str] = {
    "LayerNormalization": "normalisation: mean/variance over many values overflow or lose bits in float16",
    "SimplifiedLayerNormalization": "normalisation",
    "GroupNormalization": "normalisation",
    "InstanceNormalization": "normalisation",
    "LpNormalization": "normalisation",
    "Softmax": "reduction: exp-sum over a row loses precision in float16",
    "LogSoftmax": "reduction",
    "ReduceMean": "reduction",
    "ReduceSum": "reduction",
    "ReduceSumSquare": "reduction: squares overflow float16",
    "ReduceL2": "reduction",
    "ReduceLogSumExp": "reduction",
    "ReduceProd": "reduction",
    "Pow": "powers overflow float16 (LayerNorm's variance)",
    "Sqrt": "part of a normalisation",
    "Exp": "overflows float16 above 11",
    "Log": "loses precision near 1 in float16",
    "CumSum": "running sums lose bits",
    "Range": "index arithmetic",
    "TopK": "ordering ties change in float16",
    "NonMaxSuppression": "box arithmetic",
}
TYPE_FIXED = frozenset({"Cast", "CastLike", "ConstantOfShape", "RandomNormal", "RandomUniform", "RandomNormalLike",
                        "RandomUniformLike", "EyeLike", "Multinomial", "QuantizeLinear", "DequantizeLinear",
                        "DynamicQuantizeLinear", "Constant"})
TYPE_AGNOSTIC = frozenset({"Shape", "Size"})  # read whatever precision the tensor has
FLOAT32_ONLY_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}  # roi / scales stay float32


@dataclass
class FP16Result:
    model: Model
    fp16_nodes: list[str]
    fp32_nodes: dict[str, str]  # node -> why it stays float32
    casts_inserted: int
    clipped_values: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"fp16_nodes": len(self.fp16_nodes), "fp32_nodes": self.fp32_nodes,
                "casts_inserted": self.casts_inserted, "clipped_values": self.clipped_values,
                "warnings": self.warnings}


def to_fp16(model: Model, *, keep_fp32_ops: Iterable[str] | None = None, keep_nodes: Iterable[str] = ()) -> FP16Result:
    """A copy of ``model`` computing in float16 where the rules allow it."""
    keep_ops = dict(KEEP_FP32) if keep_fp32_ops is None else {op: "kept float32 on request" for op in keep_fp32_ops}
    keep_names = set(keep_nodes)
    model.require_ir(4, "FP16 conversion")
    known = {n.name for sub in iter_graphs(model.graph) for n in sub.node}
    unknown = sorted(keep_names - known)
    if unknown:
        raise UsageError(f"keep_nodes names no node: {', '.join(unknown[:5])}")
    types = _elem_types(model)
    floats = {t for t, et in types.items() if et == TensorProto.FLOAT}
    if not floats:
        raise ModelError(f"{model.name} has no float32 tensor to convert"
                         + (" (it is float16 already)" if TensorProto.FLOAT16 in types.values() else ""))
    fp16, fp32 = _decide(model, floats, keep_ops, keep_names)
    writer = _Fp16Writer(model, floats, fp16)
    proto = writer.write()
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ModelError(f"the float16 graph failed ONNX validation (a bug): {str(e).splitlines()[0]}") from None
    out = Model(proto=proto, path=None, renamed_nodes=dict(model.renamed_nodes))
    clipped = writer.clipped
    warnings = [f"{clipped} constant value(s) beyond the float16 range were clipped to ±65504"] if clipped else []
    casts = sum(1 for n in proto.graph.node if n.op_type == "Cast" and n.name.endswith(("_to_fp16", "_to_fp32")))
    return FP16Result(out, [n.name for n in model.graph.node if n.name in fp16], fp32, casts, clipped, warnings)


def _decide(model: Model, floats: set[str], keep_ops: dict[str, str],
            keep_names: set[str]) -> tuple[set[str], dict[str, str]]:
    """The nodes that compute in float16, and those kept float32 with the reason."""
    fp16: set[str] = set()
    fp32: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type == "Constant" or not any(t in floats for t in [*n.input, *n.output]):
            continue  # constants are copied to float16 where float16 nodes read them
        why = _why_fp32(n, keep_ops, keep_names)
        if why:
            fp32[n.name] = why
        elif n.op_type not in TYPE_AGNOSTIC:
            fp16.add(n.name)
    for sub in list(iter_graphs(model.graph))[1:]:
        for n in sub.node:
            fp32.setdefault(n.name, "inside an If/Loop/Scan subgraph")
    if not fp16:
        raise ModelError(f"nothing to convert in {model.name}: every float node is kept float32 by rule")
    return fp16, fp32


class _Fp16Writer:
    """Rewrites a copy of the model: float16 nodes read and write ``t__fp16`` tensors; a Cast (or a
    float16 copy of a constant) is made once per tensor and direction, right where it is first needed."""

    def __init__(self, model: Model, floats: set[str], fp16: set[str]) -> None:
        self.proto = onnx.ModelProto()
        self.proto.CopyFrom(model.proto)
        self.g = self.proto.graph
        self.floats, self.fp16 = floats, fp16
        self.consts = model.constant_tensors()
        self.producer_fp16 = {o for n in self.g.node if n.name in fp16 for o in n.output if o in floats}
        self.graph_outputs = {o.name for o in self.g.output}
        self.casts: dict[tuple[str, int], str] = {}
        self.new_inits: list[onnx.TensorProto] = []
        self.pending: list[onnx.NodeProto] = []  # casts to emit before the node being rewritten
        self.clipped = 0

    def half(self, t: str) -> str:
        """The float16 name of float tensor t, creating its Cast or constant copy once."""
        if t in self.producer_fp16:
            return t + SUFFIX
        key = (t, TensorProto.FLOAT16)
        if key not in self.casts:
            if t in self.consts:
                arr = self.consts[t].astype(np.float32)
                over = np.isfinite(arr) & (np.abs(arr) > FP16_MAX)
                self.clipped += int(over.sum())
                half = np.clip(arr, -FP16_MAX, FP16_MAX) if over.any() else arr
                self.new_inits.append(numpy_helper.from_array(half.astype(np.float16), t + SUFFIX))
            else:
                self.pending.append(helper.make_node("Cast", [t], [t + SUFFIX], name=f"{t}_to_fp16",
                                                     to=TensorProto.FLOAT16))
            self.casts[key] = t + SUFFIX
        return self.casts[key]

    def full(self, t: str) -> None:
        """Make float32 ``t`` available when its producer runs in float16."""
        key = (t, TensorProto.FLOAT)
        if t in self.producer_fp16 and key not in self.casts:
            self.pending.append(helper.make_node("Cast", [t + SUFFIX], [t], name=f"{t}_to_fp32",
                                                 to=TensorProto.FLOAT))
            self.casts[key] = t

    def rewrite_fp16(self, n: onnx.NodeProto) -> None:
        keep32 = FLOAT32_ONLY_INPUTS.get(n.op_type, set())
        for i, t in enumerate(n.input):
            if t in self.floats:
                if i in keep32:
                    self.full(t)
                else:
                    n.input[i] = self.half(t)
        for i, t in enumerate(n.output):
            if t in self.floats:
                n.output[i] = t + SUFFIX

    def rewrite_fp32(self, n: onnx.NodeProto) -> None:
        for i, t in enumerate(n.input):
            if t in self.producer_fp16:
                if n.op_type in TYPE_AGNOSTIC:
                    n.input[i] = t + SUFFIX
                else:
                    self.full(t)
        for sub in (a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH):
            for inner in iter_graphs(sub):
                for m in inner.node:
                    for t in m.input:
                        self.full(t)

    def write(self) -> onnx.ModelProto:
        ordered: list[onnx.NodeProto] = []
        for n in self.g.node:
            self.pending = []
            (self.rewrite_fp16 if n.name in self.fp16 else self.rewrite_fp32)(n)
            ordered += [*self.pending, n]
            for t in n.output:  # graph outputs keep their name and float32 type
                base = t[: -len(SUFFIX)] if t.endswith(SUFFIX) else None
                if base is not None and base in self.graph_outputs:
                    self.pending = []
                    self.full(base)
                    ordered += self.pending
        g = self.g
        del g.node[:]
        g.node.extend(ordered)
        used = {i for sub in iter_graphs(g) for n in sub.node for i in n.input}
        keep = [t for t in g.initializer if t.name in used or t.name in self.graph_outputs]
        del g.initializer[:]
        g.initializer.extend(keep + self.new_inits)
        kept = [n for n in g.node if not (n.op_type == "Constant" and not any(o in used for o in n.output))]
        del g.node[:]
        g.node.extend(kept)
        del g.value_info[:]
        return self.proto


def _why_fp32(n: onnx.NodeProto, keep_ops: dict[str, str], keep_names: set[str]) -> str | None:
    if n.name in keep_names:
        return "kept float32 by name"
    if n.op_type in keep_ops:
        return f"{n.op_type}: {keep_ops[n.op_type]}"
    if n.op_type in TYPE_FIXED:
        return f"{n.op_type}: its output type is fixed by an attribute"
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
        return f"{n.op_type} holds subgraphs"
    if n.domain not in ("", "ai.onnx"):
        return f"custom domain {n.domain}"
    return None


def _elem_types(model: Model) -> dict[str, int]:
    """Element type of every tensor of the main graph (inference, then initializers and I/O)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model.proto, strict_mode=False)
    except Exception:  # noqa: BLE001 - fall back to declared types only
        inferred = model.proto
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]
             if vi.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in g.initializer})
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types
