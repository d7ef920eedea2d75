"""Exports at reduced precision: ``<exporter>@<precision>.onnx``.

Made for ``torch-fast`` (the loop-free export every deployment path runs): the other
exporters' reduced-precision variants are ``ExportUnsupported``.

* ``fp16`` / ``bf16``: the model cast to the type, exported as such: weights are stored
  in the type and every op computes in it; the graph keeps a float32 ``input`` and
  float32 / int64 outputs (one ``Cast`` at each end), so a deployment swaps files
  without changing its feeds, and the taps compare with the float32 goldens directly.
* ``int8``: weight-only. The value table is stored as ``uint8`` codes with a float32
  scale and offset per row (the format of PyTorch's ``embedding_bag_byte_prepack``, see
  :func:`conformance.precision.quantize_rows`), and the weighted sum is standard ONNX:
  ``Gather`` of the codes, the scales and the offsets, ``Cast`` to float32, ``Mul``,
  ``Add``, then the same batched ``MatMul`` as the float32 export. Chosen over ONNX
  Runtime's contrib ``com.microsoft.GatherBlockQuantized`` because it runs on every ONNX
  runtime (TensorRT and the ONNX reference evaluator included), dequantises exactly like
  PyTorch's fused kernel (so one derived bound judges both), and its size is the same
  (one byte per value plus 8 bytes per 768-value row). ``DequantizeLinear`` is not used:
  its zero point is an integer, and the per-row offset of this format is a float.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from conformance.export.onnx_files import ExportReport, check_model, describe
from conformance.precision import REDUCED, check_precision, join_name
from conformance.spec import ModelSpec

FORMS = {
    "fp16": "float16 weights and compute; float32 input and float32/int64 outputs (Cast at both ends)",
    "bf16": "bfloat16 weights and compute; float32 input and float32/int64 outputs (Cast at both ends)",
    "int8": "uint8 value rows with float32 per-row scale and offset, standard ONNX "
    "(Gather, Cast, Mul, Add, MatMul); queries, keys and the weighted sum in float32",
}
PRECISION_EXPORTERS = ("torch-fast",)
# the ops of every PKM export that compute in the export's type (the loop-free forward)
TYPED_OPS = ("MatMul", "Softmax", "TopK", "Gather")
_ONNX_TYPES = {"fp16": "tensor(float16)", "bf16": "tensor(bfloat16)"}


def _allowed_types(op: str, opset: int) -> list[str]:
    """The types ``op`` takes for its first input at ``opset`` (ONNX's own schema)."""
    schema = onnx.defs.get_schema(op, opset)
    name = schema.inputs[0].type_str
    return next((list(c.allowed_type_strs) for c in schema.type_constraints if c.type_param_str == name), [name])


def opset_refusal(precision: str, opset: int) -> str | None:
    """Why ONNX ``opset`` cannot hold a PKM export at ``precision`` (an op of
    :data:`TYPED_OPS` without the type in its schema), or None. Decided from the schema
    before exporting, instead of after a full export that the checker would refuse."""
    wanted = _ONNX_TYPES.get(precision)
    if wanted is None:
        return None
    for op in TYPED_OPS:
        if wanted not in _allowed_types(op, opset):
            newest = onnx.defs.get_schema(op).since_version
            first = next((v for v in range(opset + 1, newest + 1) if wanted in _allowed_types(op, v)), None)
            since = f"from opset {first}" if first else "in no opset this onnx knows"
            return f"{op} takes no {wanted} at opset {opset}; ONNX allows it {since}"
    return None


def export_at_precision(
    spec: ModelSpec, exporter: str, out_dir: Path, opset: int, tapped: bool, precision: str
) -> ExportReport:
    """Write and check ``out_dir/<exporter>@<precision>.onnx``; the report says the form
    and the size against the float32 weights."""
    from conformance.export import ExportUnsupported

    check_precision(precision)
    if precision not in REDUCED:
        raise ValueError(f"not a reduced precision: {precision!r}")
    if exporter not in PRECISION_EXPORTERS:
        raise ExportUnsupported(
            f"{exporter}: reduced-precision exports are made from {list(PRECISION_EXPORTERS)} only "
            f"(the loop-free forward); export {join_name('torch-fast', precision)} instead"
        )
    name = join_name(exporter, precision)
    why = opset_refusal(precision, opset)
    if why:
        raise ExportUnsupported(f"{name}: ONNX opset {opset} does not allow it: {why}")
    from conformance.export.torch_exporters import export_fast_precision

    path = Path(out_dir) / f"{name}.onnx"
    export_fast_precision(spec, path, opset, tapped, precision)
    try:
        check_model(path)
    except onnx.checker.ValidationError as exc:  # the spec has no such type for an op (bf16 TopK)
        path.unlink(missing_ok=True)
        raise ExportUnsupported(f"{name}: ONNX opset {opset} does not allow it: {str(exc).strip()}") from exc
    except onnx.shape_inference.InferenceError as exc:
        path.unlink(missing_ok=True)
        raise ExportUnsupported(f"{name}: ONNX opset {opset} does not allow it: {str(exc).strip()}") from exc
    report = describe(path, name)
    fp32 = spec.weight_bytes
    report.notes = [
        f"precision {precision}: {FORMS[precision]}",
        f"size {report.file_bytes / 2**20:,.1f} MB = {report.file_bytes / fp32:.2f}x the float32 weights "
        f"({fp32 / 2**20:,.1f} MB)",
    ]
    return report
