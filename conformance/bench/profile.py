"""Where ONNX Runtime spends a pass: the kernel time of each operator type in one export.

    python -m conformance.bench.profile [--preset cpu] [--exporter torch-fast] [--runs 10]

Runs the export the bench times (tapped, on the preset's input) with ONNX Runtime's
profiler, on the CPU provider, and prints per operator type the median over ``--runs``
passes (after 2 warm-up) of its kernels' time in a pass, with the whole pass's median.
A ``Loop``'s time includes the kernels of its body, which are listed under their own
types too; the total of all kernels counts them once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

WARMUP = 2
CONTROL_FLOW = {"Loop", "If", "Scan"}  # their time includes their bodies' kernels


def profile(preset_name: str, exporter: str, runs: int, export_dir: Path) -> dict:
    """``{"ops": [(op_type, kernels per pass, median ms per pass)], "kernels_ms",
    "kernels_per_pass", "pass_ms"}``, the ops slowest first; ``kernels_ms`` leaves out
    control-flow ops, whose bodies' kernels are counted under their own types."""
    import onnxruntime as ort

    from conformance.bench import get_bench_preset
    from conformance.paths import CaseContext
    from conformance.paths.ort_paths import session_options
    from pkm_models.weights import make_input

    bench = get_bench_preset(preset_name)
    case = bench.case()
    model = CaseContext(case, case.spec.weights, export_dir=export_dir).export(exporter)

    options = session_options()
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="pkm-ort-profile-") as trace_dir:
        options.profile_file_prefix = str(Path(trace_dir) / "ort-profile")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        x = make_input(bench.input_shape, seed=0)
        for _ in range(WARMUP + runs):
            session.run(None, {"input": x})
        events = json.loads(Path(session.end_profiling()).read_text())

    passes = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[WARMUP:]
    per_pass = [defaultdict(float) for _ in passes]
    counts = [defaultdict(int) for _ in passes]
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        for i, (start, end) in enumerate(passes):
            if start <= e["ts"] <= end:
                per_pass[i][e["args"]["op_name"]] += e["dur"] / 1e3
                counts[i][e["args"]["op_name"]] += 1
                break
    ops = sorted({op for p in per_pass for op in p})
    rows = [(op, counts[0][op], statistics.median(p[op] for p in per_pass)) for op in ops]
    return {
        "model": str(model),
        "ops": sorted(rows, key=lambda r: -r[2]),
        "kernels_ms": sum(ms for op, _, ms in rows if op not in CONTROL_FLOW),
        "kernels_per_pass": [sum(c.values()) for c in counts],
        "pass_ms": statistics.median((end - start) / 1e3 for start, end in passes),
    }


def main(argv: list[str] | None = None) -> int:
    from conformance.bench import BENCH_PRESETS
    from conformance.export import EXPORTER_NAMES

    parser = argparse.ArgumentParser(prog="python -m conformance.bench.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(BENCH_PRESETS))
    parser.add_argument("--exporter", default="torch-fast", choices=EXPORTER_NAMES)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--export-dir", type=Path, help="reuse (or keep) the export here; default: a temporary folder")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    from conformance.isolation import quiet_third_party

    quiet_third_party(verbose=False)
    with tempfile.TemporaryDirectory(prefix="pkm-profile-") as tmp:
        export_dir = args.export_dir or Path(tmp)
        export_dir.mkdir(parents=True, exist_ok=True)
        result = profile(args.preset, args.exporter, args.runs, export_dir)
    print(f"ONNX Runtime CPU, {args.exporter} export, preset {args.preset}: median of {args.runs} passes")
    print("| op type | kernels per pass | ms per pass |\n|---|---|---|")
    for op, count, ms in result["ops"]:
        print(f"| {op} | {count} | {ms:.2f} |")
    print(f"| all kernels | | {result['kernels_ms']:.2f} |\n| whole pass | | {result['pass_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
