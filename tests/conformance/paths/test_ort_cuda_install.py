"""The ``[cuda]`` extra's NVIDIA libraries, installed from the package index into a throw-away
folder, are all ONNX Runtime's CUDA provider needs besides the driver: ``paths`` then names
the driver as what is missing, not a CUDA library. Downloads about 2 GB."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def nvidia_requirements() -> list[str]:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cuda"]
    return [r for r in extra if r.startswith("nvidia-")]


@pytest.mark.slow
def test_cuda_extra_leaves_only_the_driver_missing(tmp_path):
    requirements = nvidia_requirements()
    assert "nvidia-cublas~=13.0" in requirements  # the one onnxruntime-gpu's own extras forget
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), *requirements], check=True
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    listing = subprocess.run(
        [sys.executable, "-m", "conformance", "paths"], env=env, capture_output=True, text=True, check=True
    ).stdout
    line = next(x for x in listing.splitlines() if x.startswith("ort-cuda[torch-fast]"))
    assert "CUDA libraries missing" not in line
    has_driver = subprocess.run([sys.executable, "-c", "import ctypes; ctypes.CDLL('libcuda.so.1')"]).returncode == 0
    if has_driver:
        assert line.split()[1] == "available", line
    else:
        assert "unavailable: CUDAExecutionProvider: no NVIDIA driver (libcuda.so.1 not found)" in line, line
