"""Write a QuantPlan and its parameters into a standard Q/DQ ONNX graph.

For each activation tensor ``t`` with parameters: ``t -> QuantizeLinear -> DequantizeLinear ->
t_dequantized``; the quantized nodes read ``t_dequantized``. Where the producer itself runs in
8-bit (``plan.replaced``), every consumer reads the dequantized tensor, graph outputs included
(the producer's output is renamed and the DQ writes the original name). Weights become int8
initializers with per-channel scales and a DequantizeLinear with the output-channel axis.
Biases stay float: ONNX Runtime fuses QLinearConv with a float bias, and TensorRT fuses bias
in float itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from infertune.errors import ModelError
from infertune.model import Model, iter_graphs
from infertune.quant.placement import QuantPlan
from infertune.quant.qparams import QParams, quantize_weight_per_channel

MIN_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13


def ensure_opset(model: Model, minimum: int = MIN_OPSET) -> Model:
    """The model converted to at least ``minimum`` (Paddle exports are often opset 11)."""
    if model.opset >= minimum:
        return model
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model.proto, minimum)
    except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise ModelError(
            f"{model.name} is opset {model.opset}; per-channel INT8 needs opset {minimum} and "
            f"the conversion failed: {str(e).splitlines()[0]}"
        ) from None
    out = Model.from_proto(converted, path=None)
    out.renamed_nodes.update(model.renamed_nodes)
    return out


def write_qdq(
    model: Model,
    plan: QuantPlan,
    activation_qparams: Mapping[str, QParams],
    *,
    weight_reduce_range: bool = False,
) -> Model:
    """A new model with Q/DQ per ``plan``; ``activation_qparams`` covers plan.activations."""
    missing = [t for t in plan.activations if t not in activation_qparams]
    if missing:
        raise ModelError(f"no quantization parameters for tensor(s): {', '.join(missing[:5])}")
    if model.opset < MIN_OPSET and plan.weights:
        raise ModelError(f"per-channel weights need opset >= {MIN_OPSET}: call ensure_opset")
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    g = proto.graph
    nodes_by_name = {n.name: n for n in g.node}
    const_arrays = model.constant_tensors()
    new_inits: list[onnx.TensorProto] = []
    weight_nodes: list[onnx.NodeProto] = []

    # ---- weights ------------------------------------------------------------------------------
    done: dict[tuple[str, int], str] = {}
    for use in plan.weights:
        key = (use.tensor, use.axis)
        if key not in done:
            w = const_arrays[use.tensor]
            if w.dtype != np.float32:
                raise ModelError(f"weight {use.tensor} is {w.dtype}, expected float32")
            q, scales, zps = quantize_weight_per_channel(w, use.axis, dtype="int8",
                                                         reduce_range=weight_reduce_range)
            # one set of names per (tensor, axis); the axis shows only when a tensor needs two
            base = use.tensor if not any(k[0] == use.tensor for k in done) \
                else f"{use.tensor}_axis{use.axis}"
            new_inits += [
                numpy_helper.from_array(np.asarray(q, np.int8), f"{base}_quantized"),
                numpy_helper.from_array(np.asarray(scales, np.float32), f"{base}_scale"),
                numpy_helper.from_array(np.asarray(zps, np.int8), f"{base}_zero_point"),
            ]
            out = f"{base}_dequantized"
            weight_nodes.append(helper.make_node(
                "DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
                [out], name=f"{base}_DequantizeLinear", axis=use.axis))
            done[key] = out
        nodes_by_name[use.node].input[use.input_index] = done[key]

    # ---- activations --------------------------------------------------------------------------
    param_names: dict[str, tuple[str, str]] = {}

    def params_of(t: str) -> tuple[str, str]:
        src = plan.shared.get(t, t)
        if src not in param_names:
            qp = activation_qparams[src]
            dt = np.dtype(qp.dtype)
            new_inits.append(numpy_helper.from_array(np.array(qp.scale, np.float32),
                                                     f"{src}_scale"))
            new_inits.append(numpy_helper.from_array(np.array(qp.zero_point, dt),
                                                     f"{src}_zero_point"))
            param_names[src] = (f"{src}_scale", f"{src}_zero_point")
        return param_names[src]

    graph_outputs = {o.name for o in g.output}
    graph_inputs = {i.name for i in g.input}
    qdq_after: dict[str, list[onnx.NodeProto]] = {}  # producer node name -> Q/DQ to emit after
    leading: list[onnx.NodeProto] = []
    producers = {o: n for n in g.node for o in n.output if o}
    tensors = list(dict.fromkeys([*plan.consumers_q, *plan.replaced]))
    for t in tensors:
        scale, zp = params_of(t)
        producer = producers.get(t)
        replace_all = t in plan.replaced
        if replace_all and t in graph_outputs and producer is not None:
            # the producer writes t_float; the DQ writes t, so graph outputs keep their name
            src, dq_out = f"{t}_float", t
            for i, o in enumerate(producer.output):
                if o == t:
                    producer.output[i] = src
            readers_float = []
        else:
            src, dq_out = t, f"{t}_dequantized"
            readers_float = None
        q = helper.make_node("QuantizeLinear", [src, scale, zp], [f"{t}_quantized"],
                             name=f"{t}_QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [f"{t}_quantized", scale, zp], [dq_out],
                              name=f"{t}_DequantizeLinear")
        if producer is None and (t in graph_inputs or t in const_arrays):
            leading += [q, dq]
        elif producer is None:
            raise ModelError(f"tensor {t} has no producer in the main graph")
        else:
            qdq_after.setdefault(producer.name, []).extend([q, dq])
        if readers_float is not None:
            continue  # every reader already reads t, now the DQ output
        readers = (
            [n for n in g.node if t in n.input]
            if replace_all else [nodes_by_name[name] for name in plan.consumers_q.get(t, [])]
        )
        for n in readers:
            if n is q:
                continue
            for i, name in enumerate(n.input):
                if name == t:
                    n.input[i] = dq_out
        if replace_all:
            _rewire_subgraph_reads(g, t, dq_out)

    # ---- emit in topological order ------------------------------------------------------------
    ordered = [*weight_nodes, *leading]
    for n in g.node:
        ordered.append(n)
        ordered.extend(qdq_after.get(n.name, []))
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(new_inits)
    _drop_unused_constants(proto)
    del g.value_info[:]  # stale after renaming; ORT and the checker re-infer
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ModelError(f"the quantized graph failed ONNX validation (a bug): {e}") from None
    out = Model(proto=proto, path=None, renamed_nodes=dict(model.renamed_nodes))
    return out


def _rewire_subgraph_reads(g: onnx.GraphProto, old: str, new: str) -> None:
    """Outer-scope reads of ``old`` inside If/Loop bodies now read ``new``."""
    for sub in list(iter_graphs(g))[1:]:
        for n in sub.node:
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new


def _drop_unused_constants(proto: onnx.ModelProto) -> None:
    """Remove float initializers and Constant nodes that nothing reads any more."""
    used = {i for sub in iter_graphs(proto.graph) for n in sub.node for i in n.input}
    used |= {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    nodes = [n for n in proto.graph.node
             if not (n.op_type == "Constant" and not any(o in used for o in n.output))]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    inputs = [i for i in proto.graph.input
              if i.name in used or i.name not in {t.name for t in proto.graph.initializer}]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
