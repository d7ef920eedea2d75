"""The one interface every execution path implements, and the per-case context it runs in."""

from __future__ import annotations

import os
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
    the weights, the native models, and the tapped ONNX exports (in ``export_dir`` when
    given, where an existing export is reused, else in a temporary folder)."""

    def __init__(
        self,
        case: Case,
        weights: dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]],
        export_dir: Path | None = None,
    ):
        self.case = case
        self._weights = weights
        self._exports: dict[str, Path | Exception] = {}
        self._keras: dict[str, object] = {}
        self._dir = export_dir
        self._own_dir = export_dir is None

    @property
    def export_dir(self) -> Path | None:
        return self._dir

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        """The case's weights; a callable given instead is called on first use (paths on
        an existing export never need them)."""
        return self._weights() if callable(self._weights) else self._weights

    @cached_property
    def torch_model(self):
        from pkm_models.torch_pkm import build_torch_model

        model = build_torch_model(self.case.config, self.case.spec.layers, seed=None)
        model.load_weights(self.weights)
        return model.eval()

    def keras_model_with(self, method: str = "einsum"):
        """The Keras port with this weighted-sum method (one model per method)."""
        from pkm_models.convert import set_keras_weights
        from pkm_models.keras_pkm import build_keras_model

        if method not in self._keras:
            model = build_keras_model(self.case.config, self.case.spec.layers, seed=None, method=method)
            set_keras_weights(model, self.weights)
            self._keras[method] = model
        return self._keras[method]

    def export(self, exporter: str) -> Path:
        """The tapped export of this case by ``exporter`` (made once per case)."""
        from conformance.export import export

        if exporter not in self._exports:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix=f"pkm-{self.case.name}-"))
            existing = self._dir / f"{exporter}.onnx"
            try:
                if not self._own_dir and existing.is_file():
                    self._exports[exporter] = existing
                else:
                    self._exports[exporter] = self._export_atomically(exporter, export)
            except Exception as exc:  # remembered: every path on this export reports it
                self._exports[exporter] = exc
        result = self._exports[exporter]
        if isinstance(result, Exception):
            raise result
        return result

    def _export_atomically(self, exporter: str, export) -> Path:
        """Export into a private folder, then move the files in (data first): a process
        killed while exporting never leaves a file that a later one would reuse."""
        staging = Path(tempfile.mkdtemp(prefix=f".{exporter}-", dir=self._dir))
        try:
            made = export(self.case.spec, exporter, staging, tapped=True).path
            data = made.with_name(made.name + ".data")
            if data.exists():
                os.replace(data, self._dir / data.name)
            os.replace(made, self._dir / made.name)
            return self._dir / made.name
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def close(self) -> None:
        if self._dir is not None and self._own_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self.__dict__.pop("torch_model", None)
        self.__dict__.pop("weights", None)
        self._keras.clear()


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

    def check(self, case: Case | None) -> None:
        """Raise PathUnavailable if this path cannot run ``case`` (any case if None) here."""

    def prepare(self, context: CaseContext) -> Runner:
        raise NotImplementedError

    def prepare_timed(self, context: CaseContext, x: np.ndarray) -> TimedPass:
        """A function of no arguments that runs one forward pass on ``x`` and returns the
        path's own outputs (host or device objects). Default: :meth:`prepare` on ``x``."""
        run = self.prepare(context)
        return lambda: run(x)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
