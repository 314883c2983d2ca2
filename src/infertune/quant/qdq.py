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
from infertune.quant.placement import TARGETS, QuantPlan
from infertune.quant.qparams import QParams, quantize_weight_per_channel, seven_bit

MIN_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13
SHARED_PRODUCERS = frozenset({"Conv", "ConvTranspose"})  # share_dq applies to their outputs (see placement)


def ensure_opset(model: Model, minimum: int = MIN_OPSET) -> Model:
    """The model converted to at least ``minimum`` (Paddle exports are often opset 11)."""
    model.require_ir(4, "INT8 quantization")
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
    weight_reduce_range: bool | frozenset[str] = False,
    weight_values: Mapping[str, np.ndarray] | None = None,
) -> Model:
    """A new model with Q/DQ per ``plan``; ``activation_qparams`` covers plan.activations.
    ``weight_reduce_range``: 7-bit weights, every one, none, or the weight tensors named.
    ``weight_values``: int8 values of some weights instead of round-to-nearest (learned rounding),
    with the same per-channel scales."""
    missing = [t for t in plan.activations if t not in activation_qparams]
    if missing:
        raise ModelError(f"no quantization parameters for tensor(s): {', '.join(missing[:5])}")
    if model.opset < MIN_OPSET and plan.weights:
        raise ModelError(f"per-channel weights need opset >= {MIN_OPSET}: call ensure_opset")
    writer = _QdqWriter(model, plan, activation_qparams, weight_values or {})
    writer.quantize_weights(weight_reduce_range)
    writer.quantize_activations()
    proto = writer.finish()
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ModelError(f"the quantized graph failed ONNX validation (a bug): {e}") from None
    return Model(proto=proto, path=None, renamed_nodes=dict(model.renamed_nodes))


class _QdqWriter:
    """One pass of ``write_qdq`` over a copy of the model: weights, then activations, then the
    nodes emitted in topological order (each Q/DQ right after its producer)."""

    def __init__(self, model: Model, plan: QuantPlan, activation_qparams: Mapping[str, QParams],
                 weight_values: Mapping[str, np.ndarray]) -> None:
        self.proto = onnx.ModelProto()
        self.proto.CopyFrom(model.proto)
        self.g = self.proto.graph
        self.plan, self.activation_qparams, self.weight_values = plan, activation_qparams, weight_values
        self.nodes_by_name = {n.name: n for n in self.g.node}
        self.const_arrays = model.constant_tensors()
        self.new_inits: list[onnx.TensorProto] = []
        self.weight_nodes: list[onnx.NodeProto] = []
        self.leading: list[onnx.NodeProto] = []  # Q/DQ of graph inputs and constants
        self.qdq_after: dict[str, list[onnx.NodeProto]] = {}  # producer node name -> Q/DQ to emit after
        self.param_names: dict[str, tuple[str, str]] = {}
        # names already in the graph: a Q/DQ parameter must not take one (a Paddle BN's 'fc_scale' did)
        self.taken = {t for n in self.g.node for t in (*n.input, *n.output)} | {t.name for t in self.g.initializer}

    def quantize_weights(self, reduce_range: bool | frozenset[str]) -> None:
        done: dict[tuple[str, int], str] = {}
        for use in self.plan.weights:
            key = (use.tensor, use.axis)
            if key not in done:
                # one set of names per (tensor, axis); the axis shows only when a tensor needs two
                base = use.tensor if not any(k[0] == use.tensor for k in done) else f"{use.tensor}_axis{use.axis}"
                done[key] = self._weight_dq(use.tensor, use.axis, base, seven_bit(reduce_range, use.tensor))
            self.nodes_by_name[use.node].input[use.input_index] = done[key]

    def _weight_dq(self, tensor: str, axis: int, base: str, reduce_range: bool) -> str:
        w = self.const_arrays[tensor]
        if w.dtype != np.float32:
            raise ModelError(f"weight {tensor} is {w.dtype}, expected float32")
        q, scales, zps = quantize_weight_per_channel(w, axis, dtype="int8", reduce_range=reduce_range)
        if tensor in self.weight_values:
            if self.weight_values[tensor].shape != q.shape:
                raise ModelError(f"int8 values given for weight {tensor} have shape "
                                 f"{self.weight_values[tensor].shape}, the weight has {q.shape}")
            q = self.weight_values[tensor]
        self.new_inits += [
            numpy_helper.from_array(np.asarray(q, np.int8), f"{base}_quantized"),
            numpy_helper.from_array(np.asarray(scales, np.float32), f"{base}_scale"),
            numpy_helper.from_array(np.asarray(zps, np.int8), f"{base}_zero_point"),
        ]
        out = f"{base}_dequantized"
        self.weight_nodes.append(helper.make_node(
            "DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"],
            [out], name=f"{base}_DequantizeLinear", axis=axis))
        return out

    def _params_of(self, t: str) -> tuple[str, str]:
        src = self.plan.shared.get(t, t)
        if src not in self.param_names:
            qp = self.activation_qparams[src]
            scale, zp = self._free(f"{src}_scale"), self._free(f"{src}_zero_point")
            self.new_inits.append(numpy_helper.from_array(np.array(qp.scale, np.float32), scale))
            self.new_inits.append(numpy_helper.from_array(np.array(qp.zero_point, np.dtype(qp.dtype)), zp))
            self.param_names[src] = (scale, zp)
        return self.param_names[src]

    def _free(self, name: str) -> str:
        """``name``, or ``name_1``, ``name_2``... when the graph already has a tensor of that name."""
        out, k = name, 0
        while out in self.taken:
            k += 1
            out = f"{name}_{k}"
        self.taken.add(out)
        return out

    def quantize_activations(self) -> None:
        graph_outputs = {o.name for o in self.g.output}
        graph_inputs = {i.name for i in self.g.input}
        producers = {o: n for n in self.g.node for o in n.output if o}
        share = TARGETS[self.plan.target].share_dq if self.plan.target in TARGETS else False
        # plan.replaced is a set: sorted, so that the same plan gives the same bytes in every process
        for t in dict.fromkeys([*self.plan.consumers_q, *sorted(self.plan.replaced)]):
            producer = producers.get(t)
            replace_all = t in self.plan.replaced
            renamed = replace_all and t in graph_outputs and producer is not None
            # share_dq: the float readers of a convolution's output read the dequantized value too
            # (graph outputs stay float)
            replace_all = replace_all or (share and t not in graph_outputs and producer is not None
                                          and producer.op_type in SHARED_PRODUCERS)
            if renamed:  # the producer writes t_float; the DQ writes t, so graph outputs keep their name
                src, dq_out = f"{t}_float", t
                producer.output[list(producer.output).index(t)] = src
            else:
                src, dq_out = t, f"{t}_dequantized"
            q, dq = self._qdq_pair(t, src, dq_out)
            if producer is None and (t in graph_inputs or t in self.const_arrays):
                self.leading += [q, dq]
            elif producer is None:
                raise ModelError(f"tensor {t} has no producer in the main graph")
            else:
                self.qdq_after.setdefault(producer.name, []).extend([q, dq])
            if not renamed:  # a renamed output's readers already read t, now the DQ output
                self._rewire(t, dq_out, q, replace_all)
            else:
                _rewire_subgraph_reads(self.g, t, src)  # subgraphs read the float value (see _rewire)

    def _qdq_pair(self, t: str, src: str, dq_out: str) -> tuple[onnx.NodeProto, onnx.NodeProto]:
        scale, zp = self._params_of(t)
        q = helper.make_node("QuantizeLinear", [src, scale, zp], [f"{t}_quantized"], name=f"{t}_QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [f"{t}_quantized", scale, zp], [dq_out],
                              name=f"{t}_DequantizeLinear")
        return q, dq

    def _rewire(self, t: str, dq_out: str, q: onnx.NodeProto, replace_all: bool) -> None:
        """The readers of ``t`` that should read its dequantized value now do."""
        readers = ([n for n in self.g.node if t in n.input] if replace_all
                   else [self.nodes_by_name[name] for name in self.plan.consumers_q.get(t, [])])
        for n in readers:
            if n is q:
                continue
            for i, name in enumerate(n.input):
                if name == t:
                    n.input[i] = dq_out
        # reads inside If/Loop bodies keep the producer's float output: ONNX Runtime 1.32 aborts (an
        # assertion in its graph optimizer) on a DequantizeLinear output read inside an If once static
        # input shapes make the If's condition constant (silero VAD specialised to sr=16000)

    def finish(self) -> onnx.ModelProto:
        ordered = [*self.weight_nodes, *self.leading]
        for n in self.g.node:
            ordered.append(n)
            ordered.extend(self.qdq_after.get(n.name, []))
        del self.g.node[:]
        self.g.node.extend(ordered)
        self.g.initializer.extend(self.new_inits)
        _drop_unused_constants(self.proto)
        del self.g.value_info[:]  # stale after renaming; ORT and the checker re-infer
        return self.proto


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
