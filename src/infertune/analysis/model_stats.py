"""inspect: what a model is (I/O, ops, parameters) and what it costs (FLOPs = 2 x MACs).

MACs per node, from the shapes of its tensors:
- Conv / QLinearConv / ConvInteger: prod(output shape) x prod(weight shape[1:])
  (weight is [M, C/group, k...]: every output element reads C/group x k... inputs)
- ConvTranspose: prod(input shape) x prod(weight shape[1:])
  (weight is [C, M/group, k...]: every input element scatters to M/group x k... outputs)
- Gemm: M x N x K (transA / transB honoured)
- MatMul / QLinearMatMul / MatMulInteger: batch x M x N x K with numpy broadcasting of the
  leading (batch) dims; covers batched attention MatMuls (Q @ K^T, P @ V)
Shapes come from ONNX shape inference with the given symbolic dims; where inference cannot
tell (data-dependent Reshape, ...), one run of the model on synthetic inputs measures them.
Nodes inside If/Loop/Scan bodies are listed in the op histogram but not in FLOPs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from infertune.fingerprint import environment
from infertune.model import Model, TensorInfo, dim_key, infer_shapes_with_dims

SCHEMA_VERSION = 1
# op type -> (index of the first operand, index of the second) for MatMul-like ops
_MATMUL_OPERANDS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}
_CONV_WEIGHT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
FLOP_OPS = (*_MATMUL_OPERANDS, *_CONV_WEIGHT, "ConvTranspose", "Gemm")


@dataclass
class NodeFlops:
    node: str
    op_type: str
    macs: int

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "macs": self.macs,
                "flops": self.flops}


@dataclass
class ModelStats:
    name: str
    opset: int
    ir_version: int
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    op_histogram: dict[str, int]
    node_count: int
    parameter_count: int
    parameter_bytes: int
    dims: dict[str, int]
    flops: int
    flops_by_op_type: dict[str, int]
    nodes: list[NodeFlops]
    uncounted: list[str] = field(default_factory=list)  # FLOP ops whose shapes were unknown
    unresolved_dims: list[str] = field(default_factory=list)  # give these for exact FLOPs
    renamed_nodes: dict[str, str] = field(default_factory=dict)
    has_subgraphs: bool = False
    shapes_measured: bool = False
    environment: dict = field(default_factory=environment)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "kind": "inspect",
            "name": self.name,
            "opset": self.opset,
            "ir_version": self.ir_version,
            "producer": self.producer,
            "inputs": [i.to_dict() for i in self.inputs],
            "outputs": [o.to_dict() for o in self.outputs],
            "node_count": self.node_count,
            "op_histogram": self.op_histogram,
            "parameter_count": self.parameter_count,
            "parameter_bytes": self.parameter_bytes,
            "dims": self.dims,
            "flops": self.flops,
            "flops_by_op_type": self.flops_by_op_type,
            "nodes": [n.to_dict() for n in self.nodes],
            "uncounted": self.uncounted,
            "unresolved_dims": self.unresolved_dims,
            "renamed_nodes": self.renamed_nodes,
            "has_subgraphs": self.has_subgraphs,
            "shapes_measured": self.shapes_measured,
            "environment": self.environment,
        }


def inspect_model(model: Model, *, dims: dict[str, int] | None = None,
                  probe: bool = True) -> ModelStats:
    """Describe ``model``; FLOPs are for the given symbolic dims (a leading batch dim: 1)."""
    dims = _default_dims(model, dims or {})
    shapes = {k: v.shape for k, v in infer_shapes_with_dims(model, dims).items()}
    shapes.update(_initializer_shapes(model))
    flop_nodes = [n for n in model.graph.node if n.op_type in FLOP_OPS
                  and n.domain in ("", "ai.onnx")]
    missing = [t for n in flop_nodes for t in _needed(n) if not _known(shapes.get(t))]
    measured = False
    unresolved = sorted({dim_key(i.name, axis, d) for i in model.inputs for axis, d in enumerate(i.shape or ())
                         if not isinstance(d, int) and dim_key(i.name, axis, d) not in dims})
    if missing and probe and not unresolved:
        shapes.update(_measure_shapes(model, dims, missing))
        measured = True
    nodes, uncounted = [], []
    for n in flop_nodes:
        macs = node_macs(n, shapes)
        if macs is None:
            uncounted.append(n.name)
        else:
            nodes.append(NodeFlops(n.name, n.op_type, macs))
    by_type: Counter[str] = Counter()
    for nf in nodes:
        by_type[nf.op_type] += nf.flops
    hist = model.op_histogram()
    return ModelStats(
        name=model.name, opset=model.opset, ir_version=int(model.proto.ir_version),
        producer=" ".join(filter(None, [model.proto.producer_name,
                                        model.proto.producer_version])),
        inputs=model.inputs, outputs=model.outputs,
        op_histogram=dict(hist.most_common()), node_count=sum(hist.values()),
        parameter_count=model.parameter_count(), parameter_bytes=model.parameter_bytes(),
        dims=dims, flops=sum(nf.flops for nf in nodes), flops_by_op_type=dict(by_type),
        nodes=nodes, uncounted=uncounted, unresolved_dims=unresolved if uncounted else [],
        renamed_nodes=dict(model.renamed_nodes),
        has_subgraphs=model.has_subgraphs, shapes_measured=measured,
    )


def macs_by_node(model: Model, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Multiply-adds of each Conv/MatMul/Gemm node of ``model`` run on ``feed`` (its symbolic dims read off the
    feed's arrays; nodes whose shapes stay unknown are left out)."""
    dims = {dim_key(i.name, axis, d): int(np.shape(feed[i.name])[axis]) for i in model.inputs if i.name in feed
            for axis, d in enumerate(i.shape or ()) if not isinstance(d, int) and axis < np.ndim(feed[i.name])}
    return {n.node: n.macs for n in inspect_model(model, dims=dims).nodes}


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple | None]) -> int | None:
    """Multiply-accumulates of one node, or None when a needed shape is unknown."""
    get = lambda i: _shape(shapes, node.input[i] if i < len(node.input) else "")  # noqa: E731
    op = node.op_type
    if op in _CONV_WEIGHT:
        w, out = get(_CONV_WEIGHT[op]), _shape(shapes, node.output[0])
        if w is None or out is None:
            return None
        return _prod(out) * _prod(w[1:])
    if op == "ConvTranspose":
        x, w = get(0), get(1)
        if x is None or w is None:
            return None
        return _prod(x) * _prod(w[1:])
    if op == "Gemm":
        a, b = get(0), get(1)
        if a is None or b is None or len(a) != 2 or len(b) != 2:
            return None
        attrs = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * n * k
    if op in _MATMUL_OPERANDS:
        ia, ib = _MATMUL_OPERANDS[op]
        a, b = get(ia), get(ib)
        if a is None or b is None:
            return None
        a = (1, *a) if len(a) == 1 else a
        b = (*b, 1) if len(b) == 1 else b
        batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
        return _prod(batch) * a[-2] * a[-1] * b[-1]
    return None


def _needed(node: onnx.NodeProto) -> list[str]:
    op = node.op_type
    if op in _CONV_WEIGHT:
        return [node.input[_CONV_WEIGHT[op]], node.output[0]]
    if op in _MATMUL_OPERANDS:
        return [node.input[i] for i in _MATMUL_OPERANDS[op]]
    return [node.input[0], node.input[1]]


def _measure_shapes(model: Model, dims: dict[str, int], names: list[str]) -> dict[str, tuple]:
    """Run the model once on synthetic inputs and read the shapes of ``names``.

    Integer inputs are zeros: they are usually indices (token ids, token types), and 0 is in
    range for any embedding table, where random ids may not be.
    """
    from infertune import backends
    from infertune.data import synthetic_feed

    exposed = model.with_outputs(sorted(set(names)))
    runner = backends.compile(exposed, backends.Settings(graph_optimization="disable"))
    feed = {k: np.zeros_like(v) if v.dtype.kind in "iu" else v for k, v in synthetic_feed(model, dims=dims).items()}
    outs = runner.run(feed)
    return {k: tuple(int(d) for d in v.shape) for k, v in outs.items() if k in set(names)}


def _default_dims(model: Model, dims: dict[str, int]) -> dict[str, int]:
    out = dict(dims)
    for info in model.inputs:
        if info.shape and not isinstance(info.shape[0], int):
            key = dim_key(info.name, 0, info.shape[0])
            out.setdefault(key, int(dims.get("batch", 1)))
    return out


def _initializer_shapes(model: Model) -> dict[str, tuple]:
    out = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = tuple(int(d) for d in a.t.dims)
    return out


def _known(shape: tuple | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def _shape(shapes: dict[str, tuple | None], name: str) -> tuple[int, ...] | None:
    s = shapes.get(name) if name else None
    return tuple(s) if _known(s) else None


def _prod(dims) -> int:
    return int(np.prod(dims, dtype=np.int64)) if len(dims) else 1
