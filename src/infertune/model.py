"""Model: load an ONNX file, validate it, describe it, and derive variants of it.

The loaded proto is normalised in one way only: node names are made unique and non-empty
(ONNX Runtime refuses duplicate names, and exclusions and reports need a name for every
node). The renames are kept in ``Model.renamed_nodes`` so they can be reported.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from infertune.errors import ModelError

Dim = int | str | None  # fixed size, symbolic name, or unknown


@dataclass(frozen=True)
class TensorInfo:
    """Name, numpy dtype and shape (ints, symbolic names, or None for unknown) of a tensor."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None  # None: rank unknown

    @property
    def symbolic_dims(self) -> list[str]:
        return [d for d in (self.shape or ()) if isinstance(d, str)]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape or [])}

    def shape_str(self) -> str:
        if self.shape is None:
            return "?"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"


def dim_key(input_name: str, axis: int, dim: object) -> str:
    """How ``--dims`` names a dim: its symbolic name, or ``INPUT:AXIS`` when it has none."""
    return dim if isinstance(dim, str) and dim else f"{input_name}:{axis}"


def numpy_dtype(elem_type: int) -> str:
    """Numpy dtype name of an ONNX TensorProto element type ('' if it has none)."""
    if elem_type == onnx.TensorProto.UNDEFINED:
        return ""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    tt = vi.type.tensor_type
    shape: tuple[Dim, ...] | None = None
    if tt.HasField("shape"):
        dims: list[Dim] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shape = tuple(dims)
    return TensorInfo(vi.name, numpy_dtype(tt.elem_type), shape)


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph nested in it (If branches, Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def _unique_node_names(model: onnx.ModelProto) -> dict[str, str]:
    """Give every node (subgraphs included) a unique non-empty name, in place.

    Returns ``{new_name: old_name}`` for the nodes that were renamed ('' for unnamed ones).
    """
    nodes = [n for g in iter_graphs(model.graph) for n in g.node]
    taken = Counter(n.name for n in nodes if n.name)
    seen: set[str] = set()
    renamed: dict[str, str] = {}
    for i, node in enumerate(nodes):
        old = node.name
        if old and taken[old] == 1:
            seen.add(old)
            continue
        if old and old not in seen:  # first of several with this name keeps it
            seen.add(old)
            continue
        base = old or f"{node.op_type}_{i}"
        candidate, k = base, 1
        while candidate in seen or (candidate != old and candidate in taken):
            candidate = f"{base}__{k}"
            k += 1
        node.name = candidate
        seen.add(candidate)
        renamed[candidate] = old
    return renamed


@dataclass
class Model:
    """A loaded, validated ONNX model. ``proto`` is the normalised graph that backends run."""

    proto: onnx.ModelProto
    path: Path | None = None
    renamed_nodes: dict[str, str] = field(default_factory=dict)
    _value_info: dict[str, TensorInfo] | None = field(default=None, repr=False)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str], *, check: bool = True) -> Model:
        """Load and validate a model from a file; external data is read from beside it."""
        p = Path(path)
        if not p.exists():
            raise ModelError(f"model file not found: {p}")
        if p.is_dir():
            raise ModelError(f"model path is a directory, expected an .onnx file: {p}")
        if p.stat().st_size == 0:
            raise ModelError(f"model file is empty: {p}")
        try:
            proto = onnx.load(str(p), load_external_data=True)
        except DecodeError as e:
            raise ModelError(
                f"not a valid ONNX model (corrupt or truncated protobuf): {p}: {e}"
            ) from None
        except FileNotFoundError as e:
            raise ModelError(f"external data of {p} not found: {e.filename or e}") from None
        except onnx.checker.ValidationError as e:  # raised for missing/invalid external data
            raise ModelError(f"cannot read the external data of {p}: {e}") from None
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"cannot read ONNX model {p}: {e}") from None
        return cls.from_proto(proto, path=p, check=check)

    @classmethod
    def from_proto(
        cls, proto: onnx.ModelProto, *, path: Path | None = None, check: bool = True
    ) -> Model:
        where = str(path) if path else "<in-memory model>"
        if not proto.HasField("graph") or not proto.graph.output:
            raise ModelError(
                f"not a valid ONNX model (no graph or no outputs; truncated file?): {where}"
            )
        proto = copy.deepcopy(proto)
        renamed = _unique_node_names(proto)
        if check:
            try:
                onnx.checker.check_model(proto)
            except ValueError as e:  # > 2 GB protos: check the file instead
                if path is None:
                    raise ModelError(f"model failed validation: {e}") from None
                _check_file(path)
            except onnx.checker.ValidationError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
                raise ModelError(f"model failed ONNX validation: {where}: {first}") from None
        return cls(proto=proto, path=path, renamed_nodes=renamed)

    # ---- description --------------------------------------------------------------------------
    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    @property
    def name(self) -> str:
        return self.path.name if self.path else (self.graph.name or "model")

    @property
    def opset(self) -> int:
        for imp in self.proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return int(imp.version)
        return 0

    @property
    def initializer_names(self) -> set[str]:
        return {t.name for t in self.graph.initializer}

    @property
    def inputs(self) -> list[TensorInfo]:
        """Graph inputs that must be fed (initializers listed as inputs are excluded)."""
        inits = self.initializer_names
        return [_tensor_info(vi) for vi in self.graph.input if vi.name not in inits]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [_tensor_info(vi) for vi in self.graph.output]

    def input(self, name: str) -> TensorInfo:
        for info in self.inputs:
            if info.name == name:
                return info
        raise ModelError(
            f"model has no input '{name}' (inputs: {', '.join(i.name for i in self.inputs)})"
        )

    def value_info(self) -> dict[str, TensorInfo]:
        """Type and shape of every tensor of the main graph that shape inference can tell."""
        if self._value_info is None:
            self._value_info = _infer_value_info(self.proto)
        return self._value_info

    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.graph.node)

    def node(self, name: str) -> onnx.NodeProto:
        for n in self.graph.node:
            if n.name == name:
                return n
        raise ModelError(f"model has no node named '{name}'")

    def op_histogram(self) -> Counter[str]:
        """Op types and their counts, subgraphs (If/Loop/Scan bodies) included."""
        return Counter(
            n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            for g in iter_graphs(self.graph)
            for n in g.node
        )

    @property
    def has_subgraphs(self) -> bool:
        return any(i > 0 for i, _ in enumerate(iter_graphs(self.graph)))

    def constant_tensors(self) -> dict[str, np.ndarray]:
        """Initializers and Constant-node outputs of the main graph, as numpy arrays.

        Some exporters (Paddle) keep weights in Constant nodes; both count as weights here.
        """
        out = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        for n in self.graph.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for attr in n.attribute:
                    if attr.name == "value":
                        out[n.output[0]] = numpy_helper.to_array(attr.t)
        return out

    def parameter_tensors(self) -> list[onnx.TensorProto]:
        """Initializers and Constant-node values, subgraphs included: the model's weights."""
        out = []
        for g in iter_graphs(self.graph):
            out += g.initializer
            out += [attr.t for n in g.node if n.op_type == "Constant" for attr in n.attribute if attr.name == "value"]
        return out

    def parameter_count(self) -> int:
        """Elements in all initializers and Constant tensors, subgraphs included."""
        return sum(int(np.prod(t.dims, dtype=np.int64)) for t in self.parameter_tensors())

    def parameter_bytes(self) -> int:
        """Bytes of the same tensors, at their element size."""
        itemsize = lambda t: np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize  # noqa: E731
        return sum(int(np.prod(t.dims, dtype=np.int64)) * itemsize(t) for t in self.parameter_tensors())

    def tensor_order(self) -> list[str]:
        """Names of the tensors the main graph computes, in topological (node) order."""
        return [o for n in self.graph.node for o in n.output if o]

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in self.graph.node for o in n.output if o}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        out: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    # ---- variants -----------------------------------------------------------------------------
    def with_outputs(self, names: Iterable[str], *, keep_original: bool = True) -> Model:
        """A copy that also returns the given intermediate tensors as graph outputs."""
        proto = copy.deepcopy(self.proto)
        known = set(self.tensor_order()) | {i.name for i in self.inputs}
        existing = {o.name for o in proto.graph.output}
        if not keep_original:
            del proto.graph.output[:]
            existing = set()
        info = self.value_info()
        for name in names:
            if name in existing:
                continue
            if name not in known:
                raise ModelError(f"cannot expose '{name}': no node of the main graph produces it")
            vi = onnx.ValueInfoProto(name=name)
            ti = info.get(name)
            if ti is not None and ti.dtype:
                elem = helper.np_dtype_to_tensor_dtype(np.dtype(ti.dtype))
                vi = helper.make_tensor_value_info(name, elem, None)
            proto.graph.output.append(vi)
            existing.add(name)
        return Model(proto=proto, path=None, renamed_nodes=dict(self.renamed_nodes))

    def with_input_shapes(self, shapes: Mapping[str, Sequence[int]]) -> Model:
        """A copy whose inputs have the given static shapes (what a deployment that always feeds
        one size compiles): symbolic and unknown dims become those sizes, fixed dims must agree.
        Intermediate shape annotations are dropped (the runtime infers them again from the inputs)."""
        proto = copy.deepcopy(self.proto)
        for vi in proto.graph.input:
            if vi.name not in shapes:
                continue
            want = [int(d) for d in shapes[vi.name]]
            dims = vi.type.tensor_type.shape.dim
            if vi.type.tensor_type.HasField("shape") and len(dims) != len(want):
                raise ModelError(f"input '{vi.name}' has rank {len(dims)}, a static shape of rank {len(want)} "
                                 f"was given ({want})")
            for axis, (d, size) in enumerate(zip(dims, want, strict=False)):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != size:  # Paddle writes -1 for dynamic
                    raise ModelError(f"input '{vi.name}' axis {axis} is fixed at {d.dim_value}, not {size}")
            del vi.type.tensor_type.shape.dim[:]
            for size in want:
                vi.type.tensor_type.shape.dim.add().dim_value = size
        del proto.graph.value_info[:]
        for vi in proto.graph.output:  # symbolic output dims would contradict the inferred static ones
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param"):
                    d.Clear()
        return Model(proto=proto, path=None, renamed_nodes=dict(self.renamed_nodes))

    def to_bytes(self) -> bytes:
        return self.proto.SerializeToString()

    def require_ir(self, minimum: int, what: str) -> None:
        """Refuse, naming the fix, a model whose IR version is below what ``what`` rewrites.

        Before IR 4 every initializer had to be listed as a graph input as well: a rewrite that adds
        or replaces weights (Q/DQ, FP16) would produce a model the checker refuses."""
        if self.proto.ir_version < minimum:
            raise ModelError(
                f"{self.name} is ONNX IR version {self.proto.ir_version} (opset {self.opset}): {what} needs IR "
                f">= {minimum}, where weights are not graph inputs; re-export it with a newer exporter, or "
                "upgrade it: remove the initializers from graph.input and set ir_version to 7 or later")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model atomically (external data beside it when over 2 GB); never over the file
        it was loaded from (``infertune.outputs``)."""
        from infertune._io import atomic_path
        from infertune.outputs import Guard

        target = Path(path)
        Guard.of(self.path).file(target, "model output")
        large = self.proto.ByteSize() > 2**31 - 2**20
        with atomic_path(target) as tmp:
            if large:
                onnx.save_model(
                    self.proto, str(tmp), save_as_external_data=True,
                    location=target.name + ".data", all_tensors_to_one_file=True,
                )
            else:
                onnx.save_model(self.proto, str(tmp))
        return target


def _check_file(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"model failed ONNX validation: {path}: {first}") from None


def _infer_value_info(proto: onnx.ModelProto) -> dict[str, TensorInfo]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001 - shape inference is best effort; the model already passed the checker
        inferred = proto
    g = inferred.graph
    out: dict[str, TensorInfo] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        out[vi.name] = _tensor_info(vi)
    for t in g.initializer:
        out[t.name] = TensorInfo(t.name, numpy_dtype(t.data_type), tuple(int(d) for d in t.dims))
    return out


def infer_shapes_with_dims(model: Model, dims: dict[str, int]) -> dict[str, TensorInfo]:
    """Shape inference with symbolic input dims replaced by the given sizes (an unnamed dim by
    the key ``INPUT:AXIS``)."""
    proto = copy.deepcopy(model.proto)
    inits = model.initializer_names
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = int(dims[d.dim_param])
            elif not d.HasField("dim_value") and not d.dim_param and f"{vi.name}:{axis}" in dims:
                d.dim_value = int(dims[f"{vi.name}:{axis}"])  # an unnamed dim, given as INPUT:AXIS
    # Drop stale intermediate shapes so inference recomputes them from the fixed inputs.
    del proto.graph.value_info[:]
    return _infer_value_info(proto)


def batch_problem(model: Model) -> str | None:
    """Why ``model``'s feeds cannot be joined along axis 0 into a batch (None when they can): every
    input needs a dynamic axis 0."""
    for info in model.inputs:
        if info.shape is None:
            return f"input '{info.name}' has unknown rank"
        if not info.shape:
            return f"input '{info.name}' is a scalar"
        first = info.shape[0]
        if isinstance(first, int) and first > 0:
            return f"axis 0 of input '{info.name}' is fixed at {first}"
    return None
