"""ONNX Runtime CPU on each export against torch eager, measured in one process.

    python -m conformance.export.speed [--preset xlm] [--shape 4,128,768] [--runs 20]
        [--exporter NAME]...

Exports the deployment variant of each exporter into a temporary folder, then times
torch eager (the reference) and one ONNX Runtime CPU session per export, interleaved
round by round so that machine noise hits every contender alike. Prints medians and
ratios to torch eager.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.export.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="xlm")
    parser.add_argument("--shape", default=None, help="input shape, e.g. 4,128,768 (default: the preset's)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--exporter", action="append", dest="exporters")
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime as ort
    import torch

    from conformance.export import ModelSpec, export
    from pkm_models import get_preset
    from pkm_models.torch_pkm import build_torch_model
    from pkm_models.weights import make_input

    preset = get_preset(args.preset)
    shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else preset.input_shape
    spec = ModelSpec.from_preset(preset)
    exporters = args.exporters or ["torch-fast", "torch-script", "torch-dynamo", "tf2onnx"]
    x = make_input(shape, seed=0)
    contenders = {}
    reference = build_torch_model(spec.config, spec.layers, spec.seed).eval()
    xt = torch.from_numpy(x)

    def torch_eager():
        with torch.inference_mode():
            return reference(xt)

    contenders["torch-eager-cpu"] = torch_eager
    with tempfile.TemporaryDirectory() as tmp:
        for name in exporters:
            print(f"exporting {name} ...", flush=True)
            report = export(spec, name, Path(tmp), tapped=False)
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            session = ort.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
            contenders[f"ort-cpu[{name}]"] = lambda s=session: s.run(None, {"input": x})[0]
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for fn in contenders.values():  # warm-up
            fn()
        for _ in range(args.runs):
            for k, fn in contenders.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["torch-eager-cpu"])
    print(
        f"\npreset {args.preset}, input {shape}, median of {args.runs} interleaved runs, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, {torch.get_num_threads()} threads"
    )
    print("| path | median (ms) | p10 (ms) | p90 (ms) | speed-up vs torch eager |\n|---|---|---|---|---|")
    for k, ts in times.items():
        q = np.quantile(ts, [0.1, 0.9]) * 1e3
        med = statistics.median(ts)
        print(f"| {k} | {med * 1e3:.1f} | {q[0]:.1f} | {q[1]:.1f} | {base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
