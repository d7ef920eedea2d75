"""Models past protobuf's 2 GB: their tensors gathered into one external-data file."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
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


def _canonical(model: onnx.ModelProto):
    """The graph with the exporter's anonymous value names (numbers, which shift with the
    count of graph inputs) replaced by their order of appearance."""
    import re

    text = str(model.graph)
    numbers: dict[str, str] = {}
    text = re.sub(r'"(\d+)"', lambda m: numbers.setdefault(m[1], f'"#{len(numbers)}"'), text)
    text = re.sub(r"onnx::(\w+)_\d+", lambda m: f"onnx::{m[1]}", text)
    return text


def test_torchscript_with_tables_as_inputs_is_the_stock_export(tmp_path, monkeypatch):
    """A large model's TorchScript export traces its value tables as graph inputs, so the
    exporter never encodes them (about 3x the weights on mega): the stock graph node for
    node, the same initializers, the tables in the data file, the same outputs."""
    import conformance.export.onnx_files as onnx_files
    import conformance.export.torch_exporters as torch_exporters
    from conformance.export import ModelSpec, export
    from pkm_models import get_preset
    from pkm_models.weights import make_input

    spec = ModelSpec("small-3", get_preset("small").config, layers=3, seed=3)
    weights = spec.weights()
    rest = sum(v.nbytes for k, v in weights.items() if not k.endswith("values.weight"))
    stock = export(spec, "torch-script", tmp_path / "stock", tapped=True).path
    monkeypatch.setattr(torch_exporters, "EXTERNAL_DATA_THRESHOLD", rest)  # the tables make it large
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", rest)
    lean = export(spec, "torch-script", tmp_path / "lean", tapped=True).path
    tables = [t for t in onnx.load(str(lean), load_external_data=False).graph.initializer if t.external_data]
    assert [t.name for t in tables] == [f"module.layers.{i}.values.weight" for i in range(3)]
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in tables]
    assert all(offset % (1 << 16) == 0 for offset in offsets)  # mapped in place, even with 64 KiB pages
    a, b = onnx.load(str(stock)), onnx.load(str(lean))
    assert [i.name for i in a.graph.input] == [i.name for i in b.graph.input] == ["input"]
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in a.graph.initializer if "::" not in t.name} == {
        t.name: numpy_helper.to_array(t).tobytes() for t in b.graph.initializer if "::" not in t.name
    }
    folded = [  # the exporter's constant-folded tensors, by content (their names are numbered)
        sorted(numpy_helper.to_array(t).tobytes() for t in m.graph.initializer if "::" in t.name) for m in (a, b)
    ]
    assert folded[0] == folded[1]
    del a.graph.initializer[:], b.graph.initializer[:]
    assert _canonical(a) == _canonical(b)
    x = make_input((2, 5, spec.config.input_dim), seed=1)
    got = [ort.InferenceSession(str(p)).run(None, {"input": x}) for p in (stock, lean)]
    for one, other in zip(*got, strict=True):
        np.testing.assert_array_equal(one, other)


def test_an_int8_export_past_the_threshold_keeps_its_codes_in_the_data_file(tmp_path, monkeypatch):
    """An int8 model's value codes are buffers, not parameters: counted, they put a large
    int8 export's tensors in ``<name>.onnx.data`` (embedded, seednet's export took 2.9x
    its codes' size more while the proto was built and serialised); the same outputs."""
    import conformance.export.torch_exporters as torch_exporters
    from conformance.export import ModelSpec, export
    from pkm_models import get_preset
    from pkm_models.weights import make_input

    spec = ModelSpec("small-2", get_preset("small").config, layers=2, seed=3)
    embedded = export(spec, "torch-fast", tmp_path / "embedded", tapped=True, precision="int8").path
    assert not embedded.with_name(embedded.name + ".data").exists()
    weights = spec.weights()
    codes = sum(v.nbytes for k, v in weights.items() if k.endswith("values.weight")) // 4
    rest = sum(v.nbytes for k, v in weights.items() if not k.endswith("values.weight"))
    monkeypatch.setattr(torch_exporters, "EXTERNAL_DATA_THRESHOLD", rest + codes // 2)  # the codes pass it
    external = export(spec, "torch-fast", tmp_path / "external", tapped=True, precision="int8").path
    data = external.with_name(external.name + ".data")
    assert data.stat().st_size >= codes  # the codes moved out of the graph file
    assert external.stat().st_size <= embedded.stat().st_size - codes
    x = make_input((2, 5, spec.config.input_dim), seed=1)
    got = [ort.InferenceSession(str(p)).run(None, {"input": x}) for p in (embedded, external)]
    for one, other in zip(*got, strict=True):
        np.testing.assert_array_equal(one, other)


def test_replacing_an_export_with_external_data_never_pairs_an_old_model_with_new_data(tmp_path, monkeypatch):
    """export --force renamed the new .onnx.data in, then the .onnx: a kill between the two
    left the old model reading the new data."""
    import conformance.export as export_module
    import conformance.export.onnx_files as onnx_files
    import conformance.export.torch_exporters as torch_exporters
    from conformance.export import ExportError, ModelSpec, export
    from pkm_models import get_preset

    monkeypatch.setattr(torch_exporters, "EXTERNAL_DATA_THRESHOLD", 1 << 10)
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", 1 << 10)
    out = tmp_path / "out"
    old = export(ModelSpec("tiny", get_preset("tiny").config, seed=0), "torch-fast", out, tapped=True).path
    assert old.with_name(old.name + ".data").exists()
    real = export_module.os.replace

    def killed_after_the_data(src, dst):
        if str(dst).endswith(".onnx") and not str(dst).endswith(".data") and Path(dst).parent == out:
            raise OSError(5, "killed here")  # the data is in; the model is not
        return real(src, dst)

    monkeypatch.setattr(export_module.os, "replace", killed_after_the_data)
    with pytest.raises(ExportError, match="killed here"):
        export(ModelSpec("tiny", get_preset("tiny").config, seed=1), "torch-fast", out, tapped=True)
    assert not old.exists()  # no model rather than the old one on the new data
    assert sorted(p.name for p in out.iterdir()) == ["torch-fast.onnx.data"]
