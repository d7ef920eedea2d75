"""The registry of execution paths: one line per path, one file per family.

Names say runtime, mode, device and, for ONNX paths, which export they run.
"""

from __future__ import annotations

from conformance.export import EXPORTER_NAMES
from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable
from conformance.paths.onnx_reference import ReferencePath
from conformance.paths.ort_paths import OrtPath
from conformance.paths.tf_paths import TFPath
from conformance.paths.torch_paths import TorchPath
from conformance.tolerances import path_matches
from pkm_models.errors import PKMError

PATHS: list[ExecutionPath] = [
    TorchPath("cpu", compiled=False),
    TorchPath("cpu", compiled=True),
    TorchPath("cuda", compiled=False),
    TorchPath("cuda", compiled=True),
    # the loop-free model behind the torch-fast export, run natively, and its fused-sum twin
    *(
        TorchPath(device, compiled, model=model)
        for model in ("fast", "fast-bag")
        for device in ("cpu", "cuda")
        for compiled in (False, True)
    ),
    TFPath("eager", "cpu"),
    TFPath("function", "cpu"),
    TFPath("xla", "cpu"),
    TFPath("eager", "gpu"),
    TFPath("function", "gpu"),
    TFPath("xla", "gpu"),
    # the Keras port's fastest weighted sum (docs/equivalence.md), and einsum, its
    # exportable one (the default until "auto"), checked like the rest
    *(TFPath(mode, device, method="fused") for device in ("cpu", "gpu") for mode in ("function", "xla")),
    *(TFPath(mode, device, method="einsum") for device in ("cpu", "gpu") for mode in ("function", "xla")),
    *(OrtPath("cpu", e) for e in EXPORTER_NAMES),
    *(OrtPath("cuda", e) for e in EXPORTER_NAMES),
    OrtPath("tensorrt", "torch-fast"),
    *(ReferencePath(e) for e in EXPORTER_NAMES),
]
PATH_NAMES = [p.name for p in PATHS]

__all__ = ["PATHS", "PATH_NAMES", "CaseContext", "ExecutionPath", "PathUnavailable", "select_paths"]


class PathSelectionError(PKMError):
    pass


def select_paths(globs: list[str] | None) -> list[ExecutionPath]:
    """Paths whose names match any glob (all paths when none given), in registry order.

    ``[`` and ``]`` are literal. Each glob must match something: a typo is an error listing the known names."""
    if not globs:
        return list(PATHS)
    for glob in globs:
        if not any(path_matches(name, glob) for name in PATH_NAMES):
            raise PathSelectionError(f"--path {glob!r} matches no execution path; known: {PATH_NAMES}")
    return [p for p in PATHS if any(path_matches(p.name, g) for g in globs)]
