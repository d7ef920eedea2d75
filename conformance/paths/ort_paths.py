"""ONNX Runtime on each export: CPU, CUDA and TensorRT execution providers.

ONNX Runtime silently falls back to the CPU when a GPU provider fails to load, so a GPU
path checks both that the provider's library loads (the loader's error names the missing
dependency) and that the session really runs on it (``session.get_providers()``).
"""

from __future__ import annotations

import ctypes
import os

from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable
from pkm_models.config import TAPS

PROVIDERS = {
    "cpu": ("CPUExecutionProvider", None),
    "cuda": ("CUDAExecutionProvider", "libonnxruntime_providers_cuda.so"),
    "tensorrt": ("TensorrtExecutionProvider", "libonnxruntime_providers_tensorrt.so"),
}


def provider_problem(kind: str) -> str | None:
    """Why ONNX Runtime's ``kind`` provider cannot run here, or None."""
    import onnxruntime as ort

    provider, library = PROVIDERS[kind]
    if provider not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} ({ort.get_device()} build) has no {provider}"
    if library is not None:
        path = os.path.join(os.path.dirname(ort.__file__), "capi", library)
        try:
            ctypes.CDLL(path)
        except OSError as exc:
            return f"{provider} cannot load: {exc}"
    return None


def session_options():
    """The options every session here uses: all graph optimisations, errors-only logging."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
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

    def session(self, path):
        import onnxruntime as ort

        provider = PROVIDERS[self.kind][0]
        options = session_options()
        fallback = [] if provider == "CPUExecutionProvider" else ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(path), options, providers=[provider, *fallback])
        if session.get_providers()[0] != provider:
            raise PathUnavailable(
                f"the session fell back to {session.get_providers()} instead of running on {provider}"
            )
        return session

    def prepare(self, context: CaseContext):
        session = self.session(context.export(self.exporter))
        return lambda x: dict(zip(TAPS, session.run(list(TAPS), {"input": x}), strict=True))

    def prepare_timed(self, context: CaseContext, x):
        """I/O binding: the input is copied to the provider's device once and the outputs
        are bound there, so a timed pass is the session's run alone (no host copies),
        until the outputs are synchronised."""
        import onnxruntime as ort

        session = self.session(context.export(self.exporter))
        device = self.device
        binding = session.io_binding()
        binding.bind_ortvalue_input("input", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
        for name in TAPS:
            binding.bind_output(name, device)

        def timed():
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()  # the device has finished writing them
            return binding.get_outputs()

        return timed
