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


def framework_facts(family: str) -> dict:
    """What a family's framework says about this machine, asked in a process that has it
    loaded: its versions, and for torch the GPU, for ONNX Runtime its providers."""
    facts: dict = {"versions": {}}
    if family == "torch":
        import torch

        facts["versions"]["torch"] = torch.__version__
        facts["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        modules = ("onnxscript",)
    elif family == "tf":
        modules = ("tensorflow", "keras", "tf2onnx")
    elif family == "ort":
        import onnxruntime as ort

        facts["versions"]["onnxruntime"] = ort.__version__
        facts["providers"] = ort.get_available_providers()
        modules = ()
    else:
        modules = ()
    for module in modules:
        facts["versions"][module] = _version(module)
    return facts


def _version(module: str) -> str | None:
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = __import__(module)
        except Exception:  # absent or broken: report it, do not fail the report
            return None
    return getattr(mod, "__version__", None)


def _installed_version(module: str) -> str | None:
    """The version of an installed package that this process has not imported."""
    import importlib.metadata

    names = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tf-nightly")}.get(module, (module,))
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _driver_gpu() -> str | None:
    """The first NVIDIA GPU's model as the driver names it, or None."""
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        for line in info.read_text().splitlines():
            if line.startswith("Model:"):
                return line.split(":", 1)[1].strip()
    return None


def environment(facts: dict | None = None) -> dict:
    """The machine description of a report. ``facts``: what the workers of the run said
    (:func:`framework_facts`), so that this process need not load the frameworks; a
    family that did not run is asked here."""
    import onnx

    if facts is None:  # this process runs the paths: it has the frameworks loaded
        facts = {"versions": {}}
        for family in ("torch", "tf", "ort"):
            found = framework_facts(family)
            facts["versions"].update(found.pop("versions"))
            facts.update(found)
    facts = {"versions": {}, **facts}
    if "providers" not in facts:  # no ONNX Runtime path ran (a light import)
        found = framework_facts("ort")
        facts["versions"].update(found.pop("versions"))
        facts.update(found)
    if "gpu" not in facts:  # no torch path ran: the driver's name for it, without loading torch
        facts["gpu"] = _driver_gpu()
    for module in ("torch", "tensorflow", "keras", "tf2onnx", "onnxscript"):
        if facts["versions"].get(module) is None:
            facts["versions"][module] = _installed_version(module)
    versions = {"python": platform.python_version(), "numpy": np.__version__, "onnx": onnx.__version__}
    for module in ("torch", "onnxruntime", "tensorflow", "keras", "tf2onnx", "onnxscript"):
        versions[module] = facts["versions"].get(module)
    gpu = facts.get("gpu")
    cpu = cpu_model()
    return {
        "machine": {"hostname": platform.node(), "cpu": cpu, "gpu": gpu},  # names the machine in a merge
        "versions": versions,
        "providers": facts.get("providers"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "platform": platform.platform(),
    }
