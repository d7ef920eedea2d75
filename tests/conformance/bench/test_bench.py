"""The bench command on the tiny preset: schema, isolation, and failures as results."""

import json
import sys

import pytest

import conformance.bench
from conformance.bench import (
    BENCH_PRESETS,
    BenchError,
    get_bench_preset,
    pool_rounds,
    run_bench,
    run_worker,
)
from conformance.cli import main
from conformance.paths import PathSelectionError, select_paths
from tests.conftest import HAS_CUDA_DRIVER

TINY = get_bench_preset("tiny")


@pytest.fixture(scope="module")
def bench():
    paths = select_paths(
        ["torch-eager-cpu", "ort-cpu[torch-fast]", "tf-seed-baseline-function-cpu", "*cuda", "ort-cuda[*]"],
        bench=True,
    )
    return run_bench(TINY, paths, runs=3, warmup=1)


def test_schema(bench):
    assert bench["preset"] == "tiny" and bench["runs"] == 3
    machine = bench["machine"]
    assert {"cpu", "gpu", "versions", "cpu_model", "cpu_flags", "usable_cores", "first_touch"} <= set(machine)
    assert machine["torch_threads"] >= 1 and machine["onnxruntime_intra_op_threads"] >= 1
    assert machine["copy_gb_per_s"] == bench["memory_bandwidth_gb_per_s"]
    assert machine["first_touch"]["bytes"] == 15 * 2 * 4 * 8 * 4  # tiny: tokens x heads x knn x v_dim x 4 B
    assert bench["memory_bandwidth_gb_per_s"] > 0.5
    by_name = {p["name"]: p for p in bench["paths"]}
    eager = by_name["torch-eager-cpu"]
    keys = {"name", "status", "reason", "median_s", "p10_s", "p90_s", "runs", "tokens_per_s", "peak_host_mb"}
    assert keys | {"peak_device_mb", "ratio_to_torch_eager"} <= set(eager)
    assert eager["status"] == "ok" and eager["ratio_to_torch_eager"] == 1.0
    assert eager["precision"] == "fp32" and eager["model_bytes"] == TINY.case().spec.weight_bytes
    assert eager["p10_s"] <= eager["median_s"] <= eager["p90_s"]
    assert eager["tokens_per_s"] == pytest.approx(15 / eager["median_s"])
    assert 0 < eager["fraction_of_memory_bandwidth"] < 1
    assert by_name["ort-cpu[torch-fast]"]["status"] == "ok"
    assert by_name["tf-seed-baseline-function-cpu"]["status"] == "ok"
    cuda = by_name["ort-cuda[torch-fast]"]
    if HAS_CUDA_DRIVER:  # it may run here
        assert cuda["status"] == "ok" or "CUDAExecutionProvider" in cuda["reason"], cuda
    else:
        assert cuda["status"] == "unavailable" and "CUDAExecutionProvider: no NVIDIA driver" in cuda["reason"]


def test_reports(bench, tmp_path):
    from conformance.bench import report

    files = report.write(bench, tmp_path)
    assert [f.name for f in files] == ["bench.json", "bench.md", "bench.png"]
    assert json.loads((tmp_path / "bench.json").read_text())["preset"] == "tiny"
    md = (tmp_path / "bench.md").read_text()
    assert "## Machine" in md and "First touch of a fresh" in md
    assert "| torch-eager-cpu | ok | " in md and "time (5 runs)" not in md  # the preset's run count is 5, ran 3
    assert (tmp_path / "bench.png").stat().st_size > 1000


def _fake_interpreter(tmp_path, monkeypatch, body: str) -> None:
    """Make the workers run ``body`` (a shell script) instead of Python."""
    script = tmp_path / "worker.sh"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))


def test_a_crashing_path_is_that_paths_error(tmp_path, monkeypatch):
    _fake_interpreter(tmp_path, monkeypatch, "echo 'about to crash' >&2\nkill -SEGV $$")
    result = run_worker(TINY, "torch-eager-cpu", 1, 0, tmp_path, timeout=60)
    assert result["status"] == "error"
    assert "died of SIGSEGV" in result["reason"] and "about to crash" in result["reason"]


def test_a_hung_path_times_out(tmp_path, monkeypatch):
    _fake_interpreter(tmp_path, monkeypatch, "sleep 30")
    result = run_worker(TINY, "torch-eager-cpu", 1, 0, tmp_path, timeout=1)
    assert result == {"name": "torch-eager-cpu", "status": "error", "reason": "timed out after 1 s"}


def test_presets_and_selection():
    assert set(BENCH_PRESETS) == {"seed", "cpu", "tiny"}
    seed = get_bench_preset("seed")
    assert (seed.input_shape, seed.runs) == ((16, 256, 768), 100)
    assert seed.value_bytes() == 6 * 4096 * 4 * 32 * 768 * 4  # 1.6 GB per layer, 6 layers
    with pytest.raises(BenchError, match=r"unknown bench preset 'gpu'; available: \['cpu', 'seed', 'tiny'\]"):
        get_bench_preset("gpu")
    with pytest.raises(PathSelectionError, match=r"--path 'jax\*' matches no execution path"):
        select_paths(["jax*"], bench=True)
    assert not any(p.name.startswith("onnx-reference") for p in select_paths(None, bench=True))


def test_cli_usage_errors(capsys):
    assert main(["bench", "--preset", "gpu"]) == 2
    assert "unknown bench preset 'gpu'" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--runs", "0", "--path", "torch-eager-cpu"]) == 2
    assert "--runs must be >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--rounds", "0", "--path", "torch-eager-cpu"]) == 2
    assert "--rounds must be >= 1, got 0" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--warmup", "-1", "--path", "torch-eager-cpu"]) == 2
    assert "--warmup must be >= 0, got -1" in capsys.readouterr().err


def test_rounds_take_turns_and_pool_every_pass(monkeypatch):
    calls = []
    real = conformance.bench.run_worker

    def recording(preset, path, *args, **kwargs):
        calls.append(path)
        return real(preset, path, *args, **kwargs)

    monkeypatch.setattr(conformance.bench, "run_worker", recording)
    unavailable = [p for p in select_paths(None, bench=True) if _unavailable_here(p)][:1]  # none on a full GPU machine
    paths = [*select_paths(["torch-eager-cpu", "tf-function-cpu"], bench=True), *unavailable]
    bench = run_bench(TINY, paths, runs=3, warmup=0, rounds=2)
    # turns: every path once per round; an unavailable one is not asked again
    names = [p.name for p in paths]
    assert calls == [*names, "torch-eager-cpu", "tf-function-cpu"]
    by_name = {p["name"]: p for p in bench["paths"]}
    assert bench["rounds"] == 2 and bench["runs"] == 3
    eager = by_name["torch-eager-cpu"]
    assert eager["runs"] == len(eager["times_s"]) == 6 and len(eager["round_medians_s"]) == 2
    assert eager["p10_s"] <= eager["median_s"] <= eager["p90_s"]
    assert all(by_name[p.name]["status"] == "unavailable" for p in unavailable)


def _unavailable_here(path) -> bool:
    from conformance.paths import PathUnavailable

    try:
        path.check(None)
    except PathUnavailable:
        return True
    return False


def test_pooling_rounds():
    ok = {"name": "p", "status": "ok", "peak_device_mb": None}
    pooled = pool_rounds(
        [
            {**ok, "times_s": [1.0, 2.0], "median_s": 1.5, "peak_host_mb": 10},
            {**ok, "times_s": [3.0, 4.0, 5.0], "median_s": 4.0, "peak_host_mb": 30, "peak_device_mb": 7},
        ]
    )
    assert pooled["times_s"] == [1.0, 2.0, 3.0, 4.0, 5.0] and pooled["runs"] == 5
    assert pooled["median_s"] == 3.0 and pooled["p10_s"] == pytest.approx(1.4) and pooled["p90_s"] == pytest.approx(4.6)
    assert pooled["round_medians_s"] == [1.5, 4.0]
    assert pooled["peak_host_mb"] == 30 and pooled["peak_device_mb"] == 7
    failed = {"name": "p", "status": "error", "reason": "timed out"}
    assert pool_rounds([{**ok, "times_s": [1.0], "median_s": 1.0, "peak_host_mb": 1}, failed]) == failed


def test_a_case_is_benchmarked_as_it_is(capsys, tmp_path):
    """``bench --case``: the shipped trained checkpoint case, on its input's shape; the peak
    host memory is that of the worker's whole tree, at least the weights it read."""
    code = main(["bench", "--case", "trained", "--path", "torch-eager-cpu", "--runs", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "torch-eager-cpu" in out
    from pathlib import Path

    from conformance.bench import BenchPreset
    from conformance.cases import load_cases

    (case,) = load_cases(Path(__file__).resolve().parents[3] / "conformance" / "cases", ["trained"])
    preset = BenchPreset.from_case(case, runs=2, warmup=0)
    result = run_bench(preset, select_paths(["torch-eager-cpu"], bench=True))
    (eager,) = result["paths"]
    assert eager["status"] == "ok", eager
    assert result["model"] == "case:trained" and result["input_shape"] == list(case.input_shape)
    assert eager["model_bytes"] == case.spec.weight_bytes
    assert eager["peak_host_mb"] * 2**20 > case.spec.weight_bytes


def test_bench_takes_a_preset_or_a_case(capsys):
    assert main(["bench", "--preset", "tiny", "--case", "tiny"]) == 2
    assert "--preset or --case" in capsys.readouterr().err
