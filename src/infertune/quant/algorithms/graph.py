"""Editing constants and nodes of a model copy: what the algorithms rewrite.

Weights live in initializers or, in Paddle exports, in Constant nodes; ``GraphEditor`` reads and
writes both the same way, and gives a node its own copy of a constant another node also reads
before changing it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from infertune.model import Model, iter_graphs

WEIGHTED = frozenset({"Conv", "Gemm", "MatMul"})


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class GraphEditor:
    """A copy of a model whose constants and nodes can be changed; ``model()`` gives the result."""

    def __init__(self, model: Model) -> None:
        self.proto = onnx.ModelProto()
        self.proto.CopyFrom(model.proto)
        self.renamed = dict(model.renamed_nodes)
        self.g = self.proto.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.const_nodes = {n.output[0]: n for n in self.g.node
                            if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
                            and any(a.name == "value" for a in n.attribute)}
        self.names = {o for n in self.g.node for o in n.output} | set(self.inits) | \
            {i.name for i in self.g.input} | {n.name for n in self.g.node}

    # ---- reading ------------------------------------------------------------------------------
    def node(self, name: str) -> onnx.NodeProto:
        return next(n for n in self.g.node if n.name == name)

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return next((n for n in self.g.node if tensor in n.output), None)

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.g.node if tensor in n.input]

    def readers(self, tensor: str) -> int:
        """How many node inputs (subgraphs included) and graph outputs read ``tensor``."""
        count = sum(list(n.input).count(tensor) for sub in iter_graphs(self.g) for n in sub.node)
        return count + sum(o.name == tensor for o in self.g.output)

    def is_output(self, tensor: str) -> bool:
        return any(o.name == tensor for o in self.g.output)

    def is_const(self, tensor: str) -> bool:
        return tensor in self.inits or tensor in self.const_nodes

    def const(self, tensor: str) -> np.ndarray:
        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        value = next(a.t for a in self.const_nodes[tensor].attribute if a.name == "value")
        return numpy_helper.to_array(value)

    def float_const(self, tensor: str | None) -> np.ndarray | None:
        """The float32 constant ``tensor`` names, or None (absent, computed, another dtype)."""
        if not tensor or not self.is_const(tensor):
            return None
        a = self.const(tensor)
        return a if a.dtype == np.float32 else None

    def sole_reader(self, tensor: str) -> onnx.NodeProto | None:
        """The only node reading ``tensor`` (read once, not a graph output), else None."""
        if self.is_output(tensor) or self.readers(tensor) != 1:
            return None
        found = self.consumers(tensor)
        return found[0] if len(found) == 1 else None

    # ---- writing ------------------------------------------------------------------------------
    def set_const(self, tensor: str, value: np.ndarray) -> None:
        """Replace a constant's value where it lives (initializer or Constant node)."""
        t = numpy_helper.from_array(np.ascontiguousarray(value), tensor)
        if tensor in self.inits:
            self.inits[tensor].CopyFrom(t)
            return
        node = self.const_nodes[tensor]
        for a in node.attribute:
            if a.name == "value":
                a.t.CopyFrom(t)

    def own_const(self, node: onnx.NodeProto, index: int, value: np.ndarray, suffix: str) -> str:
        """Give ``node.input[index]`` the value ``value``: in place when only this input reads the
        constant, else as a new initializer only this input reads. Returns the name it reads."""
        name = node.input[index] if index < len(node.input) else ""
        if name and self.is_const(name) and self.readers(name) == 1:
            self.set_const(name, value)
            return name
        new = self.add_const(f"{name or node.name}_{suffix}", value)
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = new
        return new

    def add_const(self, base: str, value: np.ndarray) -> str:
        name = self.unique(base)
        t = numpy_helper.from_array(np.ascontiguousarray(value), name)
        self.g.initializer.append(t)
        self.inits[name] = self.g.initializer[-1]
        return name

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def insert_after(self, anchor: str | None, node: onnx.NodeProto) -> onnx.NodeProto:
        """Insert ``node`` right after the node named ``anchor`` (at the start when None), so the
        order stays topological; returns the inserted node (a copy of ``node``)."""
        at = 0 if anchor is None else next(i for i, n in enumerate(self.g.node) if n.name == anchor) + 1
        self.g.node.insert(at, node)
        self.names.add(node.name)
        self.names.update(node.output)
        return self.g.node[at]

    def model(self, *, renamed_tensors: bool = False) -> Model:
        if renamed_tensors:
            del self.g.value_info[:]  # a renamed tensor's shape entry would be stale; inference redoes them
        return Model(proto=self.proto, path=None, renamed_nodes=self.renamed)
