"""One benchmarked path, in its own process: ``python -m conformance.bench.worker REQUEST``.

Prints one JSON line: the path's timings and peak memory, or why it could not run.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from conformance.bench.device_memory import PeakSampler
from conformance.isolation import memory_mb, serve
from conformance.results import OK, UNAVAILABLE


def measure(request: dict) -> dict:
    from conformance.bench import get_bench_preset, summarize, time_calls
    from conformance.export import ExportUnsupported
    from conformance.paths import CaseContext, PathUnavailable, get_path
    from conformance.paths.precision_variants import precision_fields
    from pkm_models.weights import make_input

    bench = get_bench_preset(request["preset"])
    path = get_path(request["path"])
    case = bench.case()
    device = path.device
    result = {"name": path.name, "device": device, "eager_reference": path.name == f"torch-eager-{device}"}
    sampler = PeakSampler() if device == "cuda" else None
    with sampler or contextlib.nullcontext():  # sampling while preparing and warming up
        try:
            path.check(case)
            context = CaseContext(case, case.spec.weights(), export_dir=Path(request["export_dir"]))
            fn = path.prepare_timed(context, make_input(bench.input_shape, seed=0))
        except (PathUnavailable, ExportUnsupported) as exc:
            return {**result, "status": UNAVAILABLE, "reason": str(exc)}
        result.update(precision_fields(path, context))  # precision and model_bytes
        for _ in range(request["warmup"]):
            fn()
    times = time_calls(fn, request["runs"])  # input already on the device; returns once it has finished
    if sampler:
        sampler.sample()  # once more, after the timed passes
    peak_device = sampler.peak_mb if sampler else None
    if sampler and peak_device is None and path.family == "torch":  # no nvidia-smi: the allocator's own peak
        import torch

        peak_device = torch.cuda.max_memory_allocated() / 2**20
    return {
        **result,
        "status": OK,
        "reason": "",
        **summarize(times),
        "times_s": times,
        "peak_host_mb": memory_mb("VmHWM"),
        "peak_device_mb": peak_device,
    }


if __name__ == "__main__":
    sys.exit(serve(measure))
