"""ONNX exports of both implementations: one registry of named exporters.

Every exporter writes ``<out_dir>/<name>.onnx`` from a :class:`ModelSpec` with a
``(batch, sequence, input_dim)`` float32 input named ``input`` whose batch and sequence
axes are dynamic, and either

* the deployment variant: one output, ``output``; or
* the tapped variant: the DESIGN.md taps ``query``, ``scores``, ``indices``,
  ``weights``, ``output`` (of the last layer), in that order.

Adding an exporter is a function in one of the family modules and a line in
:data:`EXPORTERS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from conformance.export.onnx_files import ExportReport, check_model, describe
from conformance.spec import ModelSpec
from pkm_models.config import TAPS
from pkm_models.errors import PKMError

DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(17, 21)
__all__ = ["DEFAULT_OPSET", "EXPORTER_NAMES", "TAPS", "ExportError", "ExportUnsupported", "ModelSpec", "export"]


class ExportError(PKMError):
    """An export that cannot be made, or one that was made wrong."""


class ExportUnsupported(ExportError):
    """An exporter that cannot handle this model at all (for example, its size)."""


Exporter = Callable[[ModelSpec, Path, int, bool], None]

# name -> "module:function" in this package, imported on use (torch and TensorFlow are
# heavy: importing this package stays light)
EXPORTERS = {
    "torch-dynamo": "torch_exporters:export_dynamo",
    "torch-script": "torch_exporters:export_torchscript",
    "torch-fast": "torch_exporters:export_fast",
    "tf2onnx": "tf_exporters:export_tf2onnx",
    "keras": "tf_exporters:export_keras",
}
EXPORTER_NAMES = tuple(EXPORTERS)


def _exporter(name: str) -> Exporter:
    module, function = EXPORTERS[name].split(":")
    return getattr(importlib.import_module(f"conformance.export.{module}"), function)


def check_exporter_names(names: list[str]) -> None:
    unknown = [n for n in names if n not in EXPORTER_NAMES]
    if unknown:
        raise ExportError(f"unknown exporter(s) {unknown}; available: {list(EXPORTER_NAMES)}")


def export(
    spec: ModelSpec,
    exporter: str,
    out_dir: Path,
    opset: int = DEFAULT_OPSET,
    tapped: bool = False,
    precision: str = "fp32",
) -> ExportReport:
    """Write ``out_dir/<exporter>.onnx``, check it (onnx.checker full check with shape
    inference) and return its report.

    ``precision`` other than fp32 (or an ``exporter`` named ``<exporter>@<precision>``)
    writes ``out_dir/<exporter>@<precision>.onnx`` (see :mod:`conformance.export.precision`)."""
    if "@" in exporter:
        from conformance.precision import split_name

        exporter, named = split_name(exporter)
        precision = named if precision == "fp32" else precision
    check_exporter_names([exporter])
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose one of {list(SUPPORTED_OPSETS)}")
    out_dir = Path(out_dir)
    if precision != "fp32":  # precision hook: conformance.export.precision
        from conformance.export.precision import export_at_precision

        report = export_at_precision(spec, exporter, out_dir, opset, tapped, precision)
    else:
        path = out_dir / f"{exporter}.onnx"
        _exporter(exporter)(spec, path, opset, tapped)
        check_model(path)
        report = describe(path, exporter)
    expected = spec.output_names(tapped)
    if report.inputs != ["input"] or report.outputs != expected:
        raise ExportError(
            f"{exporter}: expected inputs ['input'] and outputs {expected}, got {report.inputs} and {report.outputs}"
        )
    return report
