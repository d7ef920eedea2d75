"""Shared test set-up: quiet third-party logs, deterministic threads, and GPU awareness.

Every test is correct with and without a GPU. A test that needs a CUDA device carries
``@pytest.mark.gpu`` and is skipped, with the reason, where there is none. A test that needs
paths that cannot run uses the ``gpu_paths_unavailable`` fixture, which makes every GPU path
(CUDA, TensorRT, TensorFlow GPU) an unavailable stub, instead of counting on the machine
having no GPU."""

import ctypes
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _cuda_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


HAS_CUDA_DRIVER = _cuda_driver()
NO_GPU_REASON = "no CUDA device: the NVIDIA driver (libcuda.so.1) is not loadable here"
STUB_REASON = "CUDAExecutionProvider: no NVIDIA driver (libcuda.so.1 not found): no GPU here (test stub)"


def has_cuda_device() -> bool:
    """A CUDA device PyTorch can use (checked lazily: importing torch is not free)."""
    if not HAS_CUDA_DRIVER:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not has_cuda_device():
        skip = pytest.mark.skip(reason=NO_GPU_REASON)
        for item in gpu_items:
            item.add_marker(skip)


def is_gpu_path(name: str) -> bool:
    return any(word in name for word in ("cuda", "gpu", "tensorrt"))


@pytest.fixture
def gpu_paths_unavailable(monkeypatch):
    """Every GPU path of the registry reports itself unavailable (checked in this process,
    which is where the runner asks), whatever the machine has."""
    from conformance.paths import REGISTRY, PathUnavailable

    def unavailable(case=None):
        raise PathUnavailable(STUB_REASON)

    stubbed = [path for path in REGISTRY if is_gpu_path(path.name)]
    for path in stubbed:
        monkeypatch.setattr(path, "check", unavailable)
    return stubbed
