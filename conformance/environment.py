"""What the machine a run happened on is: library versions, ONNX Runtime providers, CPU,
GPU. Recorded in every report so that results from different machines can be read (and
merged) side by side."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    versions = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__}
    versions.update({"onnx": onnx.__version__, "onnxruntime": ort.__version__})
    for module in ("tensorflow", "keras", "tf2onnx", "onnxscript"):
        mod = sys.modules.get(module)
        if mod is None:
            try:
                mod = __import__(module)
            except Exception:  # absent or broken: report it, do not fail the report
                versions[module] = None
                continue
        versions[module] = getattr(mod, "__version__", None)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = cpu_model()
    return {
        "machine": {"hostname": platform.node(), "cpu": cpu, "gpu": gpu},  # names the machine in a merge
        "versions": versions,
        "providers": ort.get_available_providers(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "platform": platform.platform(),
    }
