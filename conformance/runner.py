"""Running every selected path on every case and comparing with the golden; regenerating
goldens."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conformance.cases import Case
from conformance.compare import Comparison, TensorResult, compare_taps
from conformance.export import ExportUnsupported
from conformance.golden import GoldenError, GoldenStore, sha256
from conformance.isolation import run_json_worker
from conformance.paths import CaseContext, ExecutionPath, PathUnavailable
from conformance.tolerances import TolerancePolicy, path_matches
from pkm_models.config import TAPS

Progress = Callable[[str], None]


@dataclasses.dataclass
class PathResult:
    name: str
    status: str  # pass | fail | unavailable | error
    reason: str = ""
    first_divergence: str | None = None
    tensors: list[TensorResult] = dataclasses.field(default_factory=list)
    seconds: float | None = None
    errors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def worst(self) -> TensorResult | None:
        """The failing tap first in pipeline order, else the tap with the largest error
        relative to its tolerance."""
        failing = [t for t in self.tensors if not t]
        if failing:
            return failing[0]
        scored = [t for t in self.tensors if t.max_abs is not None and t.atol]
        return max(scored, key=lambda t: t.max_abs / t.atol, default=None)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "reason": self.reason,
            "first_divergence": self.first_divergence,
            "seconds": self.seconds,
            "tensors": [t.to_json() for t in self.tensors],
        }


@dataclasses.dataclass
class CaseResult:
    name: str
    paths: list[PathResult]
    golden: dict | None = None  # {"sha256": of the golden's case.json}: merge refuses reports of other goldens

    def to_json(self) -> dict:
        return {"name": self.name, "golden": self.golden, "paths": [p.to_json() for p in self.paths]}


@dataclasses.dataclass
class RunResult:
    cases: list[CaseResult]
    environment: dict

    @property
    def ok(self) -> bool:
        return all(p.status in ("pass", "unavailable") for c in self.cases for p in c.paths)

    def to_json(self) -> dict:
        return {"ok": self.ok, "environment": self.environment, "cases": [c.to_json() for c in self.cases]}


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
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "versions": versions,
        "providers": ort.get_available_providers(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "platform": platform.platform(),
        "machine": {"hostname": platform.node(), "cpu": cpu, "gpu": gpu},  # names the machine in a merge
    }


def _check_golden_matches_case(case: Case, meta: dict, store: GoldenStore) -> None:
    expected = case.to_json()
    stale = [k for k in ("config", "layers", "weight_seed", "duplicate_subkeys", "input") if meta.get(k) != expected[k]]
    if stale:
        raise GoldenError(
            f"{store.case_dir(case.name) / 'case.json'}: {stale} differ from {case.source}; the case changed "
            f"since its golden was made: run python -m conformance golden regenerate --case {case.name}"
        )


def _unavailable(name: str, reason: str, required: bool) -> PathResult:
    """``unavailable``, or a failure when the user required the path (``--require``)."""
    if required:
        return PathResult(name, "fail", reason=f"required but unavailable: {reason}")
    return PathResult(name, "unavailable", reason=reason)


def run_path(path: ExecutionPath, context: CaseContext, golden, policy: TolerancePolicy, required: bool) -> PathResult:
    case = context.case
    try:
        path.check(case)
        fn = path.prepare(context)
        t0 = time.perf_counter()
        got = fn(golden.input)
        seconds = time.perf_counter() - t0
    except (PathUnavailable, ExportUnsupported) as exc:
        return _unavailable(path.name, str(exc), required)
    except Exception as exc:
        return PathResult(path.name, "error", reason=f"{type(exc).__name__}: {exc}".strip())
    return _compare(path.name, case, got, golden, context.weights, policy, seconds)


def _compare(path_name: str, case: Case, got, golden, weights, policy, seconds) -> PathResult:
    layer = "" if case.spec.layers == 1 else f"layers.{case.spec.layers - 1}."
    comparison: Comparison = compare_taps(
        got,
        golden.taps,
        config=case.config,
        keys=weights[layer + "keys"],
        values=weights[layer + "values.weight"],
        policy=policy,
        case=case.name,
        path=path_name,
    )
    reason = ""
    if not comparison.ok:
        bad = next(t for t in comparison.tensors if not t)
        reason = f"{bad.name}: {bad.message}"
    return PathResult(
        path_name,
        "pass" if comparison.ok else "fail",
        reason=reason,
        first_divergence=comparison.first_divergence,
        tensors=comparison.tensors,
        seconds=seconds,
        errors=comparison.errors,
    )


def run_path_isolated(
    path: ExecutionPath,
    context: CaseContext,
    golden,
    policy: TolerancePolicy,
    required: bool,
    timeout: float,
    golden_dir: Path,
) -> PathResult:
    """``run_path`` in a fresh process (``conformance.paths.worker``), sharing the
    context's export folder."""
    case = context.case
    try:
        path.check(case)
    except PathUnavailable as exc:
        return _unavailable(path.name, str(exc), required)
    with tempfile.TemporaryDirectory(prefix="pkm-taps-") as tmp:
        out = Path(tmp) / "taps.npz"
        request = {
            "cases_dir": str(case.source.parent),
            "case": case.name,
            "golden_dir": str(golden_dir),
            "path": path.name,
            "export_dir": str(context.export_dir),
            "out": str(out),
        }
        result, why = run_json_worker("conformance.paths.worker", request, timeout)
        if result is None:
            return PathResult(path.name, "error", reason=why)
        if result["status"] == "unavailable":
            return _unavailable(path.name, result["reason"], required)
        if result["status"] != "ran":
            return PathResult(path.name, "error", reason=result.get("reason", "unknown"))
        with np.load(out) as data:
            got = {k: data[k] for k in data.files}
    return _compare(path.name, case, got, golden, context.weights, policy, result["seconds"])


def run_conformance(
    cases: list[Case],
    paths: list[ExecutionPath],
    store: GoldenStore,
    policy: TolerancePolicy,
    require: list[str] | None = None,
    progress: Progress | None = None,
    isolate: bool = True,
    timeout: float = 1800,
    jobs: int = 1,
) -> RunResult:
    """Every path on every case. Golden problems raise GoldenError before anything runs.

    With ``isolate`` every available path runs in its own process (sharing the case's
    exports through a folder), so a crash is that path's ``error``; ``jobs`` of them at
    a time (their timings then share the machine)."""
    goldens, digests = {}, {}
    for case in cases:  # all goldens are checked first: bad data is exit 2, not a failed path
        golden = store.read(case.name)
        digests[case.name] = {"sha256": sha256(store.case_dir(case.name) / "case.json")}
        _check_golden_matches_case(case, golden.meta, store)
        goldens[case.name] = golden
    results = []
    counter = iter(range(1, len(cases) * len(paths) + 1))
    total = len(cases) * len(paths)
    for case in cases:

        def report(result: PathResult, case: Case = case) -> None:
            if progress:
                progress(f"[{next(counter)}/{total}] {case.name} {result.name}: {result.status}")

        case_results = _run_case(
            case, goldens[case.name], paths, store, policy, require, isolate, timeout, jobs, report
        )
        results.append(CaseResult(case.name, case_results, golden=digests[case.name]))
    return RunResult(results, environment())


def _run_case(case, golden, paths, store, policy, require, isolate, timeout, jobs, report) -> list[PathResult]:
    weights = golden.weights if golden.weights is not None else case.spec.weights()
    export_dir = Path(tempfile.mkdtemp(prefix=f"pkm-{case.name}-")) if isolate else None
    context = CaseContext(case, weights, export_dir=export_dir)

    def one(path: ExecutionPath) -> PathResult:
        required = any(path_matches(path.name, g) for g in require or [])
        if isolate:
            result = run_path_isolated(path, context, golden, policy, required, timeout, store.root)
        else:
            result = run_path(path, context, golden, policy, required)
        report(result)
        return result

    try:
        if not (isolate and jobs > 1):
            return [one(path) for path in paths]
        # exports first, once, so that concurrent workers find them made
        for path in paths:
            exporter = getattr(path, "exporter", None)
            if exporter:
                with contextlib.suppress(Exception):  # a failing export is its paths' result
                    path.check(case)
                    context.export(exporter)
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(one, paths))
    finally:
        context.close()
        gc.collect()
        if export_dir is not None:
            shutil.rmtree(export_dir, ignore_errors=True)


# --- regeneration --------------------------------------------------------------------------
class DriftError(GoldenError):
    """The regenerated golden differs from the stored one beyond tolerance."""


def reference_taps(case: Case, weights: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    from pkm_models.torch_pkm import build_torch_model

    model = build_torch_model(case.config, case.spec.layers, seed=None)
    model.load_weights(weights)
    model.eval()
    with torch.inference_mode():
        taps = model(torch.from_numpy(x), return_taps=True)
    return {k: taps[k].numpy() for k in TAPS}


def regenerate(
    case: Case,
    store: GoldenStore,
    policy: TolerancePolicy,
    accept_drift: bool = False,
    progress: Progress | None = None,
) -> Comparison | None:
    """Regenerate one case's golden; returns the drift against the old one (None if there
    was no readable old one). Raises DriftError, leaving the old golden, when the drift is
    beyond tolerance and ``accept_drift`` is False."""
    say = progress or (lambda _: None)
    weights = case.spec.weights()
    x = case.make_input()
    taps = reference_taps(case, weights, x)
    previous, drift = None, None
    try:
        old = store.read(case.name)
        previous = old.meta
    except GoldenError as exc:
        if store.case_dir(case.name).exists():
            say(f"{case.name}: the previous golden is unusable and will be replaced ({exc})")
        else:
            say(f"{case.name}: new case, no previous golden")
    else:
        old_weights = old.weights if old.weights is not None else weights
        if old.input.shape == x.shape and all(old_weights[k].shape == weights[k].shape for k in weights):
            drift = compare_taps(
                taps,
                old.taps,
                config=case.config,
                keys=weights["keys"],
                values=weights["values.weight"],
                policy=policy,
                case=case.name,
                path="torch-eager-cpu",
            )
            for t in drift.tensors:
                say(
                    f"{case.name}: drift {t.name:8s} max abs {t.max_abs if t.max_abs is not None else float('nan'):.3g}"
                    f"  {t.status}{'  ' + t.message if t.message else ''}"
                )
            if not drift.ok and not accept_drift:
                raise DriftError(
                    f"{case.name}: the new golden drifted beyond tolerance from the stored one (first at "
                    f"{drift.first_divergence!r}); the old golden is kept. Pass --accept-drift to replace it."
                )
        else:
            say(f"{case.name}: input or weight shapes changed; drift not comparable")

    model_writer = None
    if case.store_weights:

        def model_writer(target: Path) -> None:
            from conformance.export import export

            with tempfile.TemporaryDirectory() as tmp:
                report = export(case.spec, "torch-fast", Path(tmp), tapped=True)
                shutil.move(report.path, target)

    store.write(case, taps, x, weights if case.store_weights else None, model_writer, previous)
    say(f"{case.name}: wrote {store.case_dir(case.name)}")
    return drift
