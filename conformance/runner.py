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

import collections
import concurrent.futures
import contextlib
import dataclasses
import gc
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from conformance.cases import Case
from conformance.compare import check_checkable, compare_case, judge
from conformance.environment import environment
from conformance.export import ExportUnsupported
from conformance.files import staging_dir
from conformance.golden import Golden, GoldenStore, check_golden_matches_case
from conformance.isolation import run_json_worker
from conformance.memory import Admission, available_bytes, estimate_bytes, estimate_export_bytes
from conformance.paths import CaseContext, ExecutionPath, PathUnavailable
from conformance.pool import ONE_WORKER, Answer, WorkerPool
from conformance.results import ERROR, FAIL, OK, PASS, UNAVAILABLE, CaseResult, PathResult, RunResult, WorkerResult
from conformance.tolerances import TolerancePolicy, path_matches
from pkm_models.config import layer_taps
from pkm_models.errors import PKMError

Progress = Callable[[str], None]
ISOLATIONS = ("family", "path")

WEIGHTS_PREFIX = "pkm-weights-"  # a run's weights folder in the temporary folder


def default_jobs() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclasses.dataclass
class RunOptions:
    """How the run executes paths (not what it compares)."""

    require: list[str] = dataclasses.field(default_factory=list)  # globs of paths that must be available
    isolate: bool = True  # paths in worker processes (False: in this process)
    # "family": long-lived workers, one family of paths each, replaced after a crash or a
    # time-out (conformance.pool); "path": a fresh process for every (case, path)
    isolation: str = "family"
    timeout: float = 1800  # seconds per (case, path) in a worker
    # (case, path) pairs at a time, as many as fit in memory (conformance.memory)
    jobs: int = dataclasses.field(default_factory=lambda: default_jobs())
    available: Callable[[], int | None] | None = None  # bytes of memory available (default: this machine's)
    progress: Progress | None = None
    cache_dir: Path | None = None  # exports kept between runs (conformance.export.cache); None: this run's only
    sweep: bool = True  # read every value-table row through each path's lookup (conformance.sweep)
    streams: bool = True  # run each case's token stream through every path (conformance.stream)

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise PKMError(f"isolation must be one of {list(ISOLATIONS)}, got {self.isolation!r}")
        if self.jobs < 1:
            raise PKMError(f"jobs must be at least 1, got {self.jobs}")
        # one for the run: a path starts only when its estimated peak fits beside those running
        self.admission = Admission(self.available or available_bytes)

    def required(self, path: str) -> bool:
        return any(path_matches(path, g) for g in self.require)


LAYERWISE = "@golden-input"  # suffix of the taps of a layer judged alone


_LAYERS_LOCK = threading.Lock()


def golden_layer_case(context: CaseContext, golden: Golden, i: int) -> tuple[Case, Golden]:
    """Layer ``i`` of the context's network as a case of its own, on its golden input (the
    case's input for layer 0, else the golden output of the layer before), with its golden
    taps. Its weights (:func:`_layer_weights`) and input are written once per case, into a
    folder that lives as long as the context: every path judged layer by layer reads the
    same files, so the layer's exports are the same (one cache entry each, built before
    those paths run)."""
    with _LAYERS_LOCK:
        made = context.golden_layers
        if i not in made:
            case = context.case
            if context.golden_layers_dir is None:
                root = context.golden_layers_dir = Path(tempfile.mkdtemp(prefix=f"pkm-{case.name}-layers-"))
                context.on_close(lambda: shutil.rmtree(root, ignore_errors=True))
            folder = context.golden_layers_dir / f"layer{i}"
            weights = _layer_weights(context, i, folder / "weights")
            layer_input = golden.input if i == 0 else golden.taps[f"{i - 1}/output"]
            np.save(folder / "input.npy", layer_input, allow_pickle=False)
            sub = case.layer(i, folder / "weights", folder / "input.npy")
            taps = {tap: golden.taps[f"{i}/{tap}"] for tap in layer_taps(case.config)}
            made[i] = (sub, Golden(case.name, golden.meta, layer_input, taps, weights))
        return made[i]


def _layer_weights(context: CaseContext, i: int, folder: Path) -> dict[str, np.ndarray]:
    """Layer ``i``'s weights in ``folder``, as the layer's case maps them. Where the network
    has a folder of ``.npy`` files (every run writes one), they are hard links to its files:
    no disk, and no page that this process maps to copy them (seednet's five later layers
    held 3.8 GiB of the run's memory when they were written from the mapped network). Else
    (weights handed in from memory, a ``.npz`` file) they are written from the arrays."""
    from conformance.spec import link_weights_dir, read_weights_dir, write_weights_dir
    from pkm_models.convert import split_layers

    weights = split_layers(context.weights)[i]
    network = Path(context.weights_dir) if context.weights_dir is not None else None
    files = {name: network / f"layers.{i}.{name}.npy" for name in weights} if network else {}
    if files and all(f.is_file() for f in files.values()):
        # copy-on-write, as the run maps the network's: a write stays out of the linked file
        return read_weights_dir(link_weights_dir(files, folder), writable=True)
    write_weights_dir(weights, folder)
    return weights


def judge_on_golden_inputs(
    path: ExecutionPath,
    context: CaseContext,
    golden: Golden,
    policy: TolerancePolicy,
    options: RunOptions,
    result: PathResult,
    first: int = 1,
    pool: WorkerPool | None = None,
) -> PathResult:
    """A network whose end-to-end comparison set tokens aside (a legitimate flip in one
    layer changes the next layer's input): run every later layer of ``path`` alone on its
    golden input (:func:`golden_layer_case`) and judge it on all tokens. Its taps join the
    result as ``<i>/<tap>@golden-input``; the path passes only if they do. ``first=0``
    judges every layer that way, the first one on the case's input."""
    for i in range(first, context.case.spec.layers):
        sub, sub_golden = golden_layer_case(context, golden, i)
        with case_context(sub, sub_golden, sub_golden.weights, options) as layer_context:
            alone = start_path(path, layer_context, sub_golden, policy, options, options.required(path.name), pool=pool)
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
    sweep: bool = False,
):
    """One path in this process (``judged_layers``: see :func:`conformance.compare.compare_taps`;
    ``sweep``: also read every value-table row through the path's lookup)."""
    from conformance.paths.base import audit_path
    from conformance.sweep import sweep_path

    case = context.case
    try:
        path.check(case)
        fn = path.prepare(context)
        t0 = time.perf_counter()
        got = fn(golden.input)
        seconds = time.perf_counter() - t0
        tables, why = sweep_path(path, context) if sweep else ([], "")
        audit = audit_path(path, context) if sweep else None
    except (PathUnavailable, ExportUnsupported) as exc:
        return PathResult.unavailable(path.name, str(exc), required)
    except Exception as exc:
        return PathResult(path.name, ERROR, reason=f"{type(exc).__name__}: {exc}".strip())
    result = judge(path.name, case, got, golden, context.weights, policy, seconds, judged_layers)
    result.add_sweep(tables, why)
    result.add_audit(audit)
    return result


def worker_request(op: str, path: ExecutionPath, context: CaseContext, out: Path, **extra) -> dict:
    """A worker request for ``path`` on the context's case: the case, and the files this
    process wrote for it (input, weights, exports), never the golden store."""
    case = context.case
    return {
        "op": op,
        "path": path.name,
        "case": case.to_json(),
        "source": str(case.source),
        "input": str(context.export_dir / "input.npy"),
        "weights": str(context.weights_dir) if context.weights_dir is not None else None,
        "export_dir": str(context.export_dir),
        "cache_dir": str(context.cache.root) if context.cache else None,
        "out": str(out),
        **extra,
    }


def run_path_in_worker(
    path: ExecutionPath,
    context: CaseContext,
    golden: Golden,
    policy: TolerancePolicy,
    required: bool,
    ask: Callable[[dict], Answer],
    judged_layers: int | None = None,
    sweep: bool = False,
) -> PathResult:
    """One path in a worker process (``ask``: a fresh one, or a family's long-lived one),
    on the input and weights this process wrote into the case's folder, sharing its exports."""
    case = context.case
    with tempfile.TemporaryDirectory(prefix="pkm-taps-") as tmp:
        out = Path(tmp) / "taps.npz"
        request = worker_request("run", path, context, out, sweep=sweep)
        answer, why = ask(request)
        if answer is None:
            return PathResult(path.name, ERROR, reason=why)
        result = WorkerResult.from_json(answer)
        if result.status == UNAVAILABLE:
            return PathResult.unavailable(path.name, result.reason, required)
        if result.status != OK:
            return PathResult(path.name, ERROR, reason=result.reason or "unknown")
        with np.load(out, allow_pickle=False) as data:
            got = {k: data[k] for k in data.files}
    from conformance.export.audit import AuditResult
    from conformance.sweep import SweepResult

    judged = judge(path.name, case, got, golden, context.weights, policy, result.seconds, judged_layers)
    judged.add_sweep([SweepResult.from_json(t) for t in result.sweep], result.sweep_reason)
    judged.add_audit(AuditResult.from_json(result.audit) if result.audit else None)
    return judged


def start_path(
    path: ExecutionPath,
    context: CaseContext,
    golden: Golden,
    policy: TolerancePolicy,
    options: RunOptions,
    required: bool,
    judged_layers: int | None = None,
    pool: WorkerPool | None = None,
    sweep: bool = False,
) -> PathResult:
    """The one place where a (case, path) starts running, whatever the mode: in this
    process, in a fresh process (``--isolation path``), or in a family's worker (``pool``),
    once its estimated memory fits beside the paths running (:mod:`conformance.memory`);
    a path that cannot fit even alone is ``unavailable`` with the figures."""
    with options.admission.admit(estimate_bytes(context.case, path)) as refusal:
        if refusal is None:
            return _start_path(path, context, golden, policy, options, required, judged_layers, pool, sweep)
    return PathResult.unavailable(path.name, refusal, required)


def _start_path(path, context, golden, policy, options, required, judged_layers, pool, sweep) -> PathResult:
    if not options.isolate:
        return run_path(path, context, golden, policy, required, judged_layers, sweep)
    if pool is not None:  # availability was decided once, by the family's worker
        return run_path_in_worker(
            path, context, golden, policy, required, lambda r: pool.ask(path.family, r), judged_layers, sweep
        )
    try:
        path.check(context.case)
    except PathUnavailable as exc:
        return PathResult.unavailable(path.name, str(exc), required)
    timeout = options.timeout
    return run_path_in_worker(
        path,
        context,
        golden,
        policy,
        required,
        lambda r: run_json_worker("conformance.paths.worker", r, timeout),
        judged_layers,
        sweep,
    )


def judge_path(
    path: ExecutionPath,
    context: CaseContext,
    golden: Golden,
    policy: TolerancePolicy,
    options: RunOptions,
    pool: WorkerPool | None = None,
) -> PathResult:
    """One path's verdict on one case: end to end, and for a network also layer by layer
    where that is how it is judged (:meth:`~conformance.paths.ExecutionPath.tolerances_per_layer`,
    or tokens set aside after a legitimate flip)."""
    case = context.case
    required = options.required(path.name)
    network = case.spec.layers > 1
    if network and path.tolerances_per_layer(case):
        result = _judge_layer0_end_to_end(path, context, golden, policy, options, required, pool)
        return _with_stream(path, context, golden, policy, options, pool, result)
    result = start_path(path, context, golden, policy, options, required, pool=pool, sweep=options.sweep)
    if network and result.downstream_tokens and result.status == PASS:
        result = judge_on_golden_inputs(path, context, golden, policy, options, result, pool=pool)
    return _with_stream(path, context, golden, policy, options, pool, result)


def _with_stream(path, context, golden, policy, options, pool, result: PathResult) -> PathResult:
    if options.streams and context.case.stream is not None and result.status in (PASS, FAIL):
        problem = path.stream_problem(context.case)
        if problem:
            result.stream = {"reason": problem}
            return result
        try:
            result.add_stream(run_stream(path, context, golden, policy, options, pool))
        except Exception as exc:  # a stream that cannot run is the path's error, with the reason
            result.status, result.reason = ERROR, f"stream: {type(exc).__name__}: {exc}".strip()
    return result


def run_stream(path, context: CaseContext, golden: Golden, policy, options: RunOptions, pool=None) -> dict:
    """The case's stream through ``path``, batch by batch (each in the path's worker, or in
    this process), each batch judged against the live reference's taps as the golden batch
    is; the sampled tokens' reference taps checked against the golden's stored sample."""
    from conformance.paths.worker import REFERENCE, stream_taps
    from conformance.stream import StreamStats, sample_rows

    case, spec = context.case, context.case.stream
    heads = case.config.heads
    judged_layers = 1 if case.spec.layers > 1 and path.tolerances_per_layer(case) else None
    stats = StreamStats()
    picked = sample_rows(spec)
    live: dict[str, np.ndarray] = {}  # the reference's taps on the sampled tokens, filled batch by batch
    filled = 0
    for first in range(0, spec.tokens, spec.batch):
        count = min(spec.batch, spec.tokens - first)
        if not options.isolate:
            x, got, want, seconds = stream_taps(context, path.name, first, count)
        else:
            x, got, want, seconds = _stream_batch_in_worker(path, context, first, count, options, pool)
        verdict = judge(
            path.name,
            case,
            got,
            Golden(case.name, golden.meta, x, want, None),
            context.weights,
            policy,
            seconds,
            judged_layers,
        )
        stats.add(first, got, want, verdict, heads)
        stats.tokens += count
        stats.seconds += seconds
        inside = picked[(picked >= first) & (picked < first + count)] - first
        for tap, array in want.items():
            # written into arrays made once: small arrays kept from every batch would pin the
            # freed batches' memory in the allocator's heap (measured: 1.7 MB a batch)
            a = np.asarray(array)
            rows = a[0] if a.ndim == 3 else a.reshape(count, -1, *a.shape[1:])  # (count, ...) a token a row
            if tap not in live:
                live[tap] = np.empty((len(picked), *rows.shape[1:]), rows.dtype)
            live[tap][filled : filled + len(inside)] = rows[inside]
        filled += len(inside)
    if golden.stream_taps is not None:
        live = {
            tap: v[None] if np.ndim(golden.stream_taps[tap]) == 3 else v.reshape(-1, *v.shape[2:])
            for tap, v in live.items()
        }
        same = compare_case(
            case,
            live,
            golden.stream_taps,
            weights=context.weights,
            policy=policy,
            path=REFERENCE,
            layer_input=golden.stream_input,
        )
        stats.sample = (
            f"{len(picked):,} sampled tokens as the golden's"
            if same.ok
            else (
                f"the live reference differs from the golden's sample at {same.first_divergence}: "
                "the reference changed since the golden was made "
                f"(python -m conformance golden regenerate --case {case.name})"
            )
        )
        if not same.ok and not stats.failure:
            stats.failure = stats.sample
    return stats.to_json()


def _stream_batch_in_worker(path, context: CaseContext, first: int, count: int, options: RunOptions, pool):
    """One stream batch in the path's worker (the pool's, or a fresh process)."""
    with tempfile.TemporaryDirectory(prefix="pkm-stream-") as tmp:
        out = Path(tmp) / "batch.npz"
        request = worker_request("stream", path, context, out, first=first, count=count)
        if pool is not None:
            answer, why = pool.ask(path.family, request)
        else:
            answer, why = run_json_worker("conformance.paths.worker", request, options.timeout)
        if answer is None:
            raise PKMError(f"the worker ended: {why}")
        result = WorkerResult.from_json(answer)
        if result.status != OK:
            raise PKMError(result.reason or result.status)
        with np.load(out, allow_pickle=False) as data:
            x = data["input"]
            got = {k: data[k] for k in data.files if k != "input" and not k.startswith("ref:")}
            want = {k[4:]: data[k] for k in data.files if k.startswith("ref:")}
    return x, got, want, result.seconds or 0.0


def _judge_layer0_end_to_end(
    path: ExecutionPath,
    context: CaseContext,
    golden: Golden,
    policy: TolerancePolicy,
    options: RunOptions,
    required: bool,
    pool: WorkerPool | None,
) -> PathResult:
    """A path whose tolerances hold per layer
    (:meth:`~conformance.paths.ExecutionPath.tolerances_per_layer`), on a network: the
    network end to end, with layer 0 (which sees the golden input) judged and the later
    layers' taps only checked for shape, type and finiteness; then every later layer
    alone on its golden input (:func:`judge_on_golden_inputs`)."""
    result = start_path(
        path, context, golden, policy, options, required, judged_layers=1, pool=pool, sweep=options.sweep
    )
    if result.status != PASS:
        return result
    return judge_on_golden_inputs(path, context, golden, policy, options, result, pool=pool)


@contextlib.contextmanager
def case_context(
    case: Case, golden: Golden, weights: dict[str, np.ndarray], options: RunOptions, weights_dir: Path | None = None
) -> Iterator[CaseContext]:
    """What the paths of one case share: the weights (mapped from ``weights_dir``, or the
    folder the spec names itself: a layer judged alone) and, for paths in workers, a
    private folder with the input every worker of the case reads, and its exports."""
    folder = Path(tempfile.mkdtemp(prefix=f"pkm-{case.name}-")) if options.isolate else None
    cache = None
    if options.cache_dir is not None:
        from conformance.export.cache import ExportCache

        cache = ExportCache(options.cache_dir)
    context = CaseContext(
        case, weights, export_dir=folder, weights_dir=weights_dir or case.spec.weights_file, cache=cache
    )
    try:
        if folder is not None:
            np.save(folder / "input.npy", golden.input, allow_pickle=False)
        yield context
    finally:
        context.close()
        gc.collect()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


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


class _Progress:
    """``[k/N] case path: status``, with the time so far and an estimate of the time left:
    the pairs still to run at the pace of those that ran since the first one finished (an
    unavailable pair costs nothing; worker start-up and exports come before the first)."""

    def __init__(self, total: int, progress: Progress | None):
        self.total, self.progress = total, progress
        self.done = self.ran = 0
        self.t0 = time.monotonic()
        self.first: float | None = None
        self._lock = threading.Lock()

    def __call__(self, case: str, result: PathResult, ran: bool = True) -> None:
        with self._lock:
            now = time.monotonic()
            self.done += 1
            self.ran += ran
            if ran and self.first is None:
                self.first = now
            if self.progress is None:
                return
            line = f"[{self.done}/{self.total}] {case} {result.name}: {result.status}"
            if ran and self.done < self.total:
                line += f"  ({_clock(now - self.t0)} so far"
                if self.ran > 1:
                    left = (now - self.first) / (self.ran - 1) * (self.total - self.done)
                    line += f", about {_clock(left)} left"
                line += ")"
            self.progress(line)

    def built(self, model: str, exporter: str, done: int, total: int, failure: str | None) -> None:
        """``[export k/N] model exporter: ready`` (built, or found in the cache; else refused,
        failed or not built: the paths that run it report why), with the time so far: the
        exports come before the paths that run them."""
        if self.progress is not None:
            status = "ready" if failure is None else failure
            self.progress(
                f"[export {done}/{total}] {model} {exporter}: {status}  ({_clock(time.monotonic() - self.t0)} so far)"
            )


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


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
    # a private folder in the temporary folder, held by a lock while this run lives: the
    # next run removes one a killed run left (xlm's weights: 800 MB)
    with staging_dir(Path(tempfile.gettempdir()), WEIGHTS_PREFIX) as weights_root:
        return _run_cases(cases, paths, goldens, weights_root, policy, options)


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
    progress = _Progress(len(cases) * len(paths), options.progress)
    if options.isolate and options.isolation == "family":
        return _run_families(cases, paths, goldens, weights, weights_root, policy, options, progress)
    results = []
    for case in cases:
        golden = goldens.pop(case.name)
        case_results = _run_case(
            case, golden, weights.pop(case.name), paths, policy, options, progress, weights_dir=weights_root / case.name
        )
        results.append(
            CaseResult(case.name, case_results, golden_sha256=golden.digest, coverage=golden_coverage(case, golden))
        )
    return RunResult(results, environment())


def golden_coverage(case: Case, golden: Golden) -> dict:
    """How many value-table rows the golden batch selects, of how many: what a verdict on
    the taps alone sees (the table sweep reads the rest)."""
    config, layers = case.config, case.spec.layers
    tables = 1 if config.share_values else layers
    names = ["indices"] if layers == 1 else [f"{i}/indices" for i in range(layers)]
    selected = [np.unique(golden.taps[n]) for n in names if n in golden.taps]
    if config.share_values:
        selected = [np.unique(np.concatenate(selected))] if selected else []
    return {"rows": tables * config.size, "rows_selected": int(sum(len(s) for s in selected))}


def _run_case(
    case: Case,
    golden: Golden,
    weights: dict[str, np.ndarray],
    paths: list[ExecutionPath],
    policy: TolerancePolicy,
    options: RunOptions,
    progress: _Progress,
    weights_dir: Path | None = None,
) -> list[PathResult]:
    """One case, path after path (in this process, or one process per path); ``weights_dir``:
    the folder ``weights`` are mapped from."""
    with case_context(case, golden, weights, options, weights_dir) as context:

        def one(path: ExecutionPath) -> PathResult:
            result = judge_path(path, context, golden, policy, options)
            progress(case.name, result)
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


# --- one worker per family ---------------------------------------------------------------
def exporter_family(exporter: str) -> str:
    """The family of workers that builds an export: torch's exporters need torch, the others TensorFlow."""
    return "torch" if exporter.startswith("torch-") else "tf"


@dataclasses.dataclass
class _Task:
    family: str
    run: Callable[[], None] = lambda: None
    after: list[_Task] = dataclasses.field(default_factory=list)  # builds this task runs on
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    refused: str | None = None  # a build that admission did not start: why


def _run_tasks(tasks: list[_Task], jobs: int, pool: WorkerPool) -> None:
    """``tasks`` on ``jobs`` threads, each task in list order once the tasks it comes
    after are done, and a task of a family in :data:`~conformance.pool.ONE_WORKER` only
    while no other of its family runs; a family's workers are closed once its last task
    is done."""
    pending = list(tasks)
    left = collections.Counter(t.family for t in tasks)
    running: collections.Counter[str] = collections.Counter()
    ready = threading.Condition()

    def startable(task: _Task) -> bool:
        return all(t.done.is_set() for t in task.after) and not (task.family in ONE_WORKER and running[task.family])

    def loop() -> None:
        while True:
            with ready:
                while True:
                    if not pending:
                        return
                    task = next((t for t in pending if startable(t)), None)
                    if task is not None:
                        pending.remove(task)
                        running[task.family] += 1
                        break
                    ready.wait()
            try:
                task.run()
            finally:
                task.done.set()
                with ready:
                    running[task.family] -= 1
                    left[task.family] -= 1
                    finished = left[task.family] == 0
                    ready.notify_all()
                if finished:
                    pool.retire(task.family)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as threads:
        for future in [threads.submit(loop) for _ in range(jobs)]:
            future.result()


def _run_families(
    cases: list[Case],
    paths: list[ExecutionPath],
    goldens: dict[str, Golden],
    weights: dict[str, dict[str, np.ndarray]],
    weights_root: Path,
    policy: TolerancePolicy,
    options: RunOptions,
    progress: _Progress,
) -> RunResult:
    """Every path on every case in long-lived workers, one family of paths each
    (:mod:`conformance.pool`): availability decided once per path and case, in one worker
    per family (an unavailable path starts nothing); every export that a path of another
    family runs built once, by a worker that has its exporter's framework, before those
    paths start; then the paths, family after family, ``options.jobs`` at a time."""
    pool = WorkerPool(options.timeout)
    results: dict[tuple[str, str], PathResult] = {}
    facts: dict = {}
    with contextlib.ExitStack() as stack:
        stack.callback(pool.close)
        # before a path is refused for memory, the idle workers give back the models they keep
        options.admission.reclaim = pool.close
        stack.callback(setattr, options.admission, "reclaim", None)
        contexts = {
            c.name: stack.enter_context(
                case_context(c, goldens[c.name], weights[c.name], options, weights_root / c.name)
            )
            for c in cases
        }
        families = list(dict.fromkeys(p.family for p in paths))
        unavailable = _availability(cases, paths, families, pool, options, facts)

        builds: dict[tuple[str, str], _Task] = {}
        built = _Counter(lambda: len(builds))
        runs: list[_Task] = []
        for family in families:
            for case in cases:
                for path in paths:
                    if path.family != family:
                        continue
                    key = (case.name, path.name)
                    if key in unavailable:
                        results[key] = unavailable[key]
                        progress(case.name, results[key], ran=False)
                        continue
                    task = _Task(family)
                    task.run = _path_task(
                        path, contexts[case.name], goldens[case.name], policy, options, pool, results, progress, task
                    )
                    exporter = getattr(path, "exporter", None)
                    if exporter is not None and exporter_family(exporter) != family:
                        for context in _export_contexts(path, contexts[case.name], goldens[case.name]):
                            key = (context.case.spec.name, exporter)
                            if key not in builds:
                                build = builds[key] = _Task(exporter_family(exporter))
                                build.run = _export_task(context, exporter, pool, options, progress, built, build)
                            task.after.append(builds[key])
                    runs.append(task)
        _run_tasks([*builds.values(), *runs], options.jobs, pool)
    case_results = [
        CaseResult(
            c.name,
            [results[(c.name, p.name)] for p in paths],
            golden_sha256=goldens[c.name].digest,
            coverage=golden_coverage(c, goldens[c.name]),
        )
        for c in cases
    ]
    return RunResult(case_results, environment(facts))


def _availability(
    cases: list[Case],
    paths: list[ExecutionPath],
    families: list[str],
    pool: WorkerPool,
    options: RunOptions,
    facts: dict,
) -> dict[tuple[str, str], PathResult]:
    """Every (case, path) that cannot run here, decided once per run: one ``check`` request
    per family, answered by that family's first worker (which then serves its paths)."""
    listed = [{"case": c.to_json(), "source": str(c.source)} for c in cases]
    out: dict[tuple[str, str], PathResult] = {}

    def probe(family: str) -> None:
        names = [p.name for p in paths if p.family == family]
        answer, why = pool.ask(family, {"op": "check", "family": family, "paths": names, "cases": listed})
        if answer is None or answer.get("status") != OK:
            why = why or (answer or {}).get("reason", "unknown")
            for name in names:
                for case in cases:
                    out[(case.name, name)] = PathResult(name, ERROR, reason=why)
            return
        found = answer.get("facts", {})
        facts.setdefault("versions", {}).update(found.pop("versions", {}))
        facts.update(found)
        for name in names:
            for case, reason in zip(cases, answer["reasons"][name], strict=True):
                if reason is not None:
                    out[(case.name, name)] = PathResult.unavailable(name, reason, options.required(name))

    with concurrent.futures.ThreadPoolExecutor(max_workers=options.jobs) as threads:
        list(threads.map(probe, families))
    return out


def _path_task(path, context, golden, policy, options, pool, results, progress, task: _Task) -> Callable[[], None]:
    def run() -> None:
        refused = next((b.refused for b in task.after if b.refused), None)
        try:
            if refused:  # its export did not fit: the path would make it itself, in a worker not sized for it
                result = PathResult.unavailable(path.name, refused, options.required(path.name))
            else:
                result = judge_path(path, context, golden, policy, options, pool=pool)
        except Exception as exc:  # judging raised: that path's error, the run goes on
            result = PathResult(path.name, ERROR, reason=f"{type(exc).__name__}: {exc}".strip())
        results[(context.case.name, path.name)] = result
        progress(context.case.name, result)

    return run


def _export_contexts(path: ExecutionPath, context: CaseContext, golden: Golden) -> list[CaseContext]:
    """The cases whose exports ``path`` runs on ``context``'s case: the case, and for a
    network judged layer by layer each later layer alone (:func:`golden_layer_case`),
    whose exports are built before the path too when they are cached (a layer's export
    in a private folder would not be found by the path)."""
    case = context.case
    if case.spec.layers == 1 or context.cache is None or not path.tolerances_per_layer(case):
        return [context]
    try:
        layers = [golden_layer_case(context, golden, i)[0] for i in range(1, case.spec.layers)]
    except Exception:  # (a full disk): the path meets it when it judges the layers, as its own error
        return [context]
    return [context, *(CaseContext(sub, weights_dir=sub.spec.weights_file, cache=context.cache) for sub in layers)]


class _Counter:
    """A thread-safe count of things done, out of ``total()``."""

    def __init__(self, total: Callable[[], int]):
        self.total, self.done = total, 0
        self._lock = threading.Lock()

    def __call__(self) -> tuple[int, int]:
        with self._lock:
            self.done += 1
            return self.done, self.total()


def _export_task(
    context: CaseContext,
    exporter: str,
    pool: WorkerPool,
    options: RunOptions,
    progress: _Progress,
    built: _Counter,
    task: _Task,
) -> Callable[[], None]:
    """Build ``exporter``'s export of the case into its folder. A failure is only shown as
    progress here: the paths that run the export meet it themselves and report it as theirs.
    A build that admission does not start sets ``task.refused``: its paths are unavailable."""
    case = context.case
    request = {
        "op": "export",
        "exporter": exporter,
        "case": case.to_json(),
        "source": str(case.source),
        "weights": str(context.weights_dir) if context.weights_dir is not None else None,
        "export_dir": str(context.export_dir or Path(context.weights_dir).parent),
        "cache_dir": str(context.cache.root) if context.cache else None,
    }

    def build() -> None:
        with options.admission.admit(estimate_export_bytes(context.case, exporter)) as refusal:
            if refusal is None:
                answer, why = pool.ask(exporter_family(exporter), request)
                status = (answer or {}).get("status")
                failure = None if status == OK else "refused" if status == UNAVAILABLE else "failed"
                if failure == "failed":
                    failure += f": {(why or (answer or {}).get('reason') or 'unknown')[:200]}"
            else:
                task.refused = f"its export {exporter} of {context.case.spec.name} was not built: {refusal}"
                failure = f"not built: {refusal}"
        progress.built(context.case.spec.name, exporter, *built(), failure)

    return build
