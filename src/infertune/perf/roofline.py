"""Roofline: the machine's measured ceilings, and how close a model's ops come to them.

Ceilings are measured once per machine, runtime version and thread count, then cached
(``$INFERTUNE_CACHE`` or ``~/.cache/infertune``): peak FP32 and INT8 GEMM throughput as ONNX
Runtime itself reaches them (a 1024^3 MatMul, and MatMulInteger u8 x s8 of the same size), and
memory bandwidth (a large numpy copy, bytes read + written). Achieved GFLOP/s per op class comes
from a profile (time per kernel) and the FLOPs of the source model (2 x MACs): ``conv`` covers
Conv / FusedConv / QLinearConv / ConvInteger, ``matmul`` covers MatMul / Gemm and their fused and
8-bit forms.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from infertune import backends
from infertune._io import write_json
from infertune.analysis.model_stats import inspect_model
from infertune.fingerprint import cpu, versions
from infertune.model import Model
from infertune.perf.profile import ProfileResult
from infertune.quant.fusion import INT8_KERNELS

GEMM_N = 1024
OP_CLASS = {
    "conv": frozenset({"Conv", "FusedConv", "NchwcConv", "QLinearConv", "ConvInteger", "ConvTranspose"}),
    "matmul": frozenset({"MatMul", "FusedMatMul", "Gemm", "FusedGemm", "QGemm", "QLinearMatMul", "MatMulInteger",
                         "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits"}),
}
SOURCE_CLASS = {"Conv": "conv", "ConvTranspose": "conv", "MatMul": "matmul", "Gemm": "matmul"}


@dataclass(frozen=True)
class Ceilings:
    threads: int
    fp32_gflops: float
    int8_gops: float
    bandwidth_gbs: float
    onnxruntime: str
    cpu: str
    isa: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    return Path(os.environ.get("INFERTUNE_CACHE") or Path.home() / ".cache" / "infertune")


def ceilings(threads: int = 0, *, refresh: bool = False) -> Ceilings:
    """Measured peak FP32 / INT8 GEMM throughput and memory bandwidth, cached per machine."""
    c = cpu()
    threads = threads or c["logical_cores"]
    ort_version = versions().get("onnxruntime", "?")
    key = hashlib.sha256(json.dumps([c["model"], c["isa"], ort_version, threads]).encode()).hexdigest()[:16]
    path = cache_dir() / f"roofline-{key}.json"
    if path.exists() and not refresh:
        try:
            return Ceilings(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            pass  # an older or damaged cache entry: measure again
    settings = backends.Settings(intra_op_threads=threads)
    result = Ceilings(threads, _gemm_gflops(TensorProto.FLOAT, settings), _gemm_gflops(TensorProto.UINT8, settings),
                      _bandwidth_gbs(), ort_version, c["model"], c["isa"])
    write_json(path, result.to_dict())
    return result


def gemm_model(elem: int, n: int = GEMM_N) -> onnx.ModelProto:
    """A = input [n, n]; B = a constant [n, n]; float MatMul, or MatMulInteger u8 x s8 -> int32."""
    rng = np.random.default_rng(0)
    if elem == TensorProto.FLOAT:
        b = helper.make_tensor("B", TensorProto.FLOAT, [n, n], rng.standard_normal((n, n)).astype(np.float32).ravel())
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        out = TensorProto.FLOAT
    else:
        b = helper.make_tensor("B", TensorProto.INT8, [n, n], rng.integers(-127, 128, (n, n), dtype=np.int8).ravel())
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        out = TensorProto.INT32
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", elem, [n, n])],
                              [helper.make_tensor_value_info("Y", out, [n, n])], initializer=[b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _gemm_gflops(elem: int, settings: backends.Settings, seconds: float = 1.0) -> float:
    model = Model.from_proto(gemm_model(elem))
    runner = backends.compile(model, settings)
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((GEMM_N, GEMM_N)).astype(np.float32) if elem == TensorProto.FLOAT
         else rng.integers(0, 256, (GEMM_N, GEMM_N), dtype=np.uint8))
    feed = {"A": a}
    for _ in range(2):
        runner.run(feed)
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        runner.run(feed)
        best = min(best, time.perf_counter() - t0)
    return 2 * GEMM_N**3 / best / 1e9


def _bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    src = np.ones(mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def profiled_dims(model: Model, shapes: dict[str, list[int]]) -> dict[str, int]:
    """The size each symbolic input dim had in the profiled feed."""
    dims: dict[str, int] = {}
    for info in model.inputs:
        for axis, d in enumerate(info.shape or ()):
            if isinstance(d, str) and d and info.name in shapes:
                dims[d] = shapes[info.name][axis]
    return dims


@dataclass(frozen=True)
class OpClassRoof:
    op_class: str
    flops: int  # per run, from the source model
    us: float  # per run, from the profile
    gflops: float
    fraction_of_peak: float  # against the FP32 or INT8 ceiling, whichever its kernels use

    def to_dict(self) -> dict:
        return {"op_class": self.op_class, "flops": self.flops, "us": round(self.us, 3),
                "gflops": round(self.gflops, 3), "fraction_of_peak": round(self.fraction_of_peak, 4)}


@dataclass
class Roofline:
    ceilings: Ceilings
    model_flops: int
    model_gflops: float  # achieved over the whole run
    int8: bool
    op_classes: list[OpClassRoof]

    def to_dict(self) -> dict:
        return {"ceilings": self.ceilings.to_dict(), "model_flops": self.model_flops,
                "model_gflops": round(self.model_gflops, 3), "int8": self.int8,
                "fraction_of_peak": round(self.model_gflops / self.peak, 4),
                "op_classes": [o.to_dict() for o in self.op_classes]}

    @property
    def peak(self) -> float:
        return self.ceilings.int8_gops if self.int8 else self.ceilings.fp32_gflops


def roofline(source: Model, prof: ProfileResult, ceil: Ceilings) -> Roofline:
    """Achieved GFLOP/s of ``source`` (its float FLOPs at the profiled input shapes) against ``ceil``."""
    stats = inspect_model(source, dims=profiled_dims(source, prof.input_shapes))
    flops_by_class: dict[str, int] = {}
    for op, f in stats.flops_by_op_type.items():
        cls = SOURCE_CLASS.get(op)
        if cls:
            flops_by_class[cls] = flops_by_class.get(cls, 0) + f
    rows = []
    for cls, flops in flops_by_class.items():
        kernels = [n for n in prof.nodes if n.op_type in OP_CLASS[cls]]
        us = sum(n.mean_us for n in kernels)
        int8 = sum(n.mean_us for n in kernels if n.op_type in INT8_KERNELS) > us / 2
        gflops = flops / us / 1e3 if us else 0.0
        peak = ceil.int8_gops if int8 else ceil.fp32_gflops
        rows.append(OpClassRoof(cls, flops, us, gflops, gflops / peak if peak else 0.0))
    model_int8 = any(n.op_type in INT8_KERNELS for n in prof.nodes)
    total = stats.flops
    return Roofline(ceil, total, total / prof.run_us / 1e3 if prof.run_us else 0.0, model_int8, rows)
