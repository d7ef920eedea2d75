"""Writing, checking and describing ONNX files, large ones included.

A model whose initializers exceed :data:`EXTERNAL_DATA_THRESHOLD` is saved with its
tensors in one external-data file beside it (``<name>.onnx.data``). That keeps every
export under protobuf's 2 GB limit, and ONNX Runtime memory-maps such a file instead of
copying it (at the xlm size the value-row gather measured about 8% faster that way).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from conformance.isolation import muted

EXTERNAL_DATA_THRESHOLD = 256 << 20  # bytes of initializers
# Ops that run slowly in ONNX Runtime or that TensorRT rejects
SLOW_OPS = {
    "Loop": "a loop over the bags (slow in ONNX Runtime, unsupported by TensorRT)",
    "If": "control flow (unsupported by TensorRT in most positions)",
    "Scan": "a loop (slow in ONNX Runtime)",
}
SEQUENCE_PREFIX = "Sequence"


@contextlib.contextmanager
def quiet_exporters():
    """The exporters print progress to stdout and log warnings about optional packages;
    keep the terminal for the toolkit's own output. Errors still raise. One export at a
    time (:func:`conformance.isolation.muted`)."""
    names = ("tf2onnx", "torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._dynamo")
    loggers = [logging.getLogger(n) for n in names]
    with muted():
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _declared_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor by its declared shape and type (wherever its data lies)."""
    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            total += int(info.get("length", 0))
        else:
            total += _declared_bytes(t)
    return total


_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}


def float_weight_bytes(path: Path) -> int:
    """Bytes of the floating-point tensors a saved model holds (initializers, inline or
    external, and Constant nodes), sized from their declared shapes and types: the weights
    without the graph (which grows with layers and taps) or integer constants (shapes,
    indices). What a model at a reduced precision is judged by (``conformance.precision``)."""
    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer)
    tensors += [
        a.t for n in all_nodes(model.graph) if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    floats = [t for t in tensors if t.data_type in _FLOAT_TYPES]
    return sum(_declared_bytes(t) for t in floats)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, with external data in ``<path>.data`` when the weights are large."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, path)


def align(sink, nbytes: int) -> None:
    """Pad ``sink`` so that the next tensor (``nbytes``) starts where ONNX Runtime can map it
    in place: a multiple of 64 KiB for a tensor of at least that (the largest page size of
    the machines a file may be deployed to, aarch64 with 64 KiB pages), else of 4 KiB."""
    boundary = 1 << 16 if nbytes >= 1 << 16 else 4096
    sink.write(b"\0" * (-sink.tell() % boundary))


def gather_external_data(source: Path, path: Path) -> None:
    """Save the model ``source`` (whose tensors may lie in files beside it, one per tensor,
    as the TorchScript exporter writes them past 2 GB) as ``path`` with every external
    tensor, and every large inline one, in the one file ``<path>.data``; external tensors
    are copied in blocks, never all in memory."""
    source, path = Path(source), Path(path)
    model = onnx.load(str(source), load_external_data=False)
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as sink:
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                if len(tensor.raw_data) > 1024:  # written inline (a model under 2 GB): moved out too
                    align(sink, len(tensor.raw_data))
                    start = sink.tell()
                    sink.write(tensor.raw_data)
                    tensor.ClearField("raw_data")
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", data.name), ("offset", start), ("length", sink.tell() - start)):
                        tensor.external_data.add(key=key, value=str(value))
                continue
            info = {e.key: e.value for e in tensor.external_data}
            offset, length = int(info.get("offset", 0)), info.get("length")
            align(sink, int(length) if length is not None else 1 << 16)
            start = sink.tell()
            with open(source.parent / info["location"], "rb") as f:
                f.seek(offset)
                left = int(length) if length is not None else None
                while left is None or left > 0:
                    block = f.read(64 << 20 if left is None else min(left, 64 << 20))
                    if not block:
                        break
                    sink.write(block)
                    left = None if left is None else left - len(block)
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", start), ("length", sink.tell() - start)):
                tensor.external_data.add(key=key, value=str(value))
    onnx.save_model(model, str(path))


def check_model(path: Path) -> None:
    """onnx.checker (full check, including shape inference) on a saved file."""
    onnx.checker.check_model(str(path), full_check=True)


def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attr.g)
            for g in attr.graphs:
                yield from all_nodes(g)


@dataclasses.dataclass
class ExportReport:
    exporter: str
    path: Path
    opset: int
    op_histogram: dict[str, int]
    parameters: int
    file_bytes: int
    inputs: list[str]
    outputs: list[str]
    warnings: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)  # e.g. a reduced precision's form and size

    def render(self) -> str:
        size = self.file_bytes / 2**20
        ops = ", ".join(f"{op} {n}" for op, n in sorted(self.op_histogram.items(), key=lambda kv: (-kv[1], kv[0])))
        lines = [
            f"{self.exporter}: {self.path} (opset {self.opset}, {self.parameters:,} parameters, {size:,.1f} MB)",
            f"  inputs {self.inputs} -> outputs {self.outputs}",
            f"  ops: {ops}",
        ]
        lines += [f"  {n}" for n in self.notes]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def describe(path: Path, exporter: str) -> ExportReport:
    """Op-type histogram, parameter count, size on disk and slow-op warnings of a file."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    histogram = collections.Counter(node.op_type for node in all_nodes(model.graph))
    parameters = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
    data = path.with_name(path.name + ".data")
    file_bytes = os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)
    warnings = [f"{n} x {op}: {SLOW_OPS[op]}" for op, n in sorted(histogram.items()) if op in SLOW_OPS]
    warnings += [
        f"{n} x {op}: sequence ops (unsupported by TensorRT)"
        for op, n in sorted(histogram.items())
        if op.startswith(SEQUENCE_PREFIX)
    ]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportReport(
        exporter=exporter,
        path=path,
        opset=opset,
        op_histogram=dict(histogram),
        parameters=parameters,
        file_bytes=file_bytes,
        inputs=[i.name for i in model.graph.input],
        outputs=[o.name for o in model.graph.output],
        warnings=warnings,
    )


def replace_inputs_with_initializers(
    model: onnx.ModelProto, arrays: Iterable[tuple[str, np.ndarray]], path: Path, total_bytes: int
) -> None:
    """Turn graph inputs into initializers holding ``arrays`` (pairs of input name and
    array, consumed one at a time) and save the model to ``path``.

    Large weights are written straight into ``<path>.data`` and referenced as external
    data, so no second in-memory copy of them is ever made (a model of several GB is
    saved with a few MB of extra memory).
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    external = total_bytes > EXTERNAL_DATA_THRESHOLD
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    replaced = set()
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(data, "wb")) if external else None
        for name, array in arrays:
            if name not in inputs:
                raise ValueError(f"no graph input named {name!r}; inputs: {sorted(inputs)}")
            array = np.ascontiguousarray(array)
            if sink is None:
                graph.initializer.append(numpy_helper.from_array(array, name))
            else:
                tensor = onnx.TensorProto(name=name, dims=array.shape)
                tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
                align(sink, array.nbytes)
                offset = sink.tell()
                array.tofile(sink)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", offset), ("length", array.nbytes)):
                    tensor.external_data.add(key=key, value=str(value))
                graph.initializer.append(tensor)
            replaced.add(name)
    keep = [i for i in graph.input if i.name not in replaced]
    del graph.input[:]
    graph.input.extend(keep)
    onnx.save_model(model, path)


def rename_values(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """Rename graph values (inputs, outputs, initializers, node edges) in place."""
    graph = model.graph
    for node in all_nodes(graph):
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        value.name = mapping.get(value.name, value.name)


def order_outputs(model: onnx.ModelProto, names: list[str]) -> None:
    """Keep exactly the graph outputs ``names``, in that order."""
    by_name = {o.name: o for o in model.graph.output}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"graph has no outputs {missing}; it has {sorted(by_name)}")
    ordered = [by_name[n] for n in names]
    del model.graph.output[:]
    model.graph.output.extend(ordered)
