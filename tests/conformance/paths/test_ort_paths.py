"""Why an ONNX Runtime GPU path cannot run: the driver, the CUDA libraries, TensorRT, or a
session that fell back to the CPU. The dynamic loader is replaced by a stand-in that fails
for the libraries a test says are missing."""

import pytest

from conformance.paths import ort_paths
from conformance.paths.base import PathUnavailable
from conformance.paths.ort_paths import CUDA_LIBRARIES, DRIVER, TENSORRT_LIBRARIES, OrtPath, provider_problem

PRELOAD = ort_paths.preload_gpu_libraries.__wrapped__  # the real one, uncached


def loader(*missing):
    """A stand-in for dlopen: fails for ``missing`` (names or path endings), records every call."""

    def load(name):
        load.calls.append(name)
        if any(name.endswith(m) for m in missing):
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    load.calls = []
    return load


@pytest.fixture(autouse=True)
def no_preload(monkeypatch):
    monkeypatch.setattr(ort_paths, "preload_gpu_libraries", lambda: None)


def test_only_the_driver_missing_says_no_gpu_here():
    reason = provider_problem("cuda", loader(DRIVER))
    assert reason == "CUDAExecutionProvider: no NVIDIA driver (libcuda.so.1 not found): no GPU here"


def test_missing_cuda_libraries_are_named_with_the_install_command():
    reason = provider_problem("cuda", loader("libcublasLt.so.13", "libcurand.so.10"))
    assert "no NVIDIA driver" not in reason
    assert "CUDA libraries missing: libcublasLt.so.13, libcurand.so.10" in reason
    assert "pip install -e '.[cuda]'" in reason


def test_driver_and_libraries_missing_says_both():
    reason = provider_problem("cuda", loader(DRIVER, *CUDA_LIBRARIES["cuda"]))
    assert reason.startswith("CUDAExecutionProvider: no NVIDIA driver")
    assert "CUDA libraries missing: libcublasLt.so.13, libcublas.so.13, libcurand.so.10, libcudart.so.13" in reason


def test_tensorrt_names_tensorrt_apart_from_cuda():
    reason = provider_problem("tensorrt", loader(*TENSORRT_LIBRARIES))
    assert reason.startswith("TensorrtExecutionProvider: TensorRT 10 missing: libnvinfer.so.10")
    assert "driver" not in reason and "CUDA libraries" not in reason
    assert "libcudnn.so.9" in provider_problem("tensorrt", loader("libcudnn.so.9"))


def test_everything_present_but_the_provider_library_fails_keeps_the_loaders_words():
    load = loader("libonnxruntime_providers_cuda.so")
    reason = provider_problem("cuda", load)
    assert reason.startswith("CUDAExecutionProvider cannot load: ")
    assert "libonnxruntime_providers_cuda.so: cannot open shared object file" in reason
    assert load.calls[-1].endswith("capi/libonnxruntime_providers_cuda.so")


def test_everything_loads_is_no_problem_and_cpu_loads_nothing():
    assert provider_problem("cuda", loader()) is None
    load = loader(DRIVER)
    assert provider_problem("cpu", load) is None
    assert load.calls == []


def test_a_session_that_fell_back_to_the_cpu_is_unavailable(monkeypatch, tmp_path):
    import onnxruntime as ort

    class FallbackSession:
        def __init__(self, path, options, providers):
            assert providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", FallbackSession)
    with pytest.raises(PathUnavailable, match="fell back to \\['CPUExecutionProvider'\\] instead of running on CUDA"):
        OrtPath("cuda", "torch-fast").session(tmp_path / "model.onnx")


def test_preload_loads_wheel_libraries_from_any_folder_on_sys_path(monkeypatch, tmp_path, capsys):
    """pip --target and user sites are not where onnxruntime.preload_dlls looks: every sys.path
    folder's nvidia/cu13/lib is searched too, and a library found is loaded by full path."""
    import onnxruntime as ort

    lib = tmp_path / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    (lib / "libcublasLt.so.13").write_bytes(b"")
    load = loader()
    monkeypatch.setattr(ort_paths, "load_library", load)
    monkeypatch.setattr(ort, "preload_dlls", lambda: print("Failed to load libcublasLt.so.13"), raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    PRELOAD()
    assert str(lib / "libcublasLt.so.13") in load.calls
    assert not any(c.endswith("libcublas.so.13") for c in load.calls)  # not on disk: not tried
    assert capsys.readouterr().out == ""  # preload_dlls' own messages do not reach the user
