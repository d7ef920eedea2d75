"""Reduced-precision variants of the execution paths: ``<path>@fp16|bf16|int8``.

:class:`PrecisionPath` wraps a float32 path and runs it unchanged on a view of the case
context whose models are the reduced-precision ones:

* torch paths: the reference cast to the type (:class:`pkm_models.torch_reduced.CastModel`),
  or with its value table in int8 (PyTorch's fused 8-bit row-wise ``EmbeddingBag``);
* tf paths: the Keras port built with the dtype policy ``float16`` / ``bfloat16`` (its
  variables and every op in the type);
* ONNX paths (ONNX Runtime, the reference evaluator): the export ``<exporter>@<precision>``
  (:mod:`conformance.export.at_precision`).

A runtime without a kernel for the type is ``unavailable`` with the runtime's own error.
"""

from __future__ import annotations

import numpy as np

from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable
from conformance.precision import REDUCED, PrecisionError, check_model_bytes, join_name

# what the runtimes say when they have no kernel for a type (their own exception names)
_NO_KERNEL = ("NotImplemented", "NotImplementedError", "InvalidArgument", "InvalidArgumentError", "UnimplementedError")


class _PrecisionContext:
    """A view of a :class:`CaseContext` whose models and exports are at ``precision``
    (built once per case and precision, kept on the underlying context)."""

    def __init__(self, context: CaseContext, precision: str):
        self._context, self._precision = context, precision
        self._cache = context.__dict__.setdefault("_precision_models", {})

    def __getattr__(self, name):
        return getattr(self._context, name)

    @property
    def torch_model(self):
        key = ("torch", self._precision)
        if key not in self._cache:
            from pkm_models.torch_reduced import DTYPES, CastModel, int8_module

            # a second reference on the same mapped weights (not a deep copy of the first: a
            # second float32 table, 1x the weights more), which the cast or packing replaces
            reference = self._context.case.spec.torch_model(self._context.weights)
            if self._precision == "int8":
                self._cache[key] = int8_module(reference, fused=True)
            else:
                self._cache[key] = CastModel(reference, DTYPES[self._precision]).eval()
        return self._cache[key]

    def keras_model_with(self, method: str = "einsum"):
        key = ("keras", self._precision, method)
        if key not in self._cache:
            from pkm_models.keras_pkm import build_keras_model

            dtype = {"fp16": "float16", "bf16": "bfloat16"}[self._precision]
            case = self._context.case
            # the tables built as zeros and filled in blocks, converted on the way (drawn at
            # random first, then replaced, the model took 3x the weights on mega)
            model = build_keras_model(
                case.config, case.spec.layers, seed=None, method=method, dtype=dtype, weights=self._context.weights
            )
            self._cache[key] = model
        return self._cache[key]

    def export(self, exporter: str):
        return self._context.export(join_name(exporter, self._precision))


class PrecisionPath(ExecutionPath):
    """``base`` at ``precision`` (fp16, bf16 or int8)."""

    def __init__(self, base: ExecutionPath, precision: str):
        if precision not in REDUCED:
            raise ValueError(f"expected one of {REDUCED}, got {precision!r}")
        self.base, self.precision = base, precision
        self.name = join_name(base.name, precision)
        self.family, self.device = base.family, base.device
        exporter = getattr(base, "exporter", None)
        if exporter is not None:  # the runner exports these up front when running paths in parallel
            self.exporter = join_name(exporter, precision)

    def check(self, case) -> None:
        self.base.check(case)
        if case is not None and case.config.variant:
            raise PathUnavailable(
                f"reduced-precision variants are made from XLM's layer; Meta's memory-layer options "
                f"{case.config.variant} are judged in float32 (a bfloat16 value table is part of the model itself)"
            )
        if self.precision == "int8" and self.family == "tf":
            raise PathUnavailable("the Keras port has no int8 value table (int8 is made for torch and ONNX)")
        if self.precision == "int8" and getattr(self.base, "compiled", False):
            raise PathUnavailable(
                "torch.compile does not trace PyTorch's quantized EmbeddingBag op; run torch-eager-cpu@int8"
            )

    def tolerances_per_layer(self, case) -> bool:
        """A network at reduced precision is judged layer by layer, each layer alone on its
        golden input: the derived bounds are those of one layer on the reference's input,
        while end to end each layer's rounded output feeds the next (docs/precision.md)."""
        return case.spec.layers > 1

    def _view(self, context: CaseContext) -> _PrecisionContext:
        return _PrecisionContext(context, self.precision)

    def _no_kernel(self, exc: Exception) -> PathUnavailable | None:
        if type(exc).__name__ in _NO_KERNEL or "not implemented" in str(exc).lower():
            return PathUnavailable(f"no {self.precision} kernel: {type(exc).__name__}: {str(exc).strip()[:400]}")
        return None

    def prepare(self, context: CaseContext):
        try:
            run = self.base.prepare(self._view(context))
            self.check_model_bytes(context)
        except PathUnavailable:
            raise
        except Exception as exc:
            raise self._no_kernel(exc) or exc from exc

        def guarded(x):
            try:
                taps = run(x)
            except Exception as exc:
                raise self._no_kernel(exc) or exc from exc
            # the comparison's interface: float taps as float32 (exact: a widening), indices int64
            return {k: v if v.dtype == np.int64 else np.asarray(v).astype(np.float32) for k, v in taps.items()}

        return guarded

    def prepare_timed(self, context: CaseContext, x):
        return self.base.prepare_timed(self._view(context), x)

    def stream_problem(self, case) -> str | None:
        return self.base.stream_problem(case)

    def table_reads(self, context: CaseContext) -> list:
        """The base path's lookups of the reduced-precision model, judged at this precision."""
        import dataclasses

        reads = self.base.table_reads(self._view(context))
        return [dataclasses.replace(r, precision=self.precision, reduced=True) for r in reads]

    def check_model_bytes(self, context: CaseContext) -> None:
        """Refuse a model that does not have this precision's size (a float32 model
        labelled int8): PrecisionError, the path's ``error``."""
        size = self.model_bytes(context)
        if size is None:
            return
        spec = context.case.spec
        value_bytes = spec.layers * spec.config.size * spec.config.v_dim * 4
        why = check_model_bytes(self.precision, size, spec.weight_bytes, value_bytes, spec.layers * spec.config.size)
        if why:
            raise PrecisionError(f"{self.name}: {why}")

    def model_bytes(self, context: CaseContext) -> int | None:
        """Bytes of the model this path runs (its export's files for ONNX paths)."""
        exporter = getattr(self, "exporter", None)
        if exporter is not None:
            return export_bytes(context, exporter)
        if self.family == "torch":
            from pkm_models.torch_reduced import model_bytes

            return model_bytes(self._view(context).torch_model)
        if self.family == "tf":
            model = self._view(context).keras_model_with(getattr(self.base, "method", "einsum"))
            return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
        return None


def export_bytes(context: CaseContext, exporter: str) -> int:
    """Bytes of the floating-point weights of the case's export by ``exporter`` (not its
    graph, which grows with the layers and taps: a 3-layer tapped graph is 150 KB)."""
    from conformance.export.onnx_files import float_weight_bytes

    return float_weight_bytes(context.export(exporter))


def precision_variants(paths: list[ExecutionPath], variants: dict[str, tuple[str, ...]]) -> list[ExecutionPath]:
    """``PrecisionPath(p, precision)`` for every path named in ``variants`` (name -> precisions)."""
    by_name = {p.name: p for p in paths}
    unknown = sorted(set(variants) - set(by_name))
    if unknown:
        raise ValueError(f"no float32 path(s) {unknown} to make precision variants of")
    return [
        PrecisionPath(by_name[name], precision) for name, precisions in variants.items() for precision in precisions
    ]


def precision_fields(path: ExecutionPath, context: CaseContext) -> dict:
    """``precision`` and ``model_bytes`` of a prepared path, for the benchmark: an ONNX path
    counts its export's files, a native one its weights as stored (float32 for fp32)."""
    from conformance.precision import precision_of

    if isinstance(path, PrecisionPath):
        size = path.model_bytes(context)
    elif getattr(path, "exporter", None):
        size = export_bytes(context, path.exporter)
    else:
        size = context.case.spec.weight_bytes
    return {"precision": precision_of(path.name), "model_bytes": size}
