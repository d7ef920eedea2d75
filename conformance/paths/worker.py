"""Execution paths in worker processes, two ways:

* ``python -m conformance.paths.worker REQUEST``: one path on one case, then exit (the
  run's ``--isolation path``);
* ``python -m conformance.paths.worker --serve FAMILY``: one long-lived worker of a family
  of paths (``conformance.pool``), one JSON request per stdin line, one JSON answer per
  line. It imports the family's framework once and keeps the context of the case it last
  served (models, exports), so the next path of that case starts at once.

A ``run`` request carries the case (as JSON), the input file and the folder of weights
that the parent wrote (memory-mapped here, so that parent and workers share one copy):
the worker reads nothing else (never the golden store). It writes the taps to ``out`` (.npz) and answers
with a :class:`conformance.results.WorkerResult`. A ``check`` request asks which paths of
the family can run which cases here (decided once per run); an ``export`` request builds
an export that other families' paths will run.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

from conformance.isolation import serve
from conformance.results import ERROR, OK, UNAVAILABLE, WorkerResult

# keep the contexts of recent cases while their weights take at most this much (a network
# judged layer by layer goes back and forth between the case and its layers)
KEPT_WEIGHT_BYTES = 256 << 20
_CONTEXTS: collections.OrderedDict = collections.OrderedDict()


def _context(request: dict):
    """The case context of ``request``: a kept one for the same case, weights and folder."""
    from conformance.cases import Case
    from conformance.paths import CaseContext

    key = json.dumps([request["case"], request["source"], request.get("weights"), request["export_dir"]])
    key += json.dumps(request.get("cache_dir"))
    if key in _CONTEXTS:
        _CONTEXTS.move_to_end(key)
        return _CONTEXTS[key]
    case = Case.from_json(request["case"], Path(request["source"]))
    if request.get("weights"):  # the parent's folder of .npy files: memory-mapped, the one copy
        spec = dataclasses.replace(case.spec, weights_file=Path(request["weights"]), checkpoint=None)
        case = dataclasses.replace(case, spec=spec)
    cache = None
    if request.get("cache_dir"):
        from conformance.export.cache import ExportCache

        cache = ExportCache(Path(request["cache_dir"]))
    context = CaseContext(case, export_dir=Path(request["export_dir"]), weights_dir=case.spec.weights_file, cache=cache)
    _CONTEXTS[key] = context
    total, dropped = 0, 0
    for old in reversed(list(_CONTEXTS)):  # newest first: keep while they fit, always the newest
        total += _CONTEXTS[old].case.spec.weight_bytes
        if old != key and total > KEPT_WEIGHT_BYTES:
            gone = _CONTEXTS.pop(old)
            dropped += gone.case.spec.weight_bytes
            gone.close()
    if dropped > KEPT_WEIGHT_BYTES:  # a large case's models (Keras' hold cycles): freed now, not later
        gc.collect()
    return context


def run(request: dict) -> dict:
    """One path on one case (the ``run`` request)."""
    import numpy as np

    from conformance.export import ExportUnsupported
    from conformance.paths import PathUnavailable, get_path

    context = _context(request)
    x = np.load(request["input"], allow_pickle=False)
    path = get_path(request["path"])
    try:
        path.check(context.case)
        fn = path.prepare(context)
    except (PathUnavailable, ExportUnsupported) as exc:
        return WorkerResult(UNAVAILABLE, str(exc)).to_json()
    t0 = time.perf_counter()
    taps = fn(x)
    seconds = time.perf_counter() - t0
    np.savez(request["out"], **{k: np.asarray(v) for k, v in taps.items()})
    tables, why, audit = [], "", None
    if request.get("sweep"):  # every row of every value table, through this path's lookup
        from conformance.paths.base import audit_path
        from conformance.sweep import sweep_path

        tables, why = sweep_path(path, context)
        audit = audit_path(path, context)
    return WorkerResult(
        OK,
        seconds=seconds,
        sweep=[t.to_json() for t in tables],
        sweep_reason=why,
        audit=audit.to_json() if audit is not None else None,
    ).to_json()


REFERENCE = "torch-eager-cpu"  # the stream's live reference: the golden's generator
# the reference's taps of a stream's batches are kept for the case's next paths in this
# worker while they take at most this much (a constant: memory does not grow with the stream)
REFERENCE_KEPT_BYTES = 256 << 20
# ... and written once for the case's paths in every worker, into its private folder, while
# the whole stream's take at most this much on disk (else each worker computes its own)
REFERENCE_STORED_BYTES = 2 << 30


def stream_batch(request: dict) -> dict:
    """One batch of the case's stream (the ``stream`` request): the path's taps and the live
    reference's on tokens ``first .. first + batch``, both written to ``out`` (.npz, the
    reference's under ``ref:``). The path is prepared once per case and kept for the
    stream's next batches; the reference's taps are computed once per batch for the case."""
    import numpy as np

    x, got, want, seconds = stream_taps(_context(request), request["path"], request["first"], request["count"])
    arrays = {k: np.asarray(v) for k, v in got.items()} | {f"ref:{k}": np.asarray(v) for k, v in want.items()}
    np.savez(request["out"], input=x, **arrays)
    return WorkerResult(OK, seconds=seconds).to_json()


def _prepared(context, name: str):
    from conformance.paths import get_path

    if name not in context.prepared:
        path = get_path(name)
        path.check(context.case)
        context.prepared[name] = path.prepare(context)
    return context.prepared[name]


def stream_taps(context, name: str, first: int, count: int):
    """(input (1,count,input_dim), the path's taps, the reference's taps, the path's seconds)
    on tokens ``first .. first + count`` of the context's stream. The reference's taps come
    from this worker's memory, else from the case's folder, where the first worker to need
    a batch writes them (``stream/reference-<first>-<count>.npz``, moved in whole), else
    from the reference run here."""
    import numpy as np

    from conformance.stream import rows

    case = context.case
    run = _prepared(context, name)
    x = rows(case.stream, case.config.input_dim, first, count)[None]  # (1,count,input_dim)
    t0 = time.perf_counter()
    got = run(x)
    seconds = time.perf_counter() - t0
    kept = context.stream_reference
    want = kept.get((first, count))
    stored = context.shared_folder("stream") / f"reference-{first}-{count}.npz"
    if want is None and stored.is_file():
        with np.load(stored, allow_pickle=False) as data:
            want = {k: data[k] for k in data.files}
    if want is None:
        want = got if name == REFERENCE else _prepared(context, REFERENCE)(x)
        want = {k: np.asarray(v) for k, v in want.items()}
        batch_bytes = sum(v.nbytes for v in want.values())
        if batch_bytes * math.ceil(case.stream.tokens / max(count, 1)) <= REFERENCE_STORED_BYTES:
            stored.parent.mkdir(parents=True, exist_ok=True)
            partial = stored.with_name(f".{stored.stem}.{os.getpid()}.npz")
            np.savez(partial, **want)
            os.replace(partial, stored)  # another worker may have put the same taps first
    size = sum(v.nbytes for taps in kept.values() for v in taps.values())
    if (first, count) not in kept and size + sum(v.nbytes for v in want.values()) <= REFERENCE_KEPT_BYTES:
        kept[(first, count)] = want
    return x, got, want, seconds


def check(request: dict) -> dict:
    """Which of ``paths`` can run which of ``cases`` here: ``{path: [reason or None per case]}``."""
    from conformance.cases import Case
    from conformance.paths import PathUnavailable, get_path

    cases = [Case.from_json(c["case"], Path(c["source"])) for c in request["cases"]]
    reasons = {}
    for name in request["paths"]:
        path = get_path(name)
        reasons[name] = []
        for case in cases:
            try:
                path.check(case)
                reasons[name].append(None)
            except PathUnavailable as exc:
                reasons[name].append(str(exc))
    from conformance.environment import framework_facts

    return {"status": OK, "reasons": reasons, "facts": framework_facts(request["family"])}


def build_export(request: dict) -> dict:
    """The export ``exporter`` of the case, made now for the paths that will run it
    (``unavailable`` where the exporter refuses the model)."""
    from conformance.export import ExportUnsupported

    try:
        _context(request).export(request["exporter"])
    except ExportUnsupported as exc:
        return {"status": UNAVAILABLE, "reason": str(exc)}
    return {"status": OK}


OPS = {"run": run, "check": check, "export": build_export, "stream": stream_batch}


def _preload(family: str) -> None:
    """The family's framework, imported once before the first request."""
    if family == "tf":
        from conformance.isolation import quiet_third_party

        quiet_third_party(verbose=False)
    elif family == "torch":
        import torch  # noqa: F401
    # dist (the sharded paths): its worker only drives the processes that hold the model
    elif family == "ort":
        import onnxruntime  # noqa: F401
    elif family == "onnx-reference":
        import onnx.reference  # noqa: F401


def serve_family(family: str) -> int:
    """The long-lived worker's loop (see the module docstring)."""
    answers = os.fdopen(os.dup(1), "w")  # the protocol's own copy of stdout
    os.dup2(2, 1)  # what libraries print goes to stderr
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    def send(answer: dict) -> None:
        answers.write(json.dumps(answer) + "\n")
        answers.flush()

    _preload(family)
    send({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = OPS[request.get("op", "run")](request)
        except Exception as exc:
            answer = {"status": ERROR, "reason": f"{type(exc).__name__}: {exc}".strip()}
        send(answer)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        sys.exit(serve_family(sys.argv[2]))
    sys.exit(serve(run))
