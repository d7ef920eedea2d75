"""The one registry of execution paths, for the conformance run and the benchmark alike:
one line per path, one file per family.

Names say runtime, mode, device and, for ONNX paths, which export they run. A path marked
``benchmark_only`` (the Keras port's slower weighted-sum methods and its exportable
``[einsum]`` variants, ``torch-compile-*[fast]``, the seed's approach) is timed by
``bench`` but not part of the conformance run. Adding a path is a class in a
family file (or a new family file) and a line here.
"""

from __future__ import annotations

from conformance.export import EXPORTER_NAMES
from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable
from conformance.paths.dist_paths import DistPath, parse_name
from conformance.paths.file_paths import file_paths, parse_file_path
from conformance.paths.onnx_reference import ReferencePath
from conformance.paths.ort_paths import OrtPath
from conformance.paths.precision_variants import precision_variants
from conformance.paths.seed_baseline import SeedBaselinePath
from conformance.paths.tf_paths import TFPath
from conformance.paths.torch_paths import TorchPath
from conformance.tolerances import path_matches
from pkm_models.errors import PKMError


def benchmark_only(path: ExecutionPath) -> ExecutionPath:
    path.benchmark_only = True
    return path


REGISTRY: list[ExecutionPath] = [
    TorchPath("cpu", compiled=False),
    TorchPath("cpu", compiled=True),
    TorchPath("cuda", compiled=False),
    TorchPath("cuda", compiled=True),
    # the loop-free model behind the torch-fast export, run natively, and its fused-sum twin
    # (torch.compile of the gather form is timed by bench only: it is the slower form)
    *(TorchPath(device, False, model=model) for model in ("fast", "fast-bag") for device in ("cpu", "cuda")),
    *(TorchPath(device, True, model="fast-bag") for device in ("cpu", "cuda")),
    *(benchmark_only(TorchPath(device, True, model="fast")) for device in ("cpu", "cuda")),
    # the value table sharded over 2 processes (any N by its name: get_path, select_paths)
    DistPath("cpu", 2),
    DistPath("cuda", 2),
    TFPath("eager", "cpu"),
    TFPath("function", "cpu"),
    TFPath("xla", "cpu"),
    TFPath("eager", "gpu"),
    TFPath("function", "gpu"),
    TFPath("xla", "gpu"),
    # the Keras port's fastest weighted sum (docs/equivalence.md), checked like the rest;
    # einsum, its exportable one (the default until "auto"), is checked through the TF exports
    # and by the tests, and timed by bench
    *(TFPath(mode, device, method="fused") for device in ("cpu", "gpu") for mode in ("function", "xla")),
    *(
        benchmark_only(TFPath(mode, device, method="einsum"))
        for device in ("cpu", "gpu")
        for mode in ("function", "xla")
    ),
    *(OrtPath("cpu", e) for e in EXPORTER_NAMES),
    *(OrtPath("cuda", e) for e in EXPORTER_NAMES),
    OrtPath("tensorrt", "torch-fast"),
    *(ReferencePath(e) for e in EXPORTER_NAMES),
    # timed by bench only: the Keras port's other weighted-sum methods and the seed's approach
    benchmark_only(TFPath("function", "cpu", method="reduce_sum")),
    benchmark_only(TFPath("function", "cpu", method="accumulate")),
    benchmark_only(TFPath("xla", "cpu", method="accumulate")),
    *(benchmark_only(SeedBaselinePath(mode)) for mode in ("eager", "function", "xla")),
]
# reduced-precision variants (docs/precision.md): a few per family, to keep the run short
REGISTRY += precision_variants(
    REGISTRY,
    {
        "torch-eager-cpu": ("fp16", "bf16", "int8"),
        "torch-compile-cpu": ("fp16",),
        "torch-eager-cuda": ("fp16", "bf16", "int8"),
        "tf-function-cpu": ("fp16", "bf16"),
        "ort-cpu[torch-fast]": ("fp16", "bf16", "int8"),
        "ort-cuda[torch-fast]": ("fp16", "int8"),
        "onnx-reference[torch-fast]": ("fp16", "int8"),
    },
)
PATHS: list[ExecutionPath] = [p for p in REGISTRY if not p.benchmark_only]  # the conformance run's
PATH_NAMES = [p.name for p in PATHS]
REGISTRY_NAMES = [p.name for p in REGISTRY]

__all__ = [
    "PATHS",
    "PATH_NAMES",
    "REGISTRY",
    "CaseContext",
    "ExecutionPath",
    "PathUnavailable",
    "deployed_paths",
    "get_path",
    "select_paths",
]


class PathSelectionError(PKMError):
    pass


def get_path(name: str) -> ExecutionPath:
    """The path of this name: a registered one, or a sharded path over any N
    (``torch-dist-cpu[4]``: only N = 2 is registered)."""
    for path in REGISTRY:
        if path.name == name:
            return path
    sharded = parse_name(name)
    if sharded is not None:
        return DistPath(*sharded)
    on_file = parse_file_path(name)
    if on_file is not None:
        return on_file
    raise PathSelectionError(f"no execution path {name!r}; available: {REGISTRY_NAMES}")


def deployed_paths(cases) -> list[ExecutionPath]:
    """The paths of every user ONNX file the cases name (``[deploy]``, ``--model``), once each."""
    out: dict[str, ExecutionPath] = {}
    for case in cases:
        for model_file in case.deploy:
            for path in file_paths(model_file):
                out.setdefault(path.name, path)
    return list(out.values())


def select_paths(globs: list[str] | None, bench: bool = False, extra: list[ExecutionPath] = ()) -> list[ExecutionPath]:
    """Paths whose names match any glob, in registry order. Without globs: every
    conformance path, or for ``bench`` every path that is not ONNX's (slow) reference
    evaluator. The conformance run selects among conformance paths; bench among all.

    ``[`` and ``]`` are literal. Each glob must match something: a typo is an error listing the known names."""
    pool = (REGISTRY if bench else PATHS) + list(extra)  # extra: the paths of the user's files
    if not globs:
        return [p for p in pool if not (bench and p.family == "onnx-reference")]
    # a sharded path over an N that is not registered, named in full (torch-dist-cpu[4])
    extra = [DistPath(*parse_name(g)) for g in dict.fromkeys(globs) if parse_name(g) and g not in REGISTRY_NAMES]
    pool = pool + extra
    names = [p.name for p in pool]
    for glob in globs:
        if not any(path_matches(name, glob) for name in names):
            raise PathSelectionError(f"--path {glob!r} matches no execution path; known: {names}")
    return [p for p in pool if any(path_matches(p.name, g) for g in globs)]
