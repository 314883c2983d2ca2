"""What ONNX Runtime actually runs: Q/DQ left unfused and 8-bit kernels after its optimiser.

A Q/DQ model is only as fast as what the CPU graph optimiser fuses: QuantizeLinear /
DequantizeLinear left in the optimised graph are pure overhead around float ops. This reads the
optimised graph ONNX Runtime saves and counts them.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx

from infertune import backends
from infertune.model import Model

FLOAT_COMPUTE = frozenset({"Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "NchwcConv"})
INT8_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QGemm",
                          "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
                          "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
                          "ConvInteger", "DynamicQuantizeMatMul", "QAttention"})


@dataclass(frozen=True)
class FusionReport:
    ops: dict[str, int]
    unfused_quantize: int
    unfused_dequantize: int
    boundary: int  # of those, Q reading a graph input or DQ writing a graph output (unavoidable)
    int8_kernels: int
    float_compute: int  # Conv/MatMul/Gemm/FusedConv/FusedMatMul still in float

    def to_dict(self) -> dict:
        return {"unfused_quantize": self.unfused_quantize, "unfused_dequantize": self.unfused_dequantize,
                "boundary": self.boundary,
                "int8_kernels": self.int8_kernels, "float_compute": self.float_compute, "ops": self.ops}


def fusion_report(model: Model, settings: backends.Settings | None = None) -> FusionReport:
    """Compile ``model`` with ONNX Runtime (optimisations on) and count what survived."""
    base = settings or backends.Settings()
    with tempfile.TemporaryDirectory(prefix="infertune-fusion-") as d:
        path = Path(d) / "optimized.onnx"
        s = backends.Settings(intra_op_threads=base.intra_op_threads, inter_op_threads=base.inter_op_threads,
                              graph_optimization=base.graph_optimization, execution_mode=base.execution_mode,
                              optimized_model_path=str(path), options=base.options)
        backends.compile(model, s, backend="ort")
        optimized = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in optimized.graph.node)
    g = optimized.graph
    inputs, outputs = {i.name for i in g.input}, {o.name for o in g.output}
    boundary = sum(1 for n in g.node if (n.op_type == "QuantizeLinear" and n.input[0] in inputs)
                   or (n.op_type == "DequantizeLinear" and n.output[0] in outputs))
    return FusionReport(
        ops=dict(ops.most_common()),
        unfused_quantize=ops["QuantizeLinear"],
        unfused_dequantize=ops["DequantizeLinear"],
        boundary=boundary,
        int8_kernels=sum(c for op, c in ops.items() if op in INT8_KERNELS),
        float_compute=sum(ops[o] for o in FLOAT_COMPUTE),
    )
