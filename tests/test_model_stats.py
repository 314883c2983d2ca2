"""FLOPs against values computed by hand from the layer definitions (2 x MACs)."""

from __future__ import annotations

import pytest

from infertune.analysis.model_stats import inspect_model
from infertune.model import Model
from models import MODELS


def stats(name, **dims):
    return inspect_model(Model.from_proto(MODELS[name]()), dims=dims)


def test_conv_flops_by_hand():
    # out [1, 8, 16, 16]; each output reads 3 channels x 3 x 3
    assert stats("conv").flops == 2 * (8 * 16 * 16) * (3 * 3 * 3)
    assert stats("conv", N=4).flops == 4 * 2 * (8 * 16 * 16) * (3 * 3 * 3)


def test_grouped_strided_conv_flops_by_hand():
    # out [1, 6, 4, 4]; group 2 -> each output reads 4/2 channels x 3 x 3
    assert stats("grouped_conv").flops == 2 * (6 * 4 * 4) * (2 * 3 * 3)


def test_conv_transpose_flops_by_hand():
    # in [1, 4, 5, 5]; each input element scatters into 3 channels x 2 x 2
    assert stats("conv_transpose").flops == 2 * (4 * 5 * 5) * (3 * 2 * 2)


def test_gemm_flops_by_hand():
    s = stats("gemm", N=5)
    assert s.flops == 2 * 5 * 10 * 32  # M=5, N=10, K=32 with transB
    assert s.flops_by_op_type == {"Gemm": 2 * 5 * 10 * 32}
    assert s.parameter_count == 10 * 32 + 10
    assert s.parameter_bytes == 4 * (10 * 32 + 10)


def test_batched_attention_matmuls_by_hand():
    s = stats("attention", B=2, S=16)
    per_matmul = 2 * 2 * 16 * 8 * 16  # batch B x H, [S, D] @ [D, S] and [S, S] @ [S, D]
    assert {n.node: n.macs for n in s.nodes} == {"qk": per_matmul, "pv": per_matmul}
    assert s.flops == 2 * 2 * per_matmul


def test_unresolved_symbolic_dims_are_reported_not_guessed():
    s = stats("attention")
    assert s.flops == 0
    assert sorted(s.uncounted) == ["pv", "qk"]
    assert s.unresolved_dims == ["S"]


def test_shapes_that_inference_cannot_tell_are_measured():
    s = stats("reshape_matmul", N=3)
    assert s.shapes_measured
    assert s.flops == 2 * (3 * 4 * 6 // 24) * 24 * 5


def test_histogram_and_subgraph_flag():
    s = stats("if_subgraph")
    assert s.op_histogram == {"ReduceSum": 1, "Greater": 1, "If": 1, "Neg": 1, "Relu": 1}
    assert s.has_subgraphs and s.node_count == 5


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_fixture_inspects_and_serialises(name):
    import json

    d = stats(name, S=4).to_dict()
    json.dumps(d)
    assert d["kind"] == "inspect" and d["environment"]["versions"]["onnx"]
