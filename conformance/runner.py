"""The conformance run: every selected path on every case, compared with the golden.

The run reads each golden once, fully checked, while holding the store's shared lock
(:meth:`GoldenStore.reading`), and hands the workers exactly what it compares against:
the input and the weights, written once into private folders. The weights are a folder of
``.npy`` files (:meth:`conformance.spec.ModelSpec.write_weights`) that this process and
every worker memory-map: one copy in the page cache, however many processes read it, and
this process touches only the rows it judges. A worker never reads the golden store, so a
regeneration running beside the run cannot mix two goldens into one verdict.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conformance.cases import Case
from conformance.compare import check_checkable, judge
from conformance.environment import environment
from conformance.export import ExportUnsupported
from conformance.golden import Golden, GoldenStore, check_golden_matches_case
from conformance.isolation import run_json_worker
from conformance.memory import Admission, available_bytes, estimate_bytes
from conformance.paths import CaseContext, ExecutionPath, PathUnavailable
from conformance.results import ERROR, FAIL, OK, PASS, UNAVAILABLE, CaseResult, PathResult, RunResult, WorkerResult
from conformance.tolerances import TolerancePolicy, path_matches
from pkm_models.config import TAPS

Progress = Callable[[str], None]


@dataclasses.dataclass
class RunOptions:
    """How the run executes paths (not what it compares)."""

    require: list[str] = dataclasses.field(default_factory=list)  # globs of paths that must be available
    isolate: bool = True  # every path in its own process
    timeout: float = 1800  # seconds per isolated path
    jobs: int = 1  # isolated paths at a time, as many as fit in memory (conformance.memory)
    available: Callable[[], int | None] | None = None  # bytes of memory available (default: this machine's)
    progress: Progress | None = None

    def required(self, path: str) -> bool:
        return any(path_matches(path, g) for g in self.require)


LAYERWISE = "@golden-input"  # suffix of the taps of a layer judged alone


def judge_layerwise(
    path: ExecutionPath,
    case: Case,
    golden: Golden,
    weights: dict[str, np.ndarray],
    policy: TolerancePolicy,
    options: RunOptions,
    result: PathResult,
    first: int = 1,
) -> PathResult:
    """A network whose end-to-end comparison set tokens aside (a legitimate flip in one
    layer changes the next layer's input): run every later layer of ``path`` alone on its
    golden input (the golden output of the layer before) and judge it on all tokens. Its
    taps join the result as ``<i>/<tap>@golden-input``; the path passes only if they do.
    ``first=0`` judges every layer that way, the first one on the case's input."""
    from conformance.spec import write_weights_dir
    from pkm_models.convert import split_layers

    per_layer = split_layers(weights)
    for i in range(first, case.spec.layers):
        layer_input = golden.input if i == 0 else golden.taps[f"{i - 1}/output"]
        with tempfile.TemporaryDirectory(prefix=f"pkm-{case.name}-layer{i}-") as tmp:
            write_weights_dir(per_layer[i], Path(tmp) / "weights")
            np.save(Path(tmp) / "input.npy", layer_input, allow_pickle=False)
            sub = case.layer(i, Path(tmp) / "weights", Path(tmp) / "input.npy")
            taps = {tap: golden.taps[f"{i}/{tap}"] for tap in TAPS}
            sub_golden = Golden(case.name, golden.meta, layer_input, taps, per_layer[i])
            (alone,) = _run_case(sub, sub_golden, per_layer[i], [path], policy, options, lambda _: None)
        if alone.status not in (PASS, FAIL):
            return dataclasses.replace(
                result, status=alone.status, reason=f"layer {i} alone on its golden input: {alone.reason}"
            )
        for t in alone.tensors:
            t.name = f"{i}/{t.name}{LAYERWISE}"
        result.tensors += alone.tensors
        if alone.status == FAIL and result.status == PASS:
            bad = next(t for t in alone.tensors if not t)
            result.status, result.first_divergence = FAIL, bad.name
            result.reason = f"{bad.name}: {bad.message}"
    return result


def run_path(
    path: ExecutionPath,
    context: CaseContext,
    golden: Golden,
    policy: TolerancePolicy,
    required: bool,
    judged_layers: int | None = None,
):
    """One path in this process (``judged_layers``: see :func:`conformance.compare.compare_taps`)."""
    case = context.case
    try:
        path.check(case)
        fn = path.prepare(context)
        t0 = time.perf_counter()
        got = fn(golden.input)
        seconds = time.perf_counter() - t0
    except (PathUnavailable, ExportUnsupported) as exc:
        return PathResult.unavailable(path.name, str(exc), required)
    except Exception as exc:
        return PathResult(path.name, ERROR, reason=f"{type(exc).__name__}: {exc}".strip())
    return judge(path.name, case, got, golden, context.weights, policy, seconds, judged_layers)


def run_path_isolated(
    path: ExecutionPath,
    context: CaseContext,
    golden: Golden,
    policy: TolerancePolicy,
    required: bool,
    timeout: float,
    judged_layers: int | None = None,
) -> PathResult:
    """One path in a fresh process (``conformance.paths.worker``), on the input and weights
    this process wrote into the case's folder, sharing its exports."""
    case = context.case
    try:
        path.check(case)
    except PathUnavailable as exc:
        return PathResult.unavailable(path.name, str(exc), required)
    with tempfile.TemporaryDirectory(prefix="pkm-taps-") as tmp:
        out = Path(tmp) / "taps.npz"
        request = {
            "path": path.name,
            "case": case.to_json(),
            "source": str(case.source),
            "input": str(context.export_dir / "input.npy"),
            "weights": str(context.weights_dir) if context.weights_dir is not None else None,
            "export_dir": str(context.export_dir),
            "out": str(out),
        }
        answer, why = run_json_worker("conformance.paths.worker", request, timeout)
        if answer is None:
            return PathResult(path.name, ERROR, reason=why)
        result = WorkerResult.from_json(answer)
        if result.status == UNAVAILABLE:
            return PathResult.unavailable(path.name, result.reason, required)
        if result.status != OK:
            return PathResult(path.name, ERROR, reason=result.reason or "unknown")
        with np.load(out, allow_pickle=False) as data:
            got = {k: data[k] for k in data.files}
    return judge(path.name, case, got, golden, context.weights, policy, result.seconds, judged_layers)


def read_goldens(cases: list[Case], store: GoldenStore, progress: Progress | None = None) -> dict[str, Golden]:
    """Every case's golden, read once and checked, under the store's shared lock. Golden
    problems raise GoldenError (bad data, exit 2) before anything runs."""
    goldens = {}
    with store.reading(progress):
        for case in cases:
            golden = store.read(case.name)
            check_golden_matches_case(case, golden, store)
            goldens[case.name] = golden
    return goldens


def run_conformance(
    cases: list[Case],
    paths: list[ExecutionPath],
    store: GoldenStore,
    policy: TolerancePolicy,
    options: RunOptions | None = None,
) -> RunResult:
    """Every path on every case. Golden problems, tolerances that would check nothing and
    cases too large for this machine are refused before anything runs."""
    options = options or RunOptions()
    for case in cases:
        case.check_fits()
    goldens = read_goldens(cases, store, options.progress)
    weights_root = Path(tempfile.mkdtemp(prefix="pkm-weights-"))
    try:
        return _run_cases(cases, paths, goldens, weights_root, policy, options)
    finally:
        shutil.rmtree(weights_root, ignore_errors=True)


def case_weights(case: Case, golden: Golden, folder: Path) -> dict[str, np.ndarray]:
    """The weights ``case`` is judged with (the golden's stored ones, else the case's own),
    written once into ``folder`` and memory-mapped from there (copy-on-write pages: torch
    wraps them without copying where a path runs in this process)."""
    from conformance.spec import read_weights_dir, write_weights_dir

    if golden.weights is not None:
        write_weights_dir(golden.weights, folder)
    else:
        case.spec.write_weights(folder)
    return read_weights_dir(folder, writable=True)


def _run_cases(cases, paths, goldens, weights_root: Path, policy, options: RunOptions) -> RunResult:
    weights = {}
    for case in cases:
        golden = goldens[case.name]
        weights[case.name] = case_weights(case, golden, weights_root / case.name)
        check_checkable(
            golden.taps,
            config=case.config,
            weights=weights[case.name],
            layers=case.spec.layers,
            policy=policy,
            case=case.name,
            paths=[p.name for p in paths],
        )
    results = []
    counter = iter(range(1, len(cases) * len(paths) + 1))
    total = len(cases) * len(paths)
    for case in cases:

        def report(result: PathResult, case: Case = case) -> None:
            if options.progress:
                options.progress(f"[{next(counter)}/{total}] {case.name} {result.name}: {result.status}")

        golden = goldens.pop(case.name)
        case_results = _run_case(
            case, golden, weights.pop(case.name), paths, policy, options, report, weights_dir=weights_root / case.name
        )
        results.append(CaseResult(case.name, case_results, golden_sha256=golden.digest))
    return RunResult(results, environment())


def _judge_layer_by_layer(
    path: ExecutionPath,
    context: CaseContext,
    golden: Golden,
    policy: TolerancePolicy,
    options: RunOptions,
    required: bool,
) -> PathResult:
    """A path that is :meth:`~conformance.paths.ExecutionPath.judged_layer_by_layer` on a
    network: the network end to end, with layer 0 (which sees the golden input) judged
    and the later layers' taps only checked for shape, type and finiteness; then every
    later layer alone on its golden input (:func:`judge_layerwise`)."""
    if options.isolate:
        result = run_path_isolated(path, context, golden, policy, required, options.timeout, judged_layers=1)
    else:
        result = run_path(path, context, golden, policy, required, judged_layers=1)
    if result.status != PASS:
        return result
    return judge_layerwise(path, context.case, golden, context.weights, policy, options, result)


def _run_case(
    case: Case,
    golden: Golden,
    weights: dict[str, np.ndarray],
    paths: list[ExecutionPath],
    policy: TolerancePolicy,
    options: RunOptions,
    report: Callable[[PathResult], None],
    weights_dir: Path | None = None,
) -> list[PathResult]:
    """``weights_dir``: the folder ``weights`` are mapped from (a layer judged alone names
    its own as its spec's ``weights_file``)."""
    folder = Path(tempfile.mkdtemp(prefix=f"pkm-{case.name}-")) if options.isolate else None
    weights_dir = weights_dir or case.spec.weights_file
    context = CaseContext(case, weights, export_dir=folder, weights_dir=weights_dir)
    try:
        if folder is not None:  # what every worker of this case reads
            np.save(folder / "input.npy", golden.input, allow_pickle=False)

        admission = Admission(options.available or available_bytes)

        def one(path: ExecutionPath) -> PathResult:
            """``path`` once its estimated memory fits (:mod:`conformance.memory`)."""
            with admission.admit(estimate_bytes(case, path)) as refusal:
                if refusal is None:
                    return start(path)
            result = PathResult.unavailable(path.name, refusal, options.required(path.name))
            report(result)
            return result

        def start(path: ExecutionPath) -> PathResult:
            required = options.required(path.name)
            if case.spec.layers > 1 and path.judged_layer_by_layer(case):
                result = _judge_layer_by_layer(path, context, golden, policy, options, required)
                report(result)
                return result
            if options.isolate:
                result = run_path_isolated(path, context, golden, policy, required, options.timeout)
            else:
                result = run_path(path, context, golden, policy, required)
            if case.spec.layers > 1 and result.downstream_tokens and result.status == PASS:
                result = judge_layerwise(path, case, golden, context.weights, policy, options, result)
            report(result)
            return result

        if not (options.isolate and options.jobs > 1):
            return [one(path) for path in paths]
        # exports first, once, so that concurrent workers find them made
        for path in paths:
            exporter = getattr(path, "exporter", None)
            if exporter:
                with contextlib.suppress(Exception):  # a failing export is its paths' result
                    path.check(case)
                    context.export(exporter)
        with concurrent.futures.ThreadPoolExecutor(max_workers=options.jobs) as pool:
            return list(pool.map(one, paths))
    finally:
        context.close()
        gc.collect()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
