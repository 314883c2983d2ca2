"""Specialise a model to constant inputs: ``--fix sr=16000``.

An input given a fixed value becomes a Constant; onnxscript's constant folding then folds what
depends on it, and an ``If`` whose condition became constant is replaced by the branch it takes
(the branch's nodes inlined into the graph: a model whose convolutions sit inside an If on its
sample rate, as silero VAD's do, then has them in the main graph, where quantization sees them).
A ``Where`` whose condition became a constant that is all true (or all false) is replaced by the
operand it picks, when that operand already has the output's shape. onnxscript (a dependency, for
graph rewriting) is imported here and in ``quant.prepare`` only.

``decides_control_flow`` tells whether an input reaches the condition of an If or a Where (what
makes a constant input worth fixing without being asked). Whether the specialised model computes
what the original does is checked on data by ``analysis.specialization``.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from infertune.errors import ModelError, UsageError
from infertune.model import Model, iter_graphs

CONTROL = ("If", "Where")
SHAPE_ONLY = ("Shape", "Size")


def parse_fix(texts: Iterable[str], model: Model) -> dict[str, np.ndarray]:
    """['sr=16000'] -> {'sr': array(16000, int64)}: the value in the input's dtype, filling its (static) shape."""
    out: dict[str, np.ndarray] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--fix {text!r}: expected INPUT=VALUE, e.g. --fix sr=16000")
        info = model.input(name.strip())
        shape = info.shape or ()
        if any(not isinstance(d, int) or d < 1 for d in shape):
            raise UsageError(f"--fix {text!r}: input '{info.name}' has shape {info.shape_str()}; only inputs of a "
                             "fixed shape can be given one value")
        try:
            out[info.name] = np.full(shape, float(value) if "." in value or "e" in value.lower() else int(value),
                                     dtype=np.dtype(info.dtype or "float32"))
        except ValueError:
            raise UsageError(f"--fix {text!r}: {value!r} is not a number") from None
    return out


def decides_control_flow(model: Model, name: str) -> bool:
    """Whether input ``name`` reaches the condition of an If or a Where (in any subgraph)."""
    return _reaches(model.graph, {name})


def _reaches(graph: onnx.GraphProto, dependent: set[str]) -> bool:
    dep = set(dependent)
    for node in graph.node:
        if node.op_type in CONTROL and node.input and node.input[0] in dep:
            return True
        subgraphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        if any(_reaches(g, dep) for g in subgraphs):
            return True
        if node.op_type in SHAPE_ONLY:
            continue  # depends on the input's shape, which fixing its value does not change
        if any(i in dep for i in node.input) or any(_uses(g, dep) for g in subgraphs):
            dep.update(o for o in node.output if o)
    return False


def _uses(graph: onnx.GraphProto, names: set[str]) -> bool:
    return any(i in names for g in iter_graphs(graph) for n in g.node for i in n.input)


def fix_inputs(model: Model, values: dict[str, np.ndarray]) -> tuple[Model, dict[str, int]]:
    """``model`` with the inputs of ``values`` replaced by constants and what depends on them folded.

    Returns the new model and the change in op counts of the main graph (e.g. {'If': -1, 'Conv': 6})."""
    import onnxscript.optimizer as optimizer

    proto = copy.deepcopy(model.proto)
    g = proto.graph
    for name, value in values.items():
        vi = next((v for v in g.input if v.name == name), None)
        if vi is None:
            raise UsageError(f"the model has no input '{name}' (inputs: {', '.join(i.name for i in model.inputs)})")
        g.input.remove(vi)
        g.node.insert(0, helper.make_node("Constant", [], [name], name=f"fixed_{name}",
                                          value=numpy_helper.from_array(np.asarray(value), name)))
    before = Counter(n.op_type for n in g.node)
    for _ in range(4):  # an inlined branch can hold another If on the same input
        ifs = sum(n.op_type == "If" for n in iter_graphs_nodes(proto))
        optimizer.fold_constants(proto)
        optimizer.remove_unused_nodes(proto)
        if sum(n.op_type == "If" for n in iter_graphs_nodes(proto)) == ifs:
            break
    fold_where(proto)
    try:
        fixed = Model.from_proto(proto, path=None)
    except ModelError as e:
        raise ModelError(f"specialising {model.name} to {', '.join(values)} gave an invalid model: {e}") from None
    after = Counter(n.op_type for n in fixed.graph.node)
    return fixed, {op: after[op] - before[op] for op in sorted(set(before) | set(after)) if after[op] != before[op]}


def iter_graphs_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for g in iter_graphs(proto.graph) for n in g.node]


def fold_where(proto: onnx.ModelProto) -> int:
    """Replace each main-graph Where whose condition is a constant, all true or all false, by the
    operand it picks when that operand has the output's static shape. Returns how many."""
    g = proto.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    shapes = _static_shapes(proto)
    folded = 0
    for i, n in enumerate(list(g.node)):
        cond = consts.get(n.input[0]) if n.op_type == "Where" else None
        if cond is None or cond.dtype != np.bool_ or not (cond.all() or not cond.any()):
            continue
        pick = n.input[1] if cond.all() else n.input[2]
        if shapes.get(pick) is None or shapes.get(pick) != shapes.get(n.output[0]):
            continue  # broadcasting could change the shape: keep the Where
        g.node[i].CopyFrom(helper.make_node("Identity", [pick], [n.output[0]], name=n.name))
        folded += 1
    return folded


def _static_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort: without it no Where is folded
        return {}
    out = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(d.dim_value for d in dims)
    for t in inferred.graph.initializer:
        out[t.name] = tuple(t.dims)
    for n in inferred.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = tuple(n.attribute[0].t.dims)
    return out
