"""One execution path on one case, in its own process:
``python -m conformance.paths.worker REQUEST``.

The conformance run starts one per path so that a path that crashes its process
(a segfault in a runtime, the kernel's out-of-memory killer) is that path's error and
the other paths' results still come out. Writes the taps to ``out`` (.npz) and prints
one JSON line: status, the timed seconds, or the reason it could not run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from conformance.isolation import serve


def run(request: dict) -> dict:
    import numpy as np

    from conformance.cases import load_cases
    from conformance.export import ExportUnsupported
    from conformance.golden import GoldenStore
    from conformance.paths import PATHS, CaseContext, PathUnavailable

    (case,) = load_cases(Path(request["cases_dir"]), [request["case"]])
    golden = GoldenStore(Path(request["golden_dir"])).read(case.name)
    weights = golden.weights if golden.weights is not None else case.spec.weights  # lazy: ORT paths skip it
    path = next(p for p in PATHS if p.name == request["path"])
    context = CaseContext(case, weights, export_dir=Path(request["export_dir"]))
    try:
        path.check(case)
        fn = path.prepare(context)
    except (PathUnavailable, ExportUnsupported) as exc:
        return {"status": "unavailable", "reason": str(exc)}
    t0 = time.perf_counter()
    taps = fn(golden.input)
    seconds = time.perf_counter() - t0
    np.savez(request["out"], **{k: np.asarray(v) for k, v in taps.items()})
    return {"status": "ran", "seconds": seconds}


if __name__ == "__main__":
    sys.exit(serve(run))
