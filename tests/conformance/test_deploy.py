"""A user's own ONNX file judged as a path (conformance.deploy, conformance.paths.file_paths):
what users ship (a stock torch.onnx.export, an ONNX Runtime-optimized or -quantized model)
and the files that cannot be judged."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from conformance.cli import main
from conformance.deploy import DeployError, deploy_table, model_file, read_facts


def _stock_export(project, path: Path, case: str = "tiny", scale: float | None = None) -> Path:
    """``torch.onnx.export`` of the case's reference model as a user would call it: the stock
    (TorchScript) exporter, its own names (``x`` in, ``y`` out), dynamic batch and sequence."""
    import torch

    (c,) = project.cases(case)
    weights = dict(c.spec.weights())
    if scale is not None:  # a wrong model: one value row changed
        weights["values.weight"] = weights["values.weight"].copy()
        weights["values.weight"][-1] *= np.float32(scale)
    model = c.spec.torch_model(weights).eval()
    x = torch.from_numpy(c.make_input())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "b", 1: "s"}},
        )  # fmt: skip
    return path


def _run(project, tmp_path, *args) -> tuple[int, dict]:
    reports = tmp_path / "reports"
    code = main(["run", "--case", "tiny", *args, *project.cli_args(), "--report-dir", str(reports)])
    report = json.loads((reports / "report.json").read_text())
    return code, {p["name"]: p for c in report["cases"] for p in c["paths"]}


def test_a_stock_export_with_its_own_names_is_judged_on_its_output(project, tmp_path, capsys):
    model = _stock_export(project, tmp_path / "plain.onnx")
    code, paths = _run(project, tmp_path, "--model", str(model), "--path", "torch-eager-cpu", "--path", "*file:*")
    assert code == 0, capsys.readouterr().out
    ort = paths["ort-cpu[file:plain]"]
    assert ort["status"] == "pass"
    assert [t["name"] for t in ort["tensors"]] == ["output"]  # the one tap the file exposes
    assert ort["audit"]["differing"] == [] and ort["audit"]["tensors"] >= 1
    assert paths["onnx-reference[file:plain]"]["status"] == "pass"
    assert paths["ort-cuda[file:plain]"]["status"] == "unavailable"
    assert "exposes no indices" in ort["sweep"]["reason"]


def test_an_ort_optimized_model_saved_at_enable_all_passes(project, tmp_path):
    import onnxruntime as ort

    plain = _stock_export(project, tmp_path / "plain.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(plain), options, providers=["CPUExecutionProvider"])
    code, paths = _run(project, tmp_path, "--model", str(tmp_path / "optimized.onnx"), "--path", "ort-cpu[file:*]")
    assert code == 0
    assert paths["ort-cpu[file:optimized]"]["status"] == "pass"


def test_a_dynamically_quantized_model_is_judged_and_its_difference_named(project, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    plain = _stock_export(project, tmp_path / "plain.onnx")
    quantize_dynamic(str(plain), str(tmp_path / "dynamic.onnx"), weight_type=QuantType.QInt8)
    facts = read_facts(tmp_path / "dynamic.onnx")
    assert facts.precision == "fp32"  # its value table (the largest tensor) stays float32
    code, paths = _run(project, tmp_path, "--model", str(tmp_path / "dynamic.onnx"), "--path", "ort-cpu[file:*]")
    result = paths["ort-cpu[file:dynamic]"]
    # int8 query projection and sub-keys: the scores move, and with them the selection and the output
    assert result["status"] == "fail" and code == 1
    assert result["reason"].startswith("output:")
    # its weights are the case's, each within half a step of its int8 quantization (DequantizeLinear)
    assert result["audit"]["differing"] == [] and "query_proj.0.weight" not in result["audit"]["not_found"]


def test_a_quantized_weight_that_is_not_the_cases_fails_the_audit(project, tmp_path):
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    plain = _stock_export(project, tmp_path / "plain.onnx")
    quantize_dynamic(str(plain), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    model = onnx.load(tmp_path / "q.onnx")
    for i, t in enumerate(model.graph.initializer):
        if t.name == "query_proj.0.weight_quantized":
            codes = numpy_helper.to_array(t).copy()
            codes.flat[5] = codes.flat[5] + (3 if codes.flat[5] < 120 else -3)  # three steps off
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(codes, t.name))
    onnx.save(model, tmp_path / "changed.onnx")
    _, paths = _run(project, tmp_path, "--model", str(tmp_path / "changed.onnx"), "--path", "ort-cpu[file:*]")
    audit = paths["ort-cpu[file:changed]"]["audit"]
    assert audit["differing"] == ["query_proj.0.weight"]
    assert audit["first_difference"]["initializer"] == "query_proj.0.weight_quantized"


def test_a_file_with_a_wrong_row_fails_and_the_audit_names_the_tensor(project, tmp_path):
    model = _stock_export(project, tmp_path / "wrong.onnx", scale=1.5)
    code, paths = _run(project, tmp_path, "--model", str(model), "--path", "ort-cpu[file:*]")
    result = paths["ort-cpu[file:wrong]"]
    assert code == 1 and result["status"] == "fail"
    assert result["audit"]["differing"] == ["values.weight"]


def test_the_toolkits_tapped_export_given_as_a_file_is_judged_on_every_tap_and_swept(project, tmp_path):
    from conformance.export import export

    (case,) = project.cases("tiny")
    built = export(case.spec, "torch-fast", tmp_path / "built", tapped=True).path
    code, paths = _run(project, tmp_path, "--model", str(built), "--path", "ort-cpu[file:*]")
    result = paths["ort-cpu[file:torch-fast]"]
    assert code == 0 and result["status"] == "pass"
    assert [t["name"] for t in result["tensors"]] == ["query", "scores", "indices", "weights", "output"]
    assert result["sweep"]["rows_read"] == result["sweep"]["rows"] == case.config.size


def test_a_reduced_precision_file_is_named_and_judged_at_its_precision(project, tmp_path):
    from conformance.export import export

    (case,) = project.cases("tiny")
    built = export(case.spec, "torch-fast", tmp_path / "fp16", precision="fp16").path
    code, paths = _run(project, tmp_path, "--model", str(built), "--path", "ort-cpu[file:*]*")
    assert built.name == "torch-fast@fp16.onnx"  # named torch-fast-fp16; read as fp16 from its table
    assert paths["ort-cpu[file:torch-fast-fp16]@fp16"]["status"] == "pass" and code == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, d: d.write_bytes(b"\x08\x07not onnx at all" * 50) and d, "not a readable ONNX model"),
        (lambda p, d: d.write_bytes(_stock_export(p, d.with_suffix(".full")).read_bytes()[:3000]) and d, "ONNX"),
    ],
    ids=["not-onnx", "truncated"],
)
def test_a_bad_file_is_an_error_on_its_paths_and_the_others_go_on(project, tmp_path, capsys, make, message):
    bad = make(project, tmp_path / "bad.onnx")
    code, paths = _run(project, tmp_path, "--model", str(bad), "--path", "torch-eager-cpu", "--path", "ort-cpu[file:*]")
    assert code == 1
    assert paths["torch-eager-cpu"]["status"] == "pass"
    result = paths["ort-cpu[file:bad]"]
    assert result["status"] == "error" and message in result["reason"] and "Traceback" not in result["reason"]


def test_a_file_of_another_width_or_unmatched_outputs_says_what_it_has(project, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"]), helper.make_node("Identity", ["a"], ["c"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 16]) for n in ("b", "c")],
    )
    onnx.save(helper.make_model(graph, ir_version=9), tmp_path / "two.onnx")
    _, paths = _run(project, tmp_path, "--model", str(tmp_path / "two.onnx"), "--path", "ort-cpu[file:*]")
    reason = paths["ort-cpu[file:two]"]["reason"]
    assert "['b', 'c']" in reason and "outputs = { output" in reason
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 7])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 7])],
    )
    onnx.save(helper.make_model(graph, ir_version=9), tmp_path / "narrow.onnx")
    _, paths = _run(project, tmp_path, "--model", str(tmp_path / "narrow.onnx"), "--path", "ort-cpu[file:*]")
    assert "16 features" in paths["ort-cpu[file:narrow]"]["reason"]


def test_an_output_mapping_names_the_final_output(project, tmp_path):
    import onnx

    model = onnx.load(_stock_export(project, tmp_path / "m.onnx"))
    model.graph.output.append(onnx.ValueInfoProto(name="x"))  # a second output: the input, passed through
    model.graph.output[-1].CopyFrom(model.graph.input[0])
    onnx.save(model, tmp_path / "two-out.onnx")
    args = ["--model", str(tmp_path / "two-out.onnx"), "--model-output", "output=y", "--path", "ort-cpu[file:*]"]
    code, paths = _run(project, tmp_path, *args)
    assert code == 0 and [t["name"] for t in paths["ort-cpu[file:two-out]"]["tensors"]] == ["output"]


def test_the_case_files_deploy_table(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"x")
    (tmp_path / "b.onnx").write_bytes(b"x")
    files = deploy_table(
        {"onnx": ["a.onnx", {"file": "b.onnx", "precision": "int8", "outputs": {"output": "logits"}}]},
        tmp_path / "c.toml",
        lambda name: tmp_path / name,
    )
    assert [(f.name, f.precision, f.outputs) for f in files] == [
        ("a", None, ()),
        ("b", "int8", (("output", "logits"),)),
    ]
    with pytest.raises(DeployError, match="unknown key"):
        deploy_table({"onnx": ["a.onnx"], "outputz": {}}, tmp_path / "c.toml", lambda name: tmp_path / name)
    with pytest.raises(DeployError, match="not a file"):
        deploy_table({"onnx": ["missing.onnx"]}, tmp_path / "c.toml", lambda name: tmp_path / name)
    with pytest.raises(DeployError, match="precision 'int3'"):
        model_file(tmp_path / "a.onnx", precision="int3")
    taken: set[str] = set()
    assert [model_file(tmp_path / "a.onnx", taken).name for _ in range(2)] == ["a", "a-2"]


def test_a_file_whose_external_data_is_missing_is_an_error_naming_it(project, tmp_path):
    import onnx

    model = onnx.load(_stock_export(project, tmp_path / "m.onnx"))
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    code, paths = _run(project, tmp_path, "--model", str(tmp_path / "ext.onnx"), "--path", "ort-cpu[file:*]")
    assert code == 0 and paths["ort-cpu[file:ext]"]["status"] == "pass"  # external data, mapped from beside it
    (tmp_path / "ext.onnx.data").unlink()
    code, paths = _run(project, tmp_path, "--model", str(tmp_path / "ext.onnx"), "--path", "ort-cpu[file:*]")
    reason = paths["ort-cpu[file:ext]"]["reason"]
    assert code == 1 and "ONNX Runtime cannot load it" in reason and "ext.onnx.data" in reason


def test_a_file_with_an_operator_the_runtime_lacks_says_which(project, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["input"], ["output"], domain="com.example")],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", "s", 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", "s", 8])],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=9), tmp_path / "custom.onnx")
    code, paths = _run(project, tmp_path, "--model", str(tmp_path / "custom.onnx"), "--path", "ort-cpu[file:*]")
    reason = paths["ort-cpu[file:custom]"]["reason"]
    assert code == 1 and "ONNX Runtime cannot load it" in reason and "Frobnicate" in reason
