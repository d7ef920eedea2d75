"""The value stage of an ONNX export: from the ``indices`` and ``weights`` taps to ``output``.

The table sweep (:mod:`conformance.sweep`) reads every value row through the lookup an
export really computes, so it runs that part of the export's own graph, cut out with
ONNX's model extractor (:class:`onnx.utils.Extractor`) and run on the path's runtime. The
cut is found by walking back from the layer's ``output``:

* the walk stops at the ``indices`` and ``weights`` taps, or at the tensor a tap is a
  reshape, squeeze or cast of (an exporter reshapes the selection once for the tap and
  once for the sum): those become the stage's inputs, fed from the sweep's taps;
* a ``Shape`` node's input is needed for its shape only: it must be the model's own
  ``input`` (fed as zeros of ``(bags, 1, ..., input_dim)``), else the stage cannot be cut
  (an export that takes the output's shape from inside the selection);
* initializers stay where they are: the cut model is read without its external data and
  the session maps the export's own data file (no copy of the table, on disk or in memory).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from pathlib import Path

import numpy as np
import onnx

from pkm_models.errors import PKMError

# ops that only reshape or retype a tensor: a tap made by them is the same data
_SAME_DATA = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast"}
_NUMPY = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}


class NoValueStage(PKMError):
    """The export's weighted sum cannot be cut out on its own; the message says why."""


@dataclasses.dataclass
class ValueStage:
    """A cut value stage: ``model`` (no external data loaded) and how to feed it."""

    model: onnx.ModelProto
    input: str | None  # the model's input, needed for its shape only
    input_rank: int
    indices: str
    weights: str
    output: str
    indices_shape: tuple  # the stage input's trailing dims (its first is the row count)
    weights_shape: tuple
    indices_dtype: type
    weights_dtype: type

    def feeds(self, indices: np.ndarray, weights: np.ndarray, bags: int, input_dim: int) -> dict[str, np.ndarray]:
        """The stage's feeds for ``bags`` bags of (bags * heads, knn) ``indices`` and ``weights``."""
        out = {
            self.indices: indices.reshape(-1, *self.indices_shape).astype(self.indices_dtype, copy=False),
            self.weights: weights.reshape(-1, *self.weights_shape).astype(self.weights_dtype, copy=False),
        }
        if self.input is not None:  # read for its shape only
            out[self.input] = np.zeros((bags, *([1] * (self.input_rank - 2)), input_dim), np.float32)
        return out


def _elem_type(model: onnx.ModelProto, name: str) -> tuple[int, tuple]:
    for info in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if info.name == name:
            t = info.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
            return t.elem_type, dims
    raise NoValueStage(f"no type is known for {name!r}")


def _trailing(dims: tuple, name: str) -> tuple:
    """The dims after the leading (dynamic) one; each must be static."""
    if not dims or any(d is None for d in dims[1:]):
        raise NoValueStage(f"{name!r} has shape {dims}: only its first dimension may be dynamic")
    return tuple(dims[1:])


def cut_value_stage(path: Path, prefix: str = "") -> ValueStage:
    """The value stage of layer ``prefix`` (``""`` or ``"<i>/"``) of the tapped export at
    ``path``; NoValueStage when the export's graph does not separate it."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    output, taps = f"{prefix}output", (f"{prefix}indices", f"{prefix}weights")
    same = {}  # tensor -> the tap it carries
    for tap in taps:
        t = tap
        same[t] = tap
        while t in producer and producer[t].op_type in _SAME_DATA:
            t = producer[t].input[0]
            same[t] = tap
    found: dict[str, set] = {tap: set() for tap in taps}
    shape_of: set = set()
    seen: set = set()
    todo = deque([output])
    while todo:
        t = todo.popleft()
        if not t or t in seen:
            continue
        seen.add(t)
        if t in same and t != output:
            found[same[t]].add(t)
            continue
        if t in initializers:
            continue
        if t in graph_inputs:
            shape_of.add(t)
            continue
        node = producer.get(t)
        if node is None:
            raise NoValueStage(f"{t!r} has no producer")
        if node.op_type == "Shape":
            shape_of.add(node.input[0])
            continue
        todo.extend(node.input)
        for attribute in node.attribute:  # a Loop's body reads outer tensors
            if attribute.type == onnx.AttributeProto.GRAPH:
                inner = {o for m in attribute.g.node for o in m.output}
                inner |= {i.name for i in attribute.g.input} | {i.name for i in attribute.g.initializer}
                todo.extend(x for m in attribute.g.node for x in m.input if x not in inner)
    for tap, tensors in found.items():
        if len(tensors) != 1:
            raise NoValueStage(
                f"the weighted sum does not read the {tap!r} tap as one tensor (found {sorted(tensors)})"
            )
    inside = sorted(shape_of - graph_inputs)
    if inside:
        raise NoValueStage(f"the output takes its shape from {inside[0]!r}, inside the selection")
    (idx,), (w,) = found[taps[0]], found[taps[1]]
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:
        raise NoValueStage(f"shape inference failed: {exc}") from exc
    idx_type, idx_dims = _elem_type(inferred, idx)
    w_type, w_dims = _elem_type(inferred, w)
    if idx_type not in _NUMPY:
        raise NoValueStage(f"{idx!r} is of ONNX type {idx_type}, not an integer index")
    inputs = sorted(shape_of)
    try:
        stage = onnx.utils.Extractor(model).extract_model([*inputs, idx, w], [output])
    except (ValueError, KeyError) as exc:  # a cut tensor whose type shape inference did not find
        raise NoValueStage(f"ONNX's extractor cannot cut it: {exc}") from exc
    rank = 0
    if inputs:
        rank = len(next(i for i in graph.input if i.name == inputs[0]).type.tensor_type.shape.dim)
    return ValueStage(
        model=stage,
        input=inputs[0] if inputs else None,
        input_rank=max(rank, 2),
        indices=idx,
        weights=w,
        output=output,
        indices_shape=_trailing(idx_dims, idx),
        weights_shape=_trailing(w_dims, w),
        indices_dtype=_NUMPY[idx_type],
        weights_dtype=onnx.helper.tensor_dtype_to_np_dtype(w_type).type,
    )
