"""``python -m conformance bench``: the speed of every execution path, each in its own process.

Presets (of the benchmark, not of the model):

=========  =====================================================  ============  ======
preset     model                                                  input         runs
=========  =====================================================  ============  ======
``seed``   the seed README's net: 6 XLM-default layers, 768->768  (16,256,768)  100
``cpu``    one XLM-default layer, 768 -> 768                      (4,128,768)   20
``tiny``   the tiny preset                                        (3,5,16)      5
=========  =====================================================  ============  ======

Every path runs in a fresh process (``conformance.bench.worker``): one path's memory does
not count against the next, and a crash is that path's result. A worker prepares the path
(export, session, compilation, the input copied to the path's device: untimed), runs the
warm-up passes, then times each pass (``ExecutionPath.prepare_timed``): outputs stay on
the device, CUDA paths synchronise before the clock stops, and ONNX Runtime runs with
I/O binding, so host copies are not what is timed. Peak device memory is the driver's figure for the
worker process (``nvidia-smi``, sampled while the path is prepared and runs, its CUDA
context included; inside a container, the rise of the GPUs' used memory), the same for
every runtime. The parent measures the machine's memory
bandwidth (a large copy) and reports, for each path, the bandwidth its value-row reads
achieve as a fraction of it: PKM is memory-bound.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from conformance.isolation import run_json_worker
from conformance.paths import ExecutionPath
from conformance.results import ERROR, OK
from pkm_models.config import get_preset
from pkm_models.errors import PKMError


class BenchError(PKMError):
    pass


@dataclasses.dataclass(frozen=True)
class BenchPreset:
    name: str
    model: str  # a model preset, or "case:<name>" for a conformance case (from_case)
    input_shape: tuple[int, ...]
    runs: int
    warmup: int
    description: str
    case_json: dict | None = dataclasses.field(default=None, compare=False)  # Case.to_json of a case
    case_source: str = ""

    @classmethod
    def from_case(cls, case, runs: int = 5, warmup: int = 1) -> BenchPreset:
        """A conformance case benchmarked as it is: its model (a seed's or a user's
        checkpoint) on its input's shape."""
        return cls(
            case.name,
            f"case:{case.name}",
            tuple(case.input_shape),
            runs,
            warmup,
            case.description,
            case.to_json(),
            str(case.source),
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def case(self):
        """This preset as a conformance case (the model preset's weights, input seed 0),
        or the conformance case it was made from."""
        from conformance.cases import Case
        from conformance.spec import ModelSpec

        if self.case_json is not None:
            return Case.from_json(self.case_json, Path(self.case_source))
        spec = ModelSpec.from_preset(get_preset(self.model))
        return Case(self.name, self.description, spec, self.input_shape, 0, False, Path(f"<bench {self.name}>"))

    @property
    def layers(self) -> int:
        return self.case_json["layers"] if self.case_json is not None else get_preset(self.model).layers

    @property
    def tokens(self) -> int:
        n = 1
        for d in self.input_shape[:-1]:
            n *= d
        return n

    def value_bytes(self) -> int:
        """Bytes of value rows one forward pass reads: tokens x heads x knn x v_dim x 4 per layer."""
        c = self.case().config
        return self.tokens * c.heads * c.knn * c.v_dim * 4 * self.layers


BENCH_PRESETS = {
    p.name: p
    for p in (
        BenchPreset("seed", "seed-bench", (16, 256, 768), 100, 5, "the seed README's benchmark (meant for a GPU)"),
        BenchPreset("cpu", "xlm", (4, 128, 768), 20, 3, "one XLM-default layer; minutes on 2 CPU cores"),
        BenchPreset("tiny", "tiny", (3, 5, 16), 5, 1, "seconds; for tests"),
    )
}


def get_bench_preset(name: str) -> BenchPreset:
    try:
        return BENCH_PRESETS[name]
    except KeyError:
        raise BenchError(f"unknown bench preset {name!r}; available: {sorted(BENCH_PRESETS)}") from None


def time_calls(fn, runs: int) -> list[float]:
    """Seconds taken by each of ``runs`` calls of ``fn()``."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(times: list[float]) -> dict:
    """Median, p10 and p90 of per-pass times (seconds), and their count."""
    return {
        "median_s": statistics.median(times),
        "p10_s": percentile(times, 0.1),
        "p90_s": percentile(times, 0.9),
        "runs": len(times),
    }


def pool_rounds(results: list[dict]) -> dict:
    """One path's results from several rounds: the first that is not ``ok`` if any, else
    one result over all their passes (peak memories: the largest)."""
    for r in results:
        if r.get("status") != OK:
            return r
    times = [t for r in results for t in r["times_s"]]
    devices = [r["peak_device_mb"] for r in results if r.get("peak_device_mb") is not None]
    return {
        **results[0],
        **summarize(times),
        "times_s": times,
        "round_medians_s": [r["median_s"] for r in results],
        "peak_host_mb": max(r["peak_host_mb"] for r in results),
        "peak_device_mb": max(devices) if devices else None,
    }


def default_tolerances() -> Path:
    """The tolerances a judged bench path is held to: the golden store's."""
    from conformance.golden import GoldenStore

    return GoldenStore(None).root / "tolerances.toml"


def run_worker(
    preset: BenchPreset,
    path: str,
    runs: int,
    warmup: int,
    export_dir: Path,
    timeout: float,
    tolerances: Path | None = None,
    sweep: bool = False,
) -> dict:
    """One path in a fresh process; its crash or time-out is its result."""
    request = {"preset": preset.to_json(), "path": path, "runs": runs, "warmup": warmup, "export_dir": str(export_dir)}
    request["sweep"] = sweep
    request["tolerances"] = str(tolerances or default_tolerances())
    result, why = run_json_worker("conformance.bench.worker", request, timeout)
    return {"name": path, **result} if result is not None else {"name": path, "status": ERROR, "reason": why}


def run_bench(
    preset: BenchPreset,
    paths: list[ExecutionPath],
    runs: int | None = None,
    warmup: int | None = None,
    timeout: float = 1800,
    progress=None,
    rounds: int = 1,
    tolerances: Path | None = None,
    sweep: bool = False,
) -> dict:
    """Time ``paths``, each in fresh processes. ``sweep``: also time each path's table
    sweep (:mod:`conformance.sweep`) against numpy reading the same tables once. With
    ``rounds`` > 1 every path runs that many times, the paths taking turns round by round,
    and each path's passes are pooled: a machine that drifts during the run then shifts
    every path alike.

    A path that is ``judged_in_bench`` (a sharded one) is also judged, under ``tolerances``
    (default: the golden store's ``tolerances.toml``), against the reference's taps of the
    bench's input: a failure is its result (``fail``), not a time."""
    tolerances = tolerances or default_tolerances()
    runs = preset.runs if runs is None else runs
    warmup = preset.warmup if warmup is None else warmup
    for option, value, least in (("--runs", runs, 1), ("--rounds", rounds, 1), ("--warmup", warmup, 0)):
        if value < least:
            raise BenchError(f"{option} must be >= {least}, got {value}")
    from conformance.bench import machine
    from conformance.environment import environment

    figures = machine.measure(machine.gathered_bytes(preset))  # what explains this machine's figures
    bandwidth = figures["copy_gb_per_s"]
    done: dict[str, list[dict]] = {p.name: [] for p in paths}
    total, step = rounds * len(paths), 0
    with tempfile.TemporaryDirectory(prefix="pkm-bench-") as export_dir:
        for round_ in range(rounds):
            for path in paths:
                previous = done[path.name]
                if previous and previous[-1].get("status") != OK:
                    continue  # unavailable or failed: once is enough
                if progress:
                    progress(step, total, path.name + (f" (round {round_ + 1}/{rounds})" if rounds > 1 else ""))
                previous.append(
                    run_worker(preset, path.name, runs, warmup, Path(export_dir), timeout, tolerances, sweep)
                )
                step += 1
        if progress:
            progress(total, total, "")
    results = [pool_rounds(done[p.name]) for p in paths]
    value_bytes = preset.value_bytes()
    eager = {r["device"]: r["median_s"] for r in results if r.get("status") == OK and r.get("eager_reference")}
    for r in results:
        if r.get("status") != OK:
            continue
        r["tokens_per_s"] = preset.tokens / r["median_s"]
        r["value_gb_per_s"] = value_bytes / r["median_s"] / 1e9
        r["fraction_of_memory_bandwidth"] = r["value_gb_per_s"] / bandwidth
        base = eager.get(r["device"])
        r["ratio_to_torch_eager"] = base / r["median_s"] if base else None
        r[f"time_{preset.runs}_runs_s"] = r["median_s"] * preset.runs
    return {
        "preset": preset.name,
        "model": preset.model,
        "input_shape": list(preset.input_shape),
        "runs": runs,
        "rounds": rounds,
        "warmup": warmup,
        "value_bytes_per_pass": value_bytes,
        "memory_bandwidth_gb_per_s": bandwidth,
        "machine": {**environment(), **figures},
        "paths": results,
    }
