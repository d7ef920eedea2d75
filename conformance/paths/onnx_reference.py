"""ONNX's reference evaluator (``onnx.reference``) on each export: slow and exact to the
spec, so only for small cases.

One op is replaced: onnx 1.23's ``GatherElements`` goes through ``numpy.choose``, which
takes at most 64 choices, and its fallback and its shape check reject indices that are
smaller than the data along other axes, both of which the spec allows (and the torch
exports produce: a top-k over ``knn**2`` candidates). :class:`GatherElements` below
is the spec's definition, ``numpy.take_along_axis``.
"""

from __future__ import annotations

import numpy as np

from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable

MAX_WEIGHT_BYTES = 8 << 20


def _gather_elements_op():
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        op_domain = ""

        def _run(self, data, indices, axis=None):
            axis = 0 if axis is None else axis
            indices = np.where(indices < 0, indices + data.shape[axis], indices)
            if indices.shape != data.shape:  # take_along_axis broadcasts: slice the data down
                data = data[
                    tuple(slice(0, n) if a != axis % data.ndim else slice(None) for a, n in enumerate(indices.shape))
                ]
            return (np.take_along_axis(data, indices, axis=axis),)

    return GatherElements


class ReferencePath(ExecutionPath):
    family = "onnx-reference"

    def __init__(self, exporter: str):
        self.exporter = exporter
        self.name = f"onnx-reference[{exporter}]"

    def check(self, case) -> None:
        if case is not None and case.spec.weight_bytes > MAX_WEIGHT_BYTES:
            raise PathUnavailable(
                f"the reference evaluator is for small cases (weights up to {MAX_WEIGHT_BYTES >> 20} MB); "
                f"this one has {case.spec.weight_bytes / 2**20:,.0f} MB"
            )

    def prepare(self, context: CaseContext):
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(context.export(self.exporter)), new_ops=[_gather_elements_op()])
        names = context.case.spec.output_names(tapped=True)
        return lambda x: dict(zip(names, evaluator.run(names, {"input": x}), strict=True))

    def stream_problem(self, case) -> str | None:
        return "the reference evaluator is for the golden batch (a stream's tokens would take it minutes)"

    def table_reads(self, context: CaseContext) -> list:
        """The value stage of each layer, cut out of the export and run by the evaluator
        (a small case's: its tables are read into the cut model)."""
        import onnx
        from onnx.reference import ReferenceEvaluator

        from conformance.paths.ort_paths import onnx_table_reads, stage_output

        export = context.export(self.exporter)
        config = context.case.config

        def make_read(stage):
            onnx.load_external_data_for_model(stage.model, str(export.parent))
            evaluator = ReferenceEvaluator(stage.model, new_ops=[_gather_elements_op()])
            return lambda idx, w: stage_output(
                evaluator.run, stage, idx, w, config.heads * config.knn, config.input_dim
            )

        return onnx_table_reads(context, export, make_read)
