"""ONNX Runtime on each export: CPU, CUDA and TensorRT execution providers.

ONNX Runtime silently falls back to the CPU when a GPU provider fails to load, so a GPU
path checks both that the provider's library loads and that the session really runs on it
(``session.get_providers()``). When the library cannot load, the reason says which of three
things is missing: the NVIDIA driver (``libcuda.so.1``: no GPU here), the CUDA user-space
libraries (``pip install -e '.[cuda]'`` brings them), or TensorRT.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from conformance.isolation import muted
from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable

PROVIDERS = {
    "cpu": ("CPUExecutionProvider", None),
    "cuda": ("CUDAExecutionProvider", "libonnxruntime_providers_cuda.so"),
    "tensorrt": ("TensorrtExecutionProvider", "libonnxruntime_providers_tensorrt.so"),
}


DRIVER = "libcuda.so.1"
# What each GPU provider library links besides the C/C++ runtime (``readelf -d``: NEEDED), in
# load order (cuBLAS needs cuBLASLt first). onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9.
CUDA_LIBRARIES = {
    "cuda": ("libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10", "libcudart.so.13"),
    "tensorrt": ("libcublasLt.so.13", "libcublas.so.13", "libcudart.so.13", "libcudnn.so.9"),
}
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvonnxparser.so.10")
# Where pip puts them, under any folder on sys.path: nvidia/cu13/lib (CUDA 13 wheels),
# nvidia/cudnn/lib (cuDNN), tensorrt_libs (TensorRT wheels).
WHEEL_LIBRARY_DIRS = (("nvidia", "cu13", "lib"), ("nvidia", "cudnn", "lib"), ("tensorrt_libs",))
INSTALL_CUDA = "pip install -e '.[cuda]'"


def load_library(name: str) -> None:
    """dlopen ``name`` (a file name for the loader's search, or a path); OSError if it cannot load."""
    ctypes.CDLL(name)


@functools.cache
def preload_gpu_libraries() -> None:
    """Make the CUDA, cuDNN and TensorRT libraries installed from the package index loadable
    before a GPU session is made: the loader does not search Python's folders by itself.

    ``onnxruntime.preload_dlls()`` loads CUDA 13 and cuDNN 9 from ``nvidia/`` in the
    site-packages folder that holds onnxruntime, then by the loader's default search; its
    messages about what is missing are dropped here (the reasons of ``provider_problem``
    say it). The same libraries are then looked for under every folder on sys.path (a user
    site, ``pip install --target``), each loaded by full path so that the provider library
    finds it already loaded."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        with muted(), contextlib.suppress(Exception):
            ort.preload_dlls()
    names = dict.fromkeys([*CUDA_LIBRARIES["cuda"], *CUDA_LIBRARIES["tensorrt"], *TENSORRT_LIBRARIES])
    for name in names:
        for root in sys.path:
            found = [Path(root or ".", *d, name) for d in WHEEL_LIBRARY_DIRS]
            candidate = next((f for f in found if f.is_file()), None)
            if candidate is not None:
                with contextlib.suppress(OSError):
                    load_library(str(candidate))
                    break


def _loads(name: str, load: Callable[[str], None]) -> bool:
    try:
        load(name)
    except OSError:
        return False
    return True


def gpu_library_problem(kind: str, load: Callable[[str], None] = load_library) -> str | None:
    """What is missing for the ``kind`` GPU provider, in words that say what to do, or None.

    ``load`` dlopens one library by name (a stand-in in tests)."""
    missing = [name for name in CUDA_LIBRARIES[kind] if not _loads(name, load)]
    problems = []
    if not _loads(DRIVER, load):
        problems.append(f"no NVIDIA driver ({DRIVER} not found): no GPU here")
    if missing:
        problems.append(f"CUDA libraries missing: {', '.join(missing)} (install them: {INSTALL_CUDA})")
    if kind == "tensorrt":
        trt = [name for name in TENSORRT_LIBRARIES if not _loads(name, load)]
        if trt:
            problems.append(f"TensorRT 10 missing: {', '.join(trt)} (install TensorRT 10 for CUDA 13)")
    return "; ".join(problems) or None


def provider_problem(kind: str, load: Callable[[str], None] = load_library) -> str | None:
    """Why ONNX Runtime's ``kind`` provider cannot run here, or None."""
    import onnxruntime as ort

    provider, library = PROVIDERS[kind]
    if provider not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} ({ort.get_device()} build) has no {provider}"
    if library is not None:
        preload_gpu_libraries()
        problem = gpu_library_problem(kind, load)
        if problem:
            return f"{provider}: {problem}"
        try:
            load(os.path.join(os.path.dirname(ort.__file__), "capi", library))
        except OSError as exc:
            return f"{provider} cannot load: {exc}"
    return None


def session_options():
    """The options every session here uses: all graph optimisations, errors-only logging,
    and no pre-packing. Sessions are made from a file's path, so ONNX Runtime memory-maps
    the external data and uses the weights in place on the CPU; pre-packing would make a
    second, repacked copy of the constant weights (measured: docs/performance.md)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


class OrtPath(ExecutionPath):
    family = "ort"

    def __init__(self, kind: str, exporter: str):
        self.kind, self.exporter = kind, exporter  # kind: the execution provider
        self.device = "cpu" if kind == "cpu" else "cuda"
        self.name = f"ort-{kind}[{exporter}]"

    def check(self, case) -> None:
        problem = provider_problem(self.kind)
        if problem:
            raise PathUnavailable(problem)

    def session(self, path, data_dir: Path | None = None):
        """A session on the model at ``path``, or on a model's bytes whose external data
        lies in ``data_dir`` (mapped from there, as a model loaded by path)."""
        import onnxruntime as ort

        provider = PROVIDERS[self.kind][0]
        if self.kind != "cpu":
            preload_gpu_libraries()
        options = session_options()
        if data_dir is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
        fallback = [] if provider == "CPUExecutionProvider" else ["CPUExecutionProvider"]
        model = path if isinstance(path, bytes) else str(path)
        session = ort.InferenceSession(model, options, providers=[provider, *fallback])
        if session.get_providers()[0] != provider:
            raise PathUnavailable(
                f"the session fell back to {session.get_providers()} instead of running on {provider}"
            )
        return session

    def prepare(self, context: CaseContext):
        session = self.session(context.export(self.exporter))
        names = context.case.spec.output_names(tapped=True)
        return lambda x: dict(zip(names, session.run(names, {"input": x}), strict=True))

    def table_reads(self, context: CaseContext) -> list:
        """The value stage of each layer, cut out of the export the path runs
        (:mod:`conformance.export.value_stage`) and run in a session of this path's
        provider, mapping the export's own data file."""
        export = context.export(self.exporter)
        config = context.case.config

        def make_read(stage):
            session = self.session(stage.model.SerializeToString(), export.parent)
            return lambda idx, w: stage_output(session.run, stage, idx, w, config.heads * config.knn, config.input_dim)

        return onnx_table_reads(context, export, make_read)

    def prepare_timed(self, context: CaseContext, x):
        """I/O binding: the input is copied to the provider's device once and the outputs
        are bound there, so a timed pass is the session's run alone (no host copies),
        until the outputs are synchronised."""
        import onnxruntime as ort

        session = self.session(context.export(self.exporter))
        device = self.device
        binding = session.io_binding()
        binding.bind_ortvalue_input("input", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
        for name in context.case.spec.output_names(tapped=True):
            binding.bind_output(name, device)

        def timed():
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()  # the device has finished writing them
            return binding.get_outputs()

        return timed


def stage_output(run, stage, indices, weights, n: int, input_dim: int):
    """The (bags, v_dim) output of a cut value stage run by ``run(outputs, feeds)``, for
    (bags * heads, knn) ``indices`` and ``weights`` (``n`` = heads * knn slots a bag)."""
    import numpy as np

    bags = weights.size // n
    (out,) = run([stage.output], stage.feeds(indices, weights, bags, input_dim))
    return np.asarray(out, np.float32).reshape(bags, -1)


def onnx_table_reads(context: CaseContext, export: Path, make_read) -> list:
    """:class:`conformance.sweep.TableRead` of every value table of ``export`` (a tapped
    export of the context's case): ``make_read(stage)`` runs a cut value stage."""
    from conformance.export.value_stage import NoValueStage, cut_value_stage
    from conformance.sweep import NotSwept, TableRead, stored_precision, value_tables

    config = context.case.config
    reads = []
    for _, name, reference in value_tables(context.case, context.weights):
        try:
            stage = cut_value_stage(export, name.removesuffix("values"))  # the layer's tap prefix
        except NoValueStage as exc:
            raise NotSwept(f"{export.name}: {exc}") from exc
        read = make_read(stage)
        reads.append(TableRead(name, reference, read, config.heads, config.knn, stored_precision(config)))
    return reads
