"""Every exporter: checker-clean, dynamic batch and sequence, same function as the native models."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conformance.export import EXPORTER_NAMES, TAPS, ExportError, ModelSpec, export
from conformance.export.tf_exporters import bfloat16_kept, check_bfloat16_rounding
from pkm_models import get_preset
from pkm_models.config import tap_names
from pkm_models.torch_pkm import build_torch_model
from pkm_models.weights import make_input
from tests.models.helpers import META_ALL_OPTIONS, assert_model_taps_match, assert_taps_match, torch_model_taps

SPEC = ModelSpec.from_preset(get_preset("tiny"), seed=3)
# batch 1, and a sequence length never seen at export time (the example input is (2, 3))
SHAPES = [(1, 1), (2, 3), (4, 17)]


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference():
    return build_torch_model(SPEC.config, SPEC.layers, SPEC.seed).eval()


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("exporter", EXPORTER_NAMES)
def test_tapped_export_matches_the_reference(tmp_path, reference, exporter, opset):
    report = export(SPEC, exporter, tmp_path, opset=opset, tapped=True)
    assert report.opset == opset and report.outputs == list(TAPS)
    model = onnx.load(str(report.path))
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[1], str) and dims[2] == SPEC.config.input_dim
    session = _session(report.path)
    weights = dict(reference.state_dict())
    for shape in SHAPES:
        x = make_input((*shape, SPEC.config.input_dim), seed=sum(shape))
        got = dict(zip(TAPS, session.run(None, {"input": x}), strict=True))
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in reference(torch.from_numpy(x), return_taps=True).items()}
        assert got["output"].shape == (*shape, SPEC.config.output_dim)
        assert_taps_match(ref, got, {k: v.numpy() for k, v in weights.items()}, SPEC.config, atol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTER_NAMES)
def test_deployment_export_has_one_output(tmp_path, reference, exporter):
    report = export(SPEC, exporter, tmp_path, tapped=False)
    assert report.outputs == ["output"]
    x = make_input((3, 5, SPEC.config.input_dim), seed=1)
    (got,) = _session(report.path).run(None, {"input": x})
    with torch.no_grad():
        np.testing.assert_allclose(got, reference(torch.from_numpy(x)).numpy(), atol=1e-5)
    # nothing about the exporting machine: no source paths (the dynamo exporter records stack traces)
    data = report.path.read_bytes()
    for folder in (Path(__file__).resolve().parents[3], Path(torch.__file__).parent):
        assert str(folder).encode() not in data


def test_only_the_fast_export_is_loop_free(tmp_path):
    slow_ops = {"Loop", "If", "Scan"}
    for exporter in ("torch-fast", "torch-dynamo", "torch-script"):
        report = export(SPEC, exporter, tmp_path)
        ops = set(report.op_histogram)
        found = ops & slow_ops | {op for op in ops if op.startswith("Sequence")}
        if exporter == "torch-fast":
            assert not found and not report.warnings
        else:
            assert "Loop" in found and any("Loop" in w for w in report.warnings)


def test_bad_requests(tmp_path):
    with pytest.raises(ExportError, match=r"unknown exporter\(s\) \['onnx-magic'\]; available: \['torch-dynamo'"):
        export(SPEC, "onnx-magic", tmp_path)
    with pytest.raises(ExportError, match="opset 9 is not supported"):
        export(SPEC, "torch-fast", tmp_path, opset=9)
    with pytest.raises(ExportError, match=r"tf2onnx 1\.17 supports opsets up to 18, got 20"):
        export(SPEC, "tf2onnx", tmp_path, opset=20)


# --- Meta's memory-layer options through the Keras port's exporters ---------------------------
META = ModelSpec(
    name="meta",
    config=META_ALL_OPTIONS,
    layers=3,
    seed=4,
)


def _bf16_casts(model: onnx.ModelProto) -> int:
    return sum(
        1
        for n in model.graph.node
        if n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.BFLOAT16 for a in n.attribute)
    )


@pytest.mark.parametrize("exporter", ["tf2onnx", "keras"])
def test_meta_options_export_as_the_reference(tmp_path, exporter):
    """One bfloat16 table for the three layers, one rounding to bfloat16 per layer, and the
    taps of the reference, ``layer_output`` included; the deployed output is the last
    layer's final output."""
    c = META.config
    report = export(META, exporter, tmp_path, tapped=True)
    assert report.outputs == tap_names(3, c)
    model = onnx.load(str(report.path))
    tables = [t for t in model.graph.initializer if tuple(t.dims) == (c.size, c.v_dim)]
    assert [t.data_type for t in tables] == [onnx.TensorProto.BFLOAT16]
    assert _bf16_casts(model) == 3
    reference = build_torch_model(c, 3, META.seed).eval()
    session = _session(report.path)
    for shape in SHAPES:
        x = make_input((*shape, c.input_dim), seed=sum(shape) + 20)
        got = dict(zip(report.outputs, session.run(None, {"input": x}), strict=True))
        assert_model_taps_match(torch_model_taps(reference, x), got, META.weights(), c, 3, atol=1e-5)
    deployed = export(META, exporter, tmp_path / "deployed", tapped=False)
    x = make_input((2, 5, c.input_dim), seed=1)
    (got,) = _session(deployed.path).run(None, {"input": x})
    with torch.no_grad():
        np.testing.assert_allclose(got, reference(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=0)


def test_a_precision_the_opset_cannot_hold_is_refused_before_exporting(tmp_path, monkeypatch):
    """bf16 at opset 18 is refused from ONNX's schemas at once, and the refusal agrees with
    the checker on the export made without it."""
    import conformance.export.at_precision as at_precision
    from conformance.export import ExportUnsupported

    with pytest.raises(ExportUnsupported, match=r"TopK takes no tensor\(bfloat16\) at opset 18"):
        export(SPEC, "torch-fast@bf16", tmp_path / "schema")
    assert not list((tmp_path / "schema").glob("*.onnx"))
    monkeypatch.setattr(at_precision, "opset_refusal", lambda precision, opset: None)
    with pytest.raises(ExportUnsupported, match=r"op_type:TopK.*bfloat16"):
        export(SPEC, "torch-fast@bf16", tmp_path / "checker")
    assert at_precision.opset_refusal("fp16", 18) is None and at_precision.opset_refusal("int8", 18) is None


def test_tf2onnx_is_left_as_it_was_and_a_lost_rounding_is_refused():
    """The bfloat16 fixes to tf2onnx hold only inside the export; a graph that lost the
    rounding is refused, not written."""
    from tensorflow.core.framework import types_pb2
    from tf2onnx import tf_utils
    from tf2onnx.optimizer import back_to_back_optimizer as b2b

    before = (tf_utils.TF_TO_ONNX_DTYPE[types_pb2.DT_BFLOAT16], b2b._func_map[("Cast",)])
    with bfloat16_kept():
        assert tf_utils.TF_TO_ONNX_DTYPE[types_pb2.DT_BFLOAT16] == onnx.TensorProto.BFLOAT16
        assert b2b._func_map[("Cast",)] is not before[1]
    assert (tf_utils.TF_TO_ONNX_DTYPE[types_pb2.DT_BFLOAT16], b2b._func_map[("Cast",)]) == before
    one_cast = onnx.helper.make_graph(
        [onnx.helper.make_node("Cast", ["x"], ["y"], to=onnx.TensorProto.BFLOAT16)],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, [1])],
    )
    check_bfloat16_rounding(onnx.helper.make_model(one_cast), ModelSpec("one", META.config, 1), "tf2onnx")
    with pytest.raises(ExportError, match=r"dropped the rounding .* \(1 Cast to bfloat16 for 3 layer\(s\)\)"):
        check_bfloat16_rounding(onnx.helper.make_model(one_cast), META, "tf2onnx")
