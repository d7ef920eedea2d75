"""The one interface every execution path implements, and the per-case context it runs in."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np

from conformance.cases import Case
from pkm_models.errors import PKMError


class PathUnavailable(PKMError):
    """Raised by a path that cannot run here; the message is the real reason."""


class CaseContext:
    """What the paths of one case share, built on first use and dropped with the case:
    the weights, the native models, and the tapped ONNX exports (from ``cache``, an
    :class:`~conformance.export.cache.ExportCache`, when given; else in ``export_dir`` when
    given, where an existing export is reused; else in a temporary folder).

    ``weights`` may be None: then they are the case's own (``case.spec.weights()``), read
    on first use (paths on an existing export never need them). ``weights_dir``: the
    folder of ``.npy`` files that holds ``weights`` (``conformance.spec.write_weights_dir``),
    which worker processes memory-map instead of making or loading their own copy."""

    def __init__(
        self,
        case: Case,
        weights: dict[str, np.ndarray] | None = None,
        export_dir: Path | None = None,
        weights_dir: Path | None = None,
        cache=None,
    ):
        self.case = case
        self.weights_dir = weights_dir
        self.cache = cache
        self._weights = weights
        self._exports: dict[str, Path | Exception] = {}
        self._keras: dict[str, object] = {}
        self._dir = export_dir
        self._own_dir = export_dir is None
        self._closers: list[Callable[[], None]] = []
        # a network's layers as cases of their own, by index, and the folder of their files
        # (``conformance.runner.golden_layer_case``)
        self.golden_layers: dict[int, tuple] = {}  # (Case, Golden)
        self.golden_layers_dir: Path | None = None
        # prepared paths kept for the batches of a stream (path name -> its run function)
        self.prepared: dict[str, Runner] = {}
        self.stream_reference: dict[tuple[int, int], dict] = {}  # (first, count) -> the reference's taps

    @property
    def export_dir(self) -> Path | None:
        return self._dir

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        return self.case.spec.weights() if self._weights is None else self._weights

    @cached_property
    def torch_model(self):
        return self.case.spec.torch_model(self.weights)

    def keras_model_with(self, method: str = "einsum"):
        """The Keras port with this weighted-sum method (one model per method)."""
        if method not in self._keras:
            self._keras[method] = self.case.spec.keras_model(self.weights, method)
        return self._keras[method]

    @property
    def export_spec(self):
        """The case's model as exporters read it: from the mapped weights folder when there
        is one (not generated or read again in this process)."""
        if self.weights_dir is None:
            return self.case.spec
        return dataclasses.replace(self.case.spec, weights_file=Path(self.weights_dir), checkpoint=None)

    def export(self, exporter: str) -> Path:
        """The tapped export of this case by ``exporter`` (made once per case)."""
        from conformance.export import export

        if exporter not in self._exports:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix=f"pkm-{self.case.name}-"))
            existing = self._dir / f"{exporter}.onnx"
            try:
                if self.cache is not None:  # built once, for this run and the next
                    self._exports[exporter] = self.cache.export(self.case.spec, exporter)
                elif not self._own_dir and existing.is_file():
                    self._exports[exporter] = existing
                else:  # written beside and moved in: a killed export never leaves a file to reuse
                    self._exports[exporter] = export(self.export_spec, exporter, self._dir, tapped=True).path
            except Exception as exc:  # remembered: every path on this export reports it
                self._exports[exporter] = exc
        result = self._exports[exporter]
        if isinstance(result, Exception):
            raise result
        return result

    def shared_folder(self, kind: str) -> Path:
        """A folder for what the paths of this case derive once and share, in every worker
        (``sweep``: the reference's bag sums, ``conformance.sweep.BagSums``; ``stream``:
        the reference's taps of each batch of the case's stream). It goes with the case."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"pkm-{self.case.name}-"))
        return self._dir / kind

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when this context closes (once, however often it is given):
        what a path holds for this case outside this process (a sharded path's model)."""
        if callback not in self._closers:
            self._closers.append(callback)

    def close(self) -> None:
        for callback in self._closers:
            with contextlib.suppress(Exception):
                callback()
        self._closers.clear()
        if self._dir is not None and self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self.__dict__.pop("torch_model", None)
        self.__dict__.pop("weights", None)
        self.__dict__.pop("_precision_models", None)  # the reduced-precision models of the case
        self._keras.clear()
        self.prepared.clear()
        self.stream_reference.clear()
        self.golden_layers.clear()  # their files went with a closer
        self.golden_layers_dir = None


def audit_path(path, context):
    """The static weight audit (:mod:`conformance.export.audit`) of the ONNX file ``path``
    runs, or None for a path that runs no file."""
    file = path.onnx_file(context)
    if file is None:
        return None
    from conformance.export.audit import audit_file

    return audit_file(file, context.weights, context.case.config.share_values)


Runner = Callable[[np.ndarray], dict[str, np.ndarray]]
TimedPass = Callable[[], object]


class ExecutionPath:
    """One way of running the model. Subclasses set ``name`` and implement ``check``
    (raise PathUnavailable with the reason when the path cannot run here) and
    ``prepare``: everything that is not inference (exporting, loading a session,
    compiling, moving weights to a device), returning a function from an input to the
    five taps as numpy arrays.

    The benchmark times :meth:`prepare_timed` instead: one forward pass on an input that
    already sits where the path computes, leaving the outputs there, and returning once
    the device has finished. Paths on a device override it so that host copies are not
    what is timed."""

    name: str = ""
    family: str = ""
    device: str = "cpu"  # where it computes: "cpu" or "cuda"
    benchmark_only: bool = False  # a variant timed by bench but not part of the conformance run
    # judged on the taps it returns (a user's ONNX file exposes what it exposes), not all of them
    partial_taps: bool = False
    judged_in_bench: bool = False  # bench also judges its taps against the reference's (a failure is its result)

    def check(self, case: Case | None) -> None:
        """Raise PathUnavailable if this path cannot run ``case`` (any case if None) here."""

    def prepare(self, context: CaseContext) -> Runner:
        raise NotImplementedError

    def tolerances_per_layer(self, case: Case) -> bool:
        """True when this path's tolerances hold for one layer on the reference's input but
        not for an error that grows from layer to layer (reduced precision): on a network
        (``case.spec.layers > 1``) only layer 0 is then judged end to end, and every later
        layer alone on its golden input (``conformance.runner.judge_on_golden_inputs``)."""
        return False

    def onnx_file(self, context: CaseContext) -> Path | None:
        """The ONNX file this path runs (None: it runs none), for the weight audit."""
        exporter = getattr(self, "exporter", None)
        return context.export(exporter) if exporter else None

    def stream_problem(self, case: Case) -> str | None:
        """Why this path does not run the case's token stream (None: it does)."""
        return None

    def table_reads(self, context: CaseContext) -> list:
        """Every value table of the case with this path's own lookup of it
        (:class:`conformance.sweep.TableRead`), for the table sweep. Raise
        :class:`conformance.sweep.NotSwept` with the reason where the lookup cannot be read
        on its own. Called after :meth:`prepare`, in the same process."""
        from conformance.sweep import NotSwept

        raise NotSwept(f"{self.name} has no separable lookup")

    def prepare_timed(self, context: CaseContext, x: np.ndarray) -> TimedPass:
        """A function of no arguments that runs one forward pass on ``x`` and returns the
        path's own outputs (host or device objects). Default: :meth:`prepare` on ``x``."""
        run = self.prepare(context)
        return lambda: run(x)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
