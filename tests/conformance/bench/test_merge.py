"""``python -m conformance merge`` on bench.json files: machines side by side, ratios only
within one machine."""

import json
import re

import pytest

from conformance.cli import main


def bench(host: str, gpu: str | None, results: dict, preset: str = "tiny", bandwidth: float = 10.0) -> dict:
    """A bench.json as ``bench --report-dir`` writes it; ``results`` maps a path to its median
    seconds and ratio to torch eager, or to a status that is not ok."""
    paths = []
    for name, r in results.items():
        if isinstance(r, str):
            paths.append({"name": name, "status": r, "reason": f"{r} on {host}"})
            continue
        median, ratio = r
        paths.append(
            {
                "name": name,
                "status": "ok",
                "reason": "",
                "median_s": median,
                "p10_s": median,
                "p90_s": median,
                "runs": 3,
                "times_s": [median] * 3,
                "ratio_to_torch_eager": ratio,
                "fraction_of_memory_bandwidth": 0.25,
            }
        )
    machine = {
        "cpu": "some CPU",
        "gpu": gpu,
        "versions": {},
        "machine": {"hostname": host, "cpu": "some CPU", "gpu": gpu},
    }
    return {
        "preset": preset,
        "model": preset,
        "input_shape": [3, 5, 16],
        "runs": 3,
        "rounds": 1,
        "warmup": 1,
        "value_bytes_per_pass": 1000,
        "memory_bandwidth_gb_per_s": bandwidth,
        "machine": machine,
        "paths": paths,
    }


def files(tmp_path, *benches) -> list[str]:
    out = []
    for i, b in enumerate(benches):
        path = tmp_path / f"bench{i}.json"
        path.write_text(json.dumps(b))
        out.append(str(path))
    return out


CPU = bench(
    "ci",
    None,
    {"torch-eager-cpu": (0.004, 1.0), "ort-cpu[torch-fast]": (0.002, 2.0), "torch-eager-cuda": "unavailable"},
)
GPU = bench(
    "gpu-box",
    "NVIDIA H100",
    {"torch-eager-cpu": (0.006, 1.0), "torch-eager-cuda": (0.0005, 1.0), "torch-compile-cuda": (0.00025, 2.0)},
    bandwidth=3000.0,
)


def test_machines_side_by_side_with_their_own_ratios(tmp_path, capsys):
    out_dir = tmp_path / "merged"
    assert main(["merge", *files(tmp_path, CPU, GPU), "--report-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    merged = json.loads((out_dir / "bench.json").read_text())
    assert [m["name"] for m in merged["machines"]] == ["ci (some CPU)", "gpu-box (NVIDIA H100)"]
    assert [m["memory_bandwidth_gb_per_s"] for m in merged["machines"]] == [10.0, 3000.0]
    by_path = {p["name"]: {r["machine"]: r for r in p["results"]} for p in merged["paths"]}
    assert list(by_path) == ["torch-eager-cpu", "ort-cpu[torch-fast]", "torch-eager-cuda", "torch-compile-cuda"]
    eager = by_path["torch-eager-cpu"]
    assert eager["ci (some CPU)"]["median_s"] == 0.004 and eager["gpu-box (NVIDIA H100)"]["median_s"] == 0.006
    assert eager["gpu-box (NVIDIA H100)"]["ratio_to_torch_eager"] == 1.0  # each machine's own, never across
    assert by_path["torch-eager-cuda"]["ci (some CPU)"]["status"] == "unavailable"
    assert "times_s" not in eager["ci (some CPU)"]
    md = (out_dir / "bench.md").read_text()
    assert "| path | ci (some CPU) | gpu-box (NVIDIA H100) |" in md
    assert "| torch-compile-cuda | - | 0.25 ms (2.00x, 25.0% bw) |" in md
    assert "| torch-eager-cuda | unavailable | 0.50 ms (1.00x, 25.0% bw) |" in md
    assert re.search(r"^ort-cpu\[torch-fast\] +2\.00 ms \(2\.00x, 25\.0% bw\) +-$", out, re.M)
    assert sorted(p.name for p in out_dir.iterdir()) == ["bench.json", "bench.md"]


def test_an_error_on_one_machine_fails_the_merge(tmp_path, capsys):
    broken = bench("gpu-box", "NVIDIA H100", {"torch-eager-cuda": "error"})
    assert main(["merge", *files(tmp_path, CPU, broken)]) == 1
    assert "torch-eager-cuda on gpu-box (NVIDIA H100): error: error on gpu-box" in capsys.readouterr().out


@pytest.mark.parametrize(
    "other, message",
    [
        (bench("gpu-box", "H100", {}, preset="seed"), "benchmarks something else"),
        ({**CPU, "paths": "x"}, "not a bench.json"),
        ({k: v for k, v in CPU.items() if k != "runs"}, "not a bench.json (no ['runs'])"),
        (
            {**CPU, "paths": [{"name": "torch-eager-cpu", "status": "ok"}]},
            "its median_s, ratio or fraction is not a number",
        ),
    ],
)
def test_benches_that_do_not_merge_exit_2(tmp_path, capsys, other, message):
    assert main(["merge", *files(tmp_path, CPU, other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_a_merged_bench_is_not_merged_again(tmp_path, capsys):
    assert main(["merge", *files(tmp_path, CPU, GPU), "--report-dir", str(tmp_path / "m")]) == 0
    assert main(["merge", str(tmp_path / "m" / "bench.json"), files(tmp_path, CPU)[0]]) == 2
    assert "itself a merged bench" in capsys.readouterr().err
