"""ONNX exports of both implementations: one registry of named exporters.

Every exporter writes ``<out_dir>/<name>.onnx`` from a :class:`ModelSpec` with a
``(batch, sequence, input_dim)`` float32 input named ``input`` whose batch and sequence
axes are dynamic, and either

* the deployment variant: one output, ``output``; or
* the tapped variant: the conformance taps (``query``, ``scores``, ``indices``,
  ``weights``, ``output``; ``<i>/<tap>`` for each layer of a stack), in that order.

The files are written into a private folder beside the destination, checked, and only
then moved into place (the external-data file first), so an export that fails, or a full
disk, leaves an existing file at the destination as it was.

Adding an exporter is a function in one of the family modules and a line in
:data:`EXPORTERS`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from pathlib import Path

from conformance.export.onnx_files import ExportReport, check_model, describe
from conformance.files import fsync, staging_dir
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
    writes ``out_dir/<exporter>@<precision>.onnx`` (see :mod:`conformance.export.at_precision`)."""
    if "@" in exporter:
        from conformance.precision import split_name

        exporter, named = split_name(exporter)
        precision = named if precision == "fp32" else precision
    check_exporter_names([exporter])
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose one of {list(SUPPORTED_OPSETS)}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {out_dir}: {exc.strerror or exc}") from exc
    with staging_dir(out_dir, f".{exporter}-") as staging:
        if precision != "fp32":  # conformance.export.at_precision
            from conformance.export.at_precision import export_at_precision

            report = export_at_precision(spec, exporter, staging, opset, tapped, precision)
            staged = report.path
        else:
            staged = staging / f"{exporter}.onnx"
            _exporter(exporter)(spec, staged, opset, tapped)
            check_model(staged)
            report = describe(staged, exporter)
        expected = spec.output_names(tapped)
        if report.inputs != ["input"] or report.outputs != expected:
            raise ExportError(
                f"{exporter}: expected inputs ['input'] and outputs {expected}, "
                f"got {report.inputs} and {report.outputs}"
            )
        path = out_dir / staged.name
        data = staged.with_name(staged.name + ".data")
        try:
            if data.exists():
                # a model and its data are replaced as a pair: the old model leaves first (into
                # the staging folder, removed with it), so that a process killed between the
                # two renames leaves no model, never an old model reading new data
                if path.exists():
                    os.replace(path, staging / f"replaced-{path.name}")
                    fsync(out_dir)
                os.replace(data, path.with_name(data.name))
            os.replace(staged, path)
            fsync(out_dir)
        except OSError as exc:
            raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return dataclasses.replace(report, path=path)
