"""PyTorch -> ONNX: the two stock exporters on the reference, and the loop-free export."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from conformance.export import ModelSpec
from conformance.export.onnx_files import (
    EXTERNAL_DATA_THRESHOLD,
    gather_external_data,
    quiet_exporters,
    replace_inputs_with_initializers,
)
from pkm_models.torch_fast import fast_module
from pkm_models.torch_reduced import DTYPES, CastModel, int8_module, model_bytes


class _Exported(nn.Module):
    """What an exporter sees: ``module`` on one input. Its value tables can be handed in as
    extra inputs instead (``table_inputs``: their parameter names; a shared table once), so
    that the TorchScript exporter traces them as graph inputs, not parameters."""

    table_inputs: tuple[str, ...] = ()

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, input, *tables):
        if not self.table_inputs:  # every export but a large model's TorchScript one
            return self.outputs(input)
        given = dict(zip(self.table_inputs, tables, strict=True))
        held = dict(self.named_parameters())
        swapped = [
            (owner, attr, tensor)
            for name, tensor in given.items()
            for owner in self.modules()
            for attr, param in owner._parameters.items()
            if param is held[name]
        ]
        saved = [(owner, attr, owner._parameters[attr]) for owner, attr, _ in swapped]
        try:
            for owner, attr, tensor in swapped:
                owner._parameters[attr] = tensor
            return self.outputs(input)
        finally:
            for owner, attr, param in saved:
                owner._parameters[attr] = param


class _Deployment(_Exported):
    def outputs(self, input):
        return self.module(input)


class _Tapped(_Exported):
    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__(module)
        self.names = names

    def outputs(self, input):
        taps = self.module(input, return_taps=True)
        return tuple(taps[name] for name in self.names)


def _wrapped(spec: ModelSpec, tapped: bool, fast: bool) -> nn.Module:
    module = spec.torch_model()
    if fast:
        module = fast_module(module)
    return (_Tapped(module, spec.output_names(True)) if tapped else _Deployment(module)).eval()


def _example(spec: ModelSpec) -> torch.Tensor:
    # batch and sequence sizes distinct from each other and from 1, so neither is specialised
    return torch.zeros(2, 3, spec.config.input_dim)


def _weight_bytes(params) -> int:
    """Bytes of ``params`` (a module's parameters, or some of them)."""
    return sum(p.numel() * p.element_size() for p in params)


def _dynamic_axes(spec: ModelSpec, tapped: bool) -> dict[str, dict[int, str]]:
    axes = {"input": {0: "batch", 1: "sequence"}, "output": {0: "batch", 1: "sequence"}}
    if tapped:
        axes.update({name: {0: "rows"} for name in spec.output_names(True) if not name.endswith("output")})
        axes.update({name: {0: "batch", 1: "sequence"} for name in spec.output_names(True) if name.endswith("output")})
    return axes


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _drop_source_locations(model) -> None:
    """Remove the Python stack traces the dynamo exporter records on each node: they name
    files on the exporting machine, so the same model exported from two checkouts would
    differ byte for byte (and a shared file would reveal the exporter's paths)."""
    from onnx_ir.traversal import RecursiveGraphIterator

    for node in RecursiveGraphIterator(model.graph):
        node.metadata_props.pop(STACK_TRACE_KEY, None)


def _export_dynamo(module: nn.Module, spec: ModelSpec, path: Path, opset: int, tapped: bool) -> None:
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with quiet_exporters():
        program = torch.onnx.export(
            module,
            (_example(spec),),
            dynamo=True,
            input_names=["input"],
            output_names=spec.output_names(tapped),
            dynamic_shapes={"input": {0: batch, 1: sequence}},
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    _drop_source_locations(program.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    # past the threshold the initializers go straight to ``<path>.data``; embedded, the
    # proto and its serialized bytes would each add a copy (seednet at int8: +3.5 GiB).
    # Buffers count: an int8 model's value codes are buffers.
    program.save(str(path), external_data=model_bytes(module) > EXTERNAL_DATA_THRESHOLD)


def export_dynamo(spec: ModelSpec, path: Path, opset: int, tapped: bool) -> None:
    """``torch.onnx.export(dynamo=True)`` of the reference (EmbeddingBag -> Loop)."""
    _export_dynamo(_wrapped(spec, tapped, fast=False), spec, path, opset, tapped)


def export_fast(spec: ModelSpec, path: Path, opset: int, tapped: bool) -> None:
    """The loop-free forward (:mod:`pkm_models.torch_fast`) through the dynamo exporter."""
    _export_dynamo(_wrapped(spec, tapped, fast=True), spec, path, opset, tapped)


def export_torchscript(spec: ModelSpec, path: Path, opset: int, tapped: bool) -> None:
    """The TorchScript (tracing) exporter, ``dynamo=False``, on the reference.

    A model past :data:`EXTERNAL_DATA_THRESHOLD` is traced with its float value tables as
    graph inputs (:class:`_Exported`), which then become initializers written straight from
    the mapped weights into ``<path>.data``. The exporter would otherwise encode every
    parameter into a proto for ONNX shape inference, and again for the file: about 3x the
    weights (9.4 GiB for mega's 3.0). The graph is the stock one node for node (a test
    compares the two routes); only the tables' initializers come last."""
    module = _wrapped(spec, tapped, fast=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = _weight_bytes(module.parameters())
    large = weight_bytes > EXTERNAL_DATA_THRESHOLD
    tables = {}
    if large:
        tables = {
            name: p
            for name, p in module.named_parameters()
            if name.endswith("values.weight") and p.dtype in (torch.float32, torch.float16)
        }
        if weight_bytes - _weight_bytes(tables.values()) > EXTERNAL_DATA_THRESHOLD:
            tables = {}  # what stays a parameter is large itself (a bfloat16 table): the stock route
    module.table_inputs = tuple(tables)
    staged = path.with_name(path.stem + ".tmp") / path.name if large else path
    staged.parent.mkdir(parents=True, exist_ok=True)
    with quiet_exporters():
        torch.onnx.export(
            module,
            (_example(spec), *tables.values()),
            str(staged),
            dynamo=False,
            input_names=["input", *tables],
            output_names=spec.output_names(tapped),
            dynamic_axes=_dynamic_axes(spec, tapped),
            opset_version=opset,
        )
    if tables:  # the graph without the tables: small; the tables become its initializers
        model = onnx.load(str(staged), load_external_data=False)
        arrays = ((name, p.detach().numpy()) for name, p in tables.items())
        replace_inputs_with_initializers(model, arrays, path, weight_bytes)
    elif large:  # the exporter writes one file per tensor past 2 GB: gather them into one data file
        gather_external_data(staged, path)
    if large:
        for f in staged.parent.iterdir():
            f.unlink()
        staged.parent.rmdir()


# --- reduced precision (conformance.precision) ---------------------------------------------
def _precision_module(spec: ModelSpec, tapped: bool, precision: str) -> nn.Module:
    reference = spec.torch_model()
    if precision == "int8":  # standard ONNX: Gather codes and scales, Cast, Mul, Add, MatMul
        module = int8_module(reference, fused=False)
    else:  # every parameter and activation in the type; Cast at the float32 interface
        module = CastModel(fast_module(reference), DTYPES[precision])
    return (_Tapped(module, spec.output_names(True)) if tapped else _Deployment(module)).eval()


def export_fast_precision(spec: ModelSpec, path: Path, opset: int, tapped: bool, precision: str) -> None:
    """The loop-free forward at ``precision`` (fp16, bf16: the cast model; int8: the value
    table as uint8 codes with a float32 scale and offset per row) through the dynamo
    exporter, with a float32 input and float32 / int64 outputs."""
    _export_dynamo(_precision_module(spec, tapped, precision), spec, path, opset, tapped)
