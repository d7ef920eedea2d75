"""One execution path on one case, in its own process:
``python -m conformance.paths.worker REQUEST``.

The conformance run starts one per path so that a path that crashes its process
(a segfault in a runtime, the kernel's out-of-memory killer) is that path's error and
the other paths' results still come out. The request carries the case (as JSON), the
input file and the folder of weights that the parent wrote (memory-mapped here, so that
parent and workers share one copy): the worker reads nothing else (never the golden store). Writes the
taps to ``out`` (.npz) and prints one JSON line (:class:`conformance.results.WorkerResult`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from conformance.isolation import serve
from conformance.results import OK, UNAVAILABLE, WorkerResult


def run(request: dict) -> dict:
    import numpy as np

    from conformance.cases import Case
    from conformance.export import ExportUnsupported
    from conformance.paths import CaseContext, PathUnavailable, get_path

    case = Case.from_json(request["case"], Path(request["source"]))
    if request["weights"]:  # the parent's folder of .npy files: memory-mapped, the one copy
        spec = dataclasses.replace(case.spec, weights_file=Path(request["weights"]), checkpoint=None)
        case = dataclasses.replace(case, spec=spec)
    x = np.load(request["input"], allow_pickle=False)
    path = get_path(request["path"])
    context = CaseContext(case, export_dir=Path(request["export_dir"]), weights_dir=case.spec.weights_file)
    try:
        path.check(case)
        fn = path.prepare(context)
    except (PathUnavailable, ExportUnsupported) as exc:
        return WorkerResult(UNAVAILABLE, str(exc)).to_json()
    t0 = time.perf_counter()
    taps = fn(x)
    seconds = time.perf_counter() - t0
    np.savez(request["out"], **{k: np.asarray(v) for k, v in taps.items()})
    return WorkerResult(OK, seconds=seconds).to_json()


if __name__ == "__main__":
    sys.exit(serve(run))
