"""Models past protobuf's 2 GB: their tensors gathered into one external-data file."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from conformance.export.onnx_files import check_model, gather_external_data


def _model(a: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "a"], ["s"]), helper.make_node("Mul", ["s", "b"], ["output"])],
        "g",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, a.shape)],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, a.shape)],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_one_file_per_tensor_becomes_one_data_file(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((300, 7), dtype=np.float32), rng.standard_normal((300, 7), dtype=np.float32)
    (tmp_path / "src").mkdir()
    source = tmp_path / "src" / "m.onnx"
    onnx.save_model(_model(a, b), str(source), save_as_external_data=True, all_tensors_to_one_file=False)
    assert len(list((tmp_path / "src").iterdir())) == 3  # the model and one file per tensor
    target = tmp_path / "m.onnx"
    gather_external_data(source, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "src"]
    check_model(target)
    loaded = onnx.load(str(target))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), a)
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[1]), b)
    x = np.ones((300, 7), np.float32)
    (out,) = ort.InferenceSession(str(target)).run(None, {"input": x})
    np.testing.assert_array_equal(out, (x + a) * b)


def test_inline_tensors_move_out_too(tmp_path):
    a, b = np.full((300, 7), 2, np.float32), np.full((300, 7), 3, np.float32)
    source = tmp_path / "inline.onnx"
    onnx.save_model(_model(a, b), str(source))
    target = tmp_path / "out.onnx"
    gather_external_data(source, target)
    assert (tmp_path / "out.onnx.data").stat().st_size >= a.nbytes + b.nbytes
    assert target.stat().st_size < 2000  # the graph only
    (out,) = ort.InferenceSession(str(target)).run(None, {"input": np.zeros((300, 7), np.float32)})
    np.testing.assert_array_equal(out, np.full((300, 7), 6, np.float32))
