"""One benchmarked path, in its own process: ``python -m conformance.bench.worker REQUEST``.

Prints one JSON line: the path's timings and peak memory, or why it could not run. The
peak host memory is that of this process's whole tree (itself and anything it started, such
as compiler processes: :class:`conformance.memory.TreePeak`), sampled while the path is
prepared and warmed up and once after the timed passes, and at least its own high-water mark.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from conformance.bench.device_memory import PeakSampler
from conformance.isolation import memory_mb, serve
from conformance.memory import TreePeak
from conformance.results import FAIL, OK, UNAVAILABLE
from conformance.spec import read_weights_dir


def judge_against_reference(path, context, x, request: dict) -> str:
    """What is wrong with ``path``'s taps of ``x``, judged as the conformance run judges
    them against the golden that the reference (unsharded, float32, on CPU) gives for ``x``
    (``conformance.regenerate.reference_taps``), under the tolerances ``request`` names;
    "" when they conform."""
    from conformance.cases import case_names, default_cases_dir
    from conformance.compare import compare_case
    from conformance.paths import PATH_NAMES
    from conformance.regenerate import reference_taps
    from conformance.tolerances import load_policy

    case = context.case
    known_cases = {*case_names(default_cases_dir()), case.name}
    policy = load_policy(Path(request["tolerances"]), [*PATH_NAMES, path.name], known_cases)
    golden = reference_taps(case, context.weights, x)
    comparison = compare_case(
        case, path.prepare(context)(x), golden, weights=context.weights, policy=policy, path=path.name, layer_input=x
    )
    if comparison.ok:
        return ""
    failed = next(t for t in comparison.tensors if t.name == comparison.first_divergence)
    return f"its taps do not conform to the reference's: first at {failed.name}: {failed.message}"


def time_sweep(path, context) -> dict:
    """The table sweep of ``path`` (:func:`conformance.sweep.sweep_path`), timed, beside the
    time numpy takes to read the same tables once (a sum over the mapped rows, in blocks),
    measured just before it in the same process."""
    import time

    import numpy as np

    from conformance.sweep import sweep_path

    try:
        tables = path.table_reads(context)
    except Exception as exc:  # NotSwept, or a lookup that cannot be built here
        return {"reason": str(exc)}
    t0 = time.perf_counter()
    for table in tables:
        reference = table.reference
        for first in range(0, len(reference), 1 << 16):
            np.add.reduce(np.asarray(reference[first : first + (1 << 16)]), axis=0)
    numpy_s = time.perf_counter() - t0
    results, why = sweep_path(path, context)
    if not results:
        return {"reason": why}
    sweep_s = sum(r.seconds for r in results)
    return {
        "rows": sum(r.rows for r in results),
        "ok": all(results),
        "seconds": sweep_s,
        "numpy_read_s": numpy_s,
        "reference_s": sum(r.reference_seconds for r in results),
        "ratio_to_numpy_read": sweep_s / numpy_s if numpy_s else None,
        "table_bytes": sum(t.reference.nbytes for t in tables),
    }


def measure(request: dict) -> dict:
    from conformance.bench import BenchPreset, summarize, time_calls
    from conformance.export import ExportUnsupported
    from conformance.paths import CaseContext, PathUnavailable, get_path
    from conformance.paths.precision_variants import precision_fields
    from pkm_models.weights import make_input

    given = request["preset"]
    bench = BenchPreset(**{**given, "input_shape": tuple(given["input_shape"])})
    path = get_path(request["path"])
    case = bench.case()
    device = path.device
    result = {"name": path.name, "device": device, "eager_reference": path.name == f"torch-eager-{device}"}
    sampler = PeakSampler() if device == "cuda" else None
    host = TreePeak()
    with sampler or contextlib.nullcontext(), host:  # sampling while preparing and warming up
        try:
            path.check(case)
            weights = Path(request["export_dir"]) / "weights"  # written once per bench, memory-mapped
            if not weights.is_dir():
                case.spec.write_weights(weights.with_name(f".weights-{os.getpid()}"))
                with contextlib.suppress(OSError):  # another worker may have put its copy first
                    os.rename(weights.with_name(f".weights-{os.getpid()}"), weights)
            context = CaseContext(
                case,
                read_weights_dir(weights, writable=True),
                export_dir=Path(request["export_dir"]),
                weights_dir=weights,
            )
            fn = path.prepare_timed(context, make_input(bench.input_shape, seed=0))
        except (PathUnavailable, ExportUnsupported) as exc:
            return {**result, "status": UNAVAILABLE, "reason": str(exc)}
        result.update(precision_fields(path, context))  # precision and model_bytes
        for _ in range(request["warmup"]):
            fn()
    times = time_calls(fn, request["runs"])  # input already on the device; returns once it has finished
    host.sample()  # once more, after the timed passes
    peak_host_mb = max(memory_mb("VmHWM"), host.bytes / 2**20)  # the path's, before any judging
    if sampler:
        sampler.sample()
    peak_device = sampler.peak_mb if sampler else None
    if sampler and peak_device is None and path.family == "torch" and not getattr(path, "processes", 0):
        # no nvidia-smi: the allocator's own peak (a sharded path allocates in its processes, not here)
        import torch

        peak_device = torch.cuda.max_memory_allocated() / 2**20
    if request.get("sweep"):  # after the figures: the table sweep's time beside numpy's one read
        result["sweep"] = time_sweep(path, context)
    if path.judged_in_bench:  # after the figures: the reference's pass is not the path's memory
        problem = judge_against_reference(path, context, make_input(bench.input_shape, seed=0), request)
        if problem:
            return {**result, "status": FAIL, "reason": problem}
        result["judged"] = True
    return {
        **result,
        "status": OK,
        "reason": "",
        **summarize(times),
        "times_s": times,
        "peak_host_mb": peak_host_mb,
        "peak_device_mb": peak_device,
    }


if __name__ == "__main__":
    sys.exit(serve(measure))
