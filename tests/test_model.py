from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from infertune import backends
from infertune.errors import ModelError
from infertune.model import Model
from models import MODELS


def test_load_lists_inputs_outputs_with_symbolic_dims(model_file):
    m = Model.load(model_file("conv"))
    (x,) = m.inputs
    assert (x.name, x.dtype, x.shape) == ("x", "float32", ("N", 3, 16, 16))
    assert x.symbolic_dims == ["N"]
    assert [(o.name, o.shape) for o in m.outputs] == [("y", ("N", 8, 16, 16))]
    assert m.opset == 17
    assert m.parameter_count() == 8 * 3 * 3 * 3 + 8


def test_weights_in_constant_nodes_count_in_parameters_and_bytes():
    """Paddle exports keep weights in Constant nodes: they are parameters like initializers."""
    proto = MODELS["conv"]()
    w = proto.graph.initializer[0]
    proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], [w.name], name="w_const", value=w))
    del proto.graph.initializer[0]
    m = Model.from_proto(proto)
    assert m.parameter_count() == 8 * 3 * 3 * 3 + 8
    assert m.parameter_bytes() == 4 * (8 * 3 * 3 * 3 + 8)
    half = MODELS["conv"]()
    half.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(8, np.float16), half.graph.initializer[1].name))
    assert Model.from_proto(half, check=False).parameter_bytes() == 4 * 8 * 3 * 3 * 3 + 2 * 8


def test_initializers_are_not_inputs_even_when_listed(tmp_path):
    proto = MODELS["gemm"]()
    proto.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT,
                                                                [10, 32]))
    m = Model.from_proto(proto)
    assert [i.name for i in m.inputs] == ["x"]


@pytest.mark.parametrize("content, fragment", [
    (b"", "empty"),
    (np.random.default_rng(0).bytes(4096), "not a valid ONNX model"),
])
def test_garbage_files_are_model_errors(tmp_path, content, fragment):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=fragment):
        Model.load(path)


def test_truncated_model_is_a_model_error(model_file, tmp_path):
    data = model_file("conv").read_bytes()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 7):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelError) as info:
            Model.load(path)
        assert str(path) in str(info.value)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Model.load(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="directory"):
        Model.load(tmp_path)


def test_invalid_graph_is_named(tmp_path):
    proto = MODELS["gemm"]()
    proto.graph.node[0].op_type = "NoSuchOp"
    path = tmp_path / "bad.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match="NoSuchOp"):
        Model.load(path)


def test_external_data_model_loads_and_runs(tmp_path):
    proto = MODELS["gemm"]()
    path = tmp_path / "ext.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="ext.bin",
                    size_threshold=0, all_tensors_to_one_file=True)
    assert (tmp_path / "ext.bin").exists()
    m = Model.load(path)
    w = m.constant_tensors()["W"]
    assert w.shape == (10, 32)
    np.testing.assert_array_equal(w, numpy_helper.to_array(MODELS["gemm"]().graph.initializer[0]))
    x = np.ones((2, 32), np.float32)
    out = backends.compile(m).run({"x": x})["probs"]
    assert out.shape == (2, 10) and np.allclose(out.sum(-1), 1.0, atol=1e-6)

    (tmp_path / "ext.bin").unlink()
    with pytest.raises(ModelError, match="ext"):
        Model.load(path)


def test_duplicate_and_empty_node_names_are_made_unique_and_run():
    m = Model.from_proto(MODELS["duplicate_names"]())
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == 3 and all(names)
    assert m.renamed_nodes == {"dup__1": "dup", "Abs_2": ""}
    x = np.array([[-1, 2, -3, 4]], np.float32)
    np.testing.assert_array_equal(backends.compile(m).run({"x": x})["y"], [[0, 2, 0, 4]])
    # the raw file really is refused by ONNX Runtime, so the renaming is what makes it load
    with pytest.raises(Exception, match="same node name"):
        ort.InferenceSession(MODELS["duplicate_names"]().SerializeToString(),
                             providers=["CPUExecutionProvider"])


def test_if_subgraph_model_loads_counts_nested_ops_and_runs():
    m = Model.from_proto(MODELS["if_subgraph"]())
    assert m.has_subgraphs
    assert m.op_histogram()["Relu"] == 1 and m.op_histogram()["Neg"] == 1
    runner = backends.compile(m)
    x = np.array([[1, -2, 3, 4]], np.float32)
    np.testing.assert_array_equal(runner.run({"x": x})["y"], np.maximum(x, 0))
    np.testing.assert_array_equal(runner.run({"x": -x})["y"], x)


def test_with_outputs_exposes_intermediate_tensors():
    m = Model.from_proto(MODELS["conv"]())
    exposed = m.with_outputs(["c"])
    assert [o.name for o in exposed.outputs] == ["y", "c"]
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    out = backends.compile(exposed).run({"x": x})
    np.testing.assert_allclose(out["y"], np.maximum(out["c"], 0))
    with pytest.raises(ModelError, match="no node"):
        m.with_outputs(["not_a_tensor"])
    only = m.with_outputs(["c"], keep_original=False)
    assert [o.name for o in only.outputs] == ["c"]


def test_tensor_order_is_topological():
    m = Model.from_proto(MODELS["attention"]())
    assert m.tensor_order() == ["kt", "scores", "p", "o"]


def test_save_is_atomic_and_round_trips(tmp_path):
    m = Model.from_proto(MODELS["conv"]())
    path = m.save(tmp_path / "out" / "m.onnx")
    assert Model.load(path).op_histogram() == m.op_histogram()
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]


def test_with_input_shapes_fixes_symbolic_and_paddle_minus_one_dims_and_refuses_a_fixed_mismatch():
    proto = MODELS["conv"]()
    proto.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # how Paddle exports a dynamic batch
    m = Model.from_proto(proto, check=False)
    fixed = m.with_input_shapes({"x": (2, 3, 16, 16)})
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [2, 3, 16, 16]
    onnx.checker.check_model(fixed.proto)
    with pytest.raises(ModelError, match="axis 1 is fixed at 3, not 4"):
        m.with_input_shapes({"x": (2, 4, 16, 16)})
