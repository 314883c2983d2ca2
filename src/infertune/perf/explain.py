"""explain(A, B): why one variant of a model is slower than another, from what ONNX Runtime runs.

Both variants are profiled on the same feed (``bench.profile``), each on its optimised graph.
Then, for each: time per op type; QuantizeLinear / DequantizeLinear left unfused and their
cost; float ops sandwiched between a DQ and a Q (8-bit data converted to float and back for an
op that runs in float anyway); layout reorders and transposes; and the CPU's ISA facts. The
result ends with suggestions that quantize can apply: fold or fuse a sandwiched node that graph
preparation removes (a BatchNormalization after its Conv, a decomposed HardSwish or GELU:
``quant.prepare``, on by default for ort-cpu and openvino), exclude another sandwiched node (its
Q/DQ cost time and save nothing), switch activations to uint8 (what ORT's x86 kernels fuse), or
keep the float model when nothing makes 8-bit pay.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from infertune import backends
from infertune.data import Dataset
from infertune.fingerprint import cpu, environment
from infertune.model import Model
from infertune.perf.profile import ProfileResult, profile
from infertune.quant.fusion import FLOAT_COMPUTE, INT8_KERNELS
from infertune.quant.prepare import foldable

SCHEMA_VERSION = 1
QDQ = ("QuantizeLinear", "DequantizeLinear")
REORDERS = frozenset({"ReorderInput", "ReorderOutput", "Transpose"})
MIN_SAVING_US = 1.0  # suggestions below this are noise


@dataclass(frozen=True)
class Sandwich:
    """A float op between DequantizeLinear and QuantizeLinear in the optimised graph."""

    node: str
    op_type: str
    op_us: float
    qdq_us: float  # the DQ feeding it and the Q after it
    qdq_nodes: tuple[str, ...]
    in_source: bool  # the node exists under this name in the model the user gave

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "op_us": round(self.op_us, 3),
                "qdq_us": round(self.qdq_us, 3), "qdq_nodes": list(self.qdq_nodes), "in_source": self.in_source}


@dataclass
class VariantFacts:
    model: str
    run_us: float
    node_sum_us: float
    op_types: dict[str, float]  # op type -> us per run
    int8_kernels: int
    float_compute: int
    unfused_q: int
    unfused_dq: int
    weight_dq: int  # DQ of a constant, run on every inference because its reader was not fused
    qdq_us: float
    reorders: int
    reorder_us: float
    sandwiches: list[Sandwich]
    activation_types: dict[str, int]  # zero-point type of activation Q nodes in the source model
    foldable: dict[str, dict] = field(default_factory=dict)  # node ONNX Runtime runs that preparation removes

    def to_dict(self) -> dict:
        return {"model": self.model, "run_us": round(self.run_us, 3), "node_sum_us": round(self.node_sum_us, 3),
                "op_types": {k: round(v, 3) for k, v in self.op_types.items()},
                "int8_kernels": self.int8_kernels, "float_compute": self.float_compute,
                "unfused_quantize": self.unfused_q, "unfused_dequantize": self.unfused_dq,
                "weight_dequantize": self.weight_dq, "qdq_us": round(self.qdq_us, 3),
                "reorders": self.reorders, "reorder_us": round(self.reorder_us, 3),
                "sandwiches": [s.to_dict() for s in self.sandwiches], "activation_types": self.activation_types,
                "foldable": self.foldable}


@dataclass(frozen=True)
class Suggestion:
    action: str  # "prepare" | "exclude" | "activation_type" | "keep_float"
    text: str
    saves_us: float  # estimated
    exclude: tuple[str, ...] = ()
    value: str | None = None

    def to_dict(self) -> dict:
        return {"action": self.action, "text": self.text, "saves_us": round(self.saves_us, 3),
                "exclude": list(self.exclude), "value": self.value}


@dataclass
class ExplainResult:
    a: VariantFacts
    b: VariantFacts
    isa: list[str]
    suggestions: list[Suggestion]
    settings: dict
    backend: str = "ort"
    environment: dict = field(default_factory=environment)

    @property
    def ratio(self) -> float:
        """B's run time over A's (> 1: B is slower)."""
        return self.b.run_us / self.a.run_us if self.a.run_us else float("inf")

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "explain", "backend": self.backend,
                "a": self.a.to_dict(), "b": self.b.to_dict(),
                "ratio_b_over_a": round(self.ratio, 4), "isa": self.isa,
                "suggestions": [s.to_dict() for s in self.suggestions], "settings": self.settings,
                "environment": self.environment}


def explain(a: Model | str | os.PathLike[str], b: Model | str | os.PathLike[str], data: Dataset | None = None, *,
            settings: backends.Settings | None = None, batch_size: int = 1, runs: int = 50,
            backend: str = "ort", dims: dict[str, int] | None = None) -> ExplainResult:
    """Profile ``a`` and ``b`` on the same feed (without ``data``: synthetic, with the symbolic
    ``dims`` given) and explain where ``b``'s time differs."""
    backends.require(backend, "profiles", "explain")
    settings = settings or backends.Settings()
    ma = a if isinstance(a, Model) else Model.load(a)
    mb = b if isinstance(b, Model) else Model.load(b)
    facts = []
    with tempfile.TemporaryDirectory(prefix="infertune-explain-") as d:
        for tag, m in (("a", ma), ("b", mb)):
            opt = Path(d) / f"{tag}.onnx"
            prof = profile(m, data, settings=replace(settings, preallocate=False), batch_size=batch_size,
                           runs=runs, optimized_model=opt, backend=backend, dims=dims)
            facts.append(variant_facts(m, onnx.load(str(opt), load_external_data=False), prof,
                                       foldable(m) if tag == "b" else {}))
    fa, fb = facts
    return ExplainResult(fa, fb, isa_facts(cpu()["isa"]), suggest(fa, fb), settings.to_dict(), backend)


def variant_facts(source: Model, optimized: onnx.ModelProto, prof: ProfileResult,
                  folds: Mapping[str, str] | None = None) -> VariantFacts:
    """``folds``: the source's nodes that graph preparation removes (``quant.prepare.foldable``); those
    ONNX Runtime still runs are recorded with their time and what preparation makes of them."""
    g = optimized.graph
    t = {n.node: n.mean_us for n in prof.nodes}
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    source_names = {n.name for n in source.graph.node}
    sandwiches = []
    for n in g.node:
        if n.op_type in QDQ or n.op_type in INT8_KERNELS:
            continue
        dqs = [producer[i] for i in n.input if i in producer and producer[i].op_type == "DequantizeLinear"
               and producer[i].input[0] not in consts]
        qs = [r for o in n.output for r in readers[o] if r.op_type == "QuantizeLinear"]
        if dqs and qs:
            around = [*dqs, *qs]
            sandwiches.append(Sandwich(n.name, n.op_type, t.get(n.name, 0.0), sum(t.get(x.name, 0.0) for x in around),
                                       tuple(x.name for x in around), n.name in source_names))
    sandwiches.sort(key=lambda s: -s.qdq_us)
    qdq_nodes = [n for n in g.node if n.op_type in QDQ]
    reorders = [n for n in g.node if n.op_type in REORDERS]
    return VariantFacts(
        model=source.name, run_us=prof.run_us, node_sum_us=prof.node_sum_us,
        op_types={o.op_type: o.mean_us for o in prof.op_types},
        int8_kernels=sum(1 for n in g.node if n.op_type in INT8_KERNELS),
        float_compute=sum(1 for n in g.node if n.op_type in FLOAT_COMPUTE),
        unfused_q=sum(1 for n in qdq_nodes if n.op_type == "QuantizeLinear"),
        unfused_dq=sum(1 for n in qdq_nodes if n.op_type == "DequantizeLinear"),
        weight_dq=sum(1 for n in qdq_nodes if n.op_type == "DequantizeLinear" and n.input[0] in consts),
        qdq_us=sum(t.get(n.name, 0.0) for n in qdq_nodes),
        reorders=len(reorders), reorder_us=sum(t.get(n.name, 0.0) for n in reorders),
        sandwiches=sandwiches, activation_types=_activation_types(source),
        foldable={n.name: {"op_type": n.op_type, "us": t.get(n.name, 0.0), "becomes": (folds or {})[n.name]}
                  for n in g.node if n.name in (folds or {})})


def _activation_types(model: Model) -> dict[str, int]:
    """How many activation QuantizeLinear nodes write uint8 and how many int8."""
    consts = model.constant_tensors()
    counts: dict[str, int] = defaultdict(int)
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts:
            zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            counts["uint8" if zp is None else str(zp.dtype)] += 1
    return dict(counts)


def isa_facts(isa: list[str]) -> list[str]:
    has = set(isa)
    lines = []
    if "avx512_vnni" in has or "avx_vnni" in has:
        lines.append("VNNI present: int8 dot products (vpdpbusd) run 4 multiply-adds per 32-bit lane; INT8 GEMM can "
                     "reach ~2-4x FP32 throughput")
    elif "avx2" in has:
        lines.append("no VNNI: int8 GEMM uses AVX2 vpmaddubsw (u8 x s8, 16-bit intermediates), ~1.5-2x FP32 at best; "
                     "Q/DQ overhead can eat the gain on small layers")
    if "avx512f" not in has:
        lines.append("no AVX-512: FP32 and INT8 kernels use 256-bit vectors")
    if "amx_int8" in has:
        lines.append("AMX-INT8 present: tile matrix multiply for int8")
    if not has & {"avx2", "avx512f"}:
        lines.append("no AVX2: ONNX Runtime's int8 kernels fall back to SSE; INT8 rarely pays here")
    return lines


def suggest(a: VariantFacts, b: VariantFacts) -> list[Suggestion]:
    out: list[Suggestion] = []
    if b.foldable:  # preparing the graph is the fix for these, not keeping them in float
        kinds = Counter(f"{v['op_type']} ({v['becomes']})" for v in b.foldable.values())
        sandwiched = {s.node: s.qdq_us for s in b.sandwiches}
        saves = sum(v["us"] + sandwiched.get(k, 0.0) for k, v in b.foldable.items())
        out.append(Suggestion(
            "prepare", f"{len(b.foldable)} node(s) that graph preparation removes run in float here "
            f"({saves / 1000:.3f} ms per run with their Q/DQ): " + ", ".join(f"{n} x {k}" for k, n in kinds.items())
            + f" (e.g. {', '.join(list(b.foldable)[:4])}): quantize with graph preparation on (--prepare; the "
            "default for ort-cpu and openvino) rather than excluding them", saves, value="--prepare"))
    if b.activation_types.get("int8") and b.unfused_q + b.unfused_dq > 0:
        out.append(Suggestion(
            "activation_type", f"activations are int8 in {b.activation_types['int8']} Q nodes and "
            f"{b.unfused_q} Q / {b.unfused_dq} DQ stay unfused ({b.qdq_us / 1000:.3f} ms per run): ONNX Runtime's "
            "x86 kernels fuse uint8 activations (infertune quantize --target ort-cpu writes them; ORT "
            "quantize_static: activation_type=QUInt8)", b.qdq_us, value="uint8"))
    for s in b.sandwiches:
        if s.in_source and s.qdq_us >= MIN_SAVING_US and s.node not in b.foldable:
            out.append(Suggestion(
                "exclude", f"exclude {s.node} ({s.op_type}): it runs in float between DQ and Q; the Q/DQ around it "
                f"cost {s.qdq_us / 1000:.3f} ms per run and save nothing", s.qdq_us, exclude=(s.node,)))
    if b.run_us > a.run_us:
        recoverable = max((s.saves_us for s in out), default=0.0)
        if b.run_us - recoverable > a.run_us:
            out.append(Suggestion(
                "keep_float", f"{b.model} takes {b.run_us / 1000:.3f} ms vs {a.run_us / 1000:.3f} ms for {a.model} and "
                "the Q/DQ overhead found does not explain the gap: keep the float model here",
                b.run_us - a.run_us))
    return out
