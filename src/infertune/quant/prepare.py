"""Graph preparation before quantization: the float graph the runtime would run, made explicit.

Exporters leave graphs that a float runtime cleans up at load time but that Q/DQ placement sees
as they are. A BatchNormalization after a Conv is folded by ONNX Runtime in FP32, but not once a
Q/DQ pair sits between them: a Paddle-exported 1 ms classifier ran 8x slower in INT8 that way.
``prepare`` rewrites the float graph first, with libraries rather than hand-written matching:

1. opset >= 13 (``onnx.version_converter``): per-channel DequantizeLinear needs its ``axis``;
   14 when a HardSwish is fused (the op exists from opset 14 on).
2. ``onnxslim``: constant folding (Paddle keeps every weight in a Constant node), dead nodes,
   Conv/ConvTranspose + BatchNormalization folding, Conv + bias Add, and removal of no-op
   arithmetic such as PP-OCRv4's Swish ``x * Sigmoid(x * 1.0)``, which leaves the plain
   ``x * Sigmoid(x)`` that placement runs in 8-bit (QLinearSigmoid, QLinearMul on ONNX Runtime).
3. ``onnxscript``'s rewriter: BatchNormalization into Gemm (which onnxslim does not fold), and
   its ``fuse_hardswish_rules``: HardSwish in both orders (``Add->Clip->Div->Mul`` and Paddle's
   ``Add->Clip->Mul->Div``) and a decomposed HardSigmoid gate become the single ONNX op.

What each runtime does with the result (measured, ORT 1.32 / OpenVINO 2026.4): ONNX Runtime's CPU
provider has no 8-bit HardSwish; it runs HardSwish as HardSigmoid x Mul in float between one DQ
and one Q (a decomposed one costs four float ops, or three 8-bit ops with a requantization each
and a float Div). GELU (erf and tanh forms) is left as it is: both runtimes fuse it themselves
(ONNX Runtime into Gelu / BiasGelu / FastGelu, in INT8 graphs too), and the ONNX Gelu op needs
opset 20. SiLU likewise: no standard op before opset 24, and its ``x * Sigmoid(x)`` form runs in
8-bit on ONNX Runtime. OpenVINO fuses Conv + BatchNormalization and the activations itself in
FP32, but its INT8 compile failed on an unfolded Paddle detector; the same preparation serves it.

The prepared model must reproduce the source's outputs (``TOLERANCE`` relative to each output's
largest magnitude, on the feeds given): otherwise it is refused, with the reason, and the source is
used. Nodes keep their names where they survive (a Conv that absorbed its BatchNormalization keeps
the Conv's), so exclusions and rankings written against the source still apply.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import onnx
from onnx import numpy_helper

from infertune import backends
from infertune.data import FeedValidator
from infertune.errors import ModelError
from infertune.model import Model

PREPARE_OPSET = 13  # per-channel DequantizeLinear (axis)
HARDSWISH_OPSET = 14  # HardSwish exists from opset 14
GELU_OPSET = 20  # Gelu (approximate none / tanh) exists from opset 20
TOLERANCE = 1e-4  # max |prepared - source| / max |source| per output
ATOL = 1e-6  # outputs near zero everywhere (a detector's empty map) are judged absolutely
CHECK_FEEDS = 4
FOLDED_INTO = {"BatchNormalization": "folded into the preceding convolution / Gemm"}


@dataclass
class PrepareResult:
    """The prepared model (the source itself when nothing changed or preparation was refused)."""

    model: Model
    prepared: bool  # ``model`` is a rewritten graph that reproduced the source's outputs
    steps: list[str] = field(default_factory=list)
    removed: dict[str, str] = field(default_factory=dict)  # source node -> what became of it
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    max_rel_error: float | None = None
    refused: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"prepared": self.prepared, "steps": self.steps, "refused": self.refused,
                "max_rel_error": self.max_rel_error, "removed": len(self.removed),
                "ops_before": self.ops_before, "ops_after": self.ops_after, "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        if self.refused:
            return f"graph preparation refused: {self.refused}"
        if not self.prepared:
            return "graph preparation: nothing to do"
        return "graph preparation: " + "; ".join(self.steps)


def prepare(model: Model, feeds: Iterable[Mapping[str, np.ndarray]] = (), *, tolerance: float = TOLERANCE,
            check_feeds: int = CHECK_FEEDS) -> PrepareResult:
    """Fold, fuse and upgrade ``model``'s float graph (see the module docstring); checked on the
    first ``check_feeds`` of ``feeds`` against the source's outputs on ONNX Runtime."""
    start = time.perf_counter()
    before = _ops(model.proto)
    try:
        proto, steps = rewrite(model.proto)
    except ModelError as e:
        return PrepareResult(model, False, ops_before=before, refused=str(e), seconds=time.perf_counter() - start)
    prepared = Model.from_proto(keep_names(model.proto, proto), path=None)
    if [i.name for i in prepared.inputs] != [i.name for i in model.inputs] or \
            [o.name for o in prepared.outputs] != [o.name for o in model.outputs]:
        return PrepareResult(model, False, ops_before=before, seconds=time.perf_counter() - start,
                             refused="the prepared graph renamed the model's inputs or outputs")
    after = _ops(prepared.proto)
    if after == before and prepared.opset == model.opset:
        return PrepareResult(model, False, ops_before=before, ops_after=after, seconds=time.perf_counter() - start)
    err = max_relative_error(model, prepared, check_set(model, feeds, check_feeds))
    result = PrepareResult(prepared, True, steps, removed_nodes(model, prepared), before, after, err,
                           seconds=time.perf_counter() - start)
    if err is not None and err > tolerance:
        result.model, result.prepared = model, False
        result.refused = (f"the prepared graph's outputs differ from the source's by {err:.2e} (relative to each "
                          f"output's largest value; allowed {tolerance:g}): the source is quantized as it is")
    return result


def rewrite(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The three steps of the module docstring; a ``ModelError`` names the step a library failed in."""
    steps = []
    source_opset = _opset(proto)
    before = _ops(proto)
    proto = _convert(proto, PREPARE_OPSET)
    proto = _step("onnxslim", _slim, proto)
    fused = _step("onnxscript's rewriter", _fuse, proto)
    if _ops(fused).get("HardSwish", 0) > _ops(proto).get("HardSwish", 0) and _opset(fused) < HARDSWISH_OPSET:
        fused = _step("onnxscript's rewriter", _fuse, _convert(proto, HARDSWISH_OPSET))
    fused, note = _gelu(fused)
    if _opset(fused) != source_opset:
        steps.append(f"opset {source_opset} -> {_opset(fused)}")
    steps += _describe(before, _ops(fused)) + ([note] if note else [])
    try:
        onnx.checker.check_model(fused)
    except onnx.checker.ValidationError as e:
        raise ModelError(f"the prepared graph fails ONNX validation: {str(e).strip().splitlines()[0]}") from None
    return fused, steps


def _step(what: str, fn, proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return fn(proto)
    except Exception as e:  # noqa: BLE001 - a library's internal failure: preparation is skipped, not fatal
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{what} failed on this graph ({type(e).__name__}: {first[:200]})") from None


def _convert(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    if _opset(proto) >= opset:
        return proto
    from onnx import version_converter

    return _step(f"converting to opset {opset}", lambda p: version_converter.convert_version(p, opset), proto)


def _slim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = onnxslim.slim(proto)
    if out is None:
        raise ModelError("onnxslim returned no model")
    return out


def _fuse(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxscript.rewriter import rewrite as ox_rewrite
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
        fuse_hardswish_rules,
    )

    rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule,
             *fuse_hardswish_rules().rules]
    return ox_rewrite(proto, rules)


def _gelu(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """GELU (erf and tanh forms) into ONNX's Gelu, converting to opset 20 when one is found (ONNX
    Runtime fuses a decomposed GELU itself only where no DequantizeLinear feeds it: after a quantized
    Conv it stayed five float ops). Where the conversion fails, GELU stays as it is, with the reason."""
    fused = _step("onnxscript's rewriter", _fuse_gelu, proto)
    if _ops(fused).get("Gelu", 0) <= _ops(proto).get("Gelu", 0) or _opset(proto) >= GELU_OPSET:
        return fused, ""
    try:
        return _step("onnxscript's rewriter", _fuse_gelu, _convert(proto, GELU_OPSET)), ""
    except ModelError as e:
        return proto, f"GELU left decomposed ({e})"


def _fuse_gelu(proto: onnx.ModelProto) -> onnx.ModelProto:
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter import rewrite as ox_rewrite
    from onnxscript.rewriter.ort_fusions import erfgelu, gelu

    # onnxscript's own GELU patterns, rewritten to the standard op rather than ONNX Runtime's contrib ops
    def erf(op, x):
        return op.Gelu(x)

    class Erf(gelu.GeluErfFusion):
        def rewrite(self, op, x):
            return op.Gelu(x)

    class Tanh(gelu.GeluTanhFusion):
        def rewrite(self, op, x):
            return op.Gelu(x, approximate="tanh")

    rules = [pattern.RewriteRule(erfgelu.erf_gelu_pattern_1, erf), pattern.RewriteRule(erfgelu.erf_gelu_pattern_2, erf),
             Erf.rule(), Tanh.rule()]
    return ox_rewrite(proto, pattern.RewriteRuleSet(rules, commute=True))


def _describe(before: Counter, after: Counter) -> list[str]:
    out = []
    if before.get("BatchNormalization", 0) > after.get("BatchNormalization", 0):
        out.append(f"folded {before['BatchNormalization'] - after.get('BatchNormalization', 0)} BatchNormalization "
                   "into their convolutions")
    for op in ("HardSwish", "HardSigmoid", "Gelu"):
        if after.get(op, 0) > before.get(op, 0):
            out.append(f"fused {after[op] - before.get(op, 0)} decomposed {op}")
    if before.get("Constant", 0) > after.get("Constant", 0):
        out.append(f"folded {before['Constant'] - after.get('Constant', 0)} Constant nodes into initializers")
    gone = sum((before - after).values()) - (before.get("Constant", 0) - after.get("Constant", 0))
    if gone > 0:
        out.append(f"{sum(before.values())} -> {sum(after.values())} nodes")
    return out


def _ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def _opset(proto: onnx.ModelProto) -> int:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


# ---- names -------------------------------------------------------------------------------------------
def keep_names(source: onnx.ModelProto, prepared: onnx.ModelProto) -> onnx.ModelProto:
    """``prepared`` with the source's node names where a node survived under another name: a node
    writing a source tensor takes the name of the source node of its type that computed it (a Conv
    that absorbed the BatchNormalization after it writes the BN's output and keeps the Conv's name)."""
    producers = {o: n for n in source.graph.node for o in n.output if o}
    source_names = {n.name for n in source.graph.node}
    taken = {n.name for n in prepared.graph.node}
    for node in prepared.graph.node:
        if node.name in source_names or not node.output:
            continue
        origin = _origin(producers, node.op_type, node.output[0])
        if origin is not None and origin not in taken:
            taken.discard(node.name)
            node.name = origin
            taken.add(origin)
    return prepared


def _origin(producers: dict[str, onnx.NodeProto], op_type: str, tensor: str, depth: int = 4) -> str | None:
    """The source node of ``op_type`` that computed ``tensor``, up to ``depth`` first-input steps back."""
    node = producers.get(tensor)
    for _ in range(depth):
        if node is None:
            return None
        if node.op_type == op_type:
            return node.name
        node = producers.get(node.input[0]) if node.input else None
    return None


def removed_nodes(source: Model, prepared: Model) -> dict[str, str]:
    """Source nodes (Constant ones aside) that are gone from the prepared graph, with what became of them."""
    kept = {n.name for n in prepared.graph.node}
    return {n.name: FOLDED_INTO.get(n.op_type, "fused into a single activation op, or folded as a constant")
            for n in source.graph.node if n.op_type != "Constant" and n.name not in kept}


def foldable(model: Model) -> dict[str, str]:
    """Nodes of ``model`` (a float or a Q/DQ model) that preparation would remove, with what becomes of
    them: the Q/DQ are taken out (weights dequantized), the float graph is rewritten, and the nodes
    missing from the result are the ones folded or fused. Empty when the libraries fail on it."""
    float_proto = dequantized(model.proto)
    try:
        rewritten, _ = rewrite(float_proto)
    except ModelError:
        return {}
    kept = {n.name for n in keep_names(float_proto, rewritten).graph.node}
    return {n.name: FOLDED_INTO.get(n.op_type, "fused into a single activation op, or folded as a constant")
            for n in float_proto.graph.node if n.op_type not in ("Constant", "Identity") and n.name not in kept}


def dequantized(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` without its Q/DQ: readers of DQ(Q(x)) read x, a weight DQ becomes its float constant."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    alias: dict[str, str] = {}
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        q = producers.get(n.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            alias[n.output[0]] = q.input[0]
        elif n.input[0] in inits:
            g.initializer.append(numpy_helper.from_array(_dequantize(n, inits), n.output[0]))
    keep = [n for n in g.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            or (n.op_type == "DequantizeLinear" and n.output[0] not in alias and n.input[0] not in inits)]
    for n in keep:
        n.input[:] = [alias.get(i, i) for i in n.input]
    for o in g.output:
        o.name = alias.get(o.name, o.name)
    del g.node[:]
    g.node.extend(keep)
    return out


def _dequantize(node: onnx.NodeProto, inits: dict[str, np.ndarray]) -> np.ndarray:
    q = inits[node.input[0]].astype(np.float32)
    scale = inits[node.input[1]].astype(np.float32)
    zp = inits[node.input[2]].astype(np.float32) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q - zp) * scale).astype(np.float32)


# ---- the check ---------------------------------------------------------------------------------------
def check_set(model: Model, feeds: Iterable[Mapping[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """The first ``n`` usable feeds, restricted to the model's inputs (as calibration reads them)."""
    validator = FeedValidator(model)
    out = []
    for raw in islice(feeds, 2 * n):
        clean = validator(dict(raw))
        if clean is not None:
            out.append(clean)
        if len(out) >= n:
            break
    return out


def max_relative_error(source: Model, prepared: Model, feeds: list[dict[str, np.ndarray]]) -> float | None:
    """Largest, over feeds and outputs, of max |prepared - source| / max |source| (outputs whose largest
    value is below ``ATOL / TOLERANCE`` are judged absolutely, against ``ATOL``). None without feeds."""
    if not feeds:
        return None
    settings = backends.Settings(graph_optimization="disable")
    ref, got = (backends.compile(m, settings, backend="ort") for m in (source, prepared))
    worst = 0.0
    for feed in feeds:
        a, b = ref.run(feed), got.run(feed)
        for name, out in a.items():
            if np.asarray(out).dtype.kind != "f" or np.asarray(out).size == 0:
                worst = max(worst, 0.0 if np.array_equal(out, b[name]) else np.inf)
                continue
            x, y = np.asarray(out, np.float64), np.asarray(b[name], np.float64)
            diff = float(np.max(np.abs(x - y)))
            scale = float(np.max(np.abs(x)))
            worst = max(worst, diff / scale if scale * TOLERANCE > ATOL else diff / ATOL * TOLERANCE)
    return worst
