"""Time and peak memory of the Keras port's weighted-sum methods.

    python -m conformance.bench.methods [--preset xlm] [--shape 4,128,768] [--runs 10]

Each (method, mode) runs in its own process. Peak memory is the rise of the process's
resident-set high-water mark over what it held once the weights were loaded, through the
warm-up pass (tracing, compilation) and the timed passes (Linux: the mark is reset through
/proc/self/clear_refs). Allocators keep freed memory, so it is the first pass that counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from conformance.isolation import memory_mb
from pkm_models.config import PRESETS

MODES = ("eager", "function", "xla")


def _measure(preset: str, shape: tuple[int, ...], method: str, mode: str, runs: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import gc

    import numpy as np
    import tensorflow as tf

    from conformance.bench import time_calls
    from pkm_models import get_preset
    from pkm_models.keras_pkm import build_keras_model
    from pkm_models.weights import make_input

    config = get_preset(preset).config
    model = build_keras_model(config, method=method)
    layer = model.layers[0]
    x = tf.constant(make_input(shape, seed=0))
    fn = layer if mode == "eager" else tf.function(layer, jit_compile=(mode == "xla"))
    gc.collect()
    base = memory_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    np.asarray(fn(x))  # warm-up (and tracing / compilation), counted in the peak
    times = time_calls(lambda: np.asarray(fn(x)), runs)
    return {
        "method": method,
        "mode": mode,
        "median_ms": 1e3 * statistics.median(times),
        "peak_extra_mb": memory_mb("VmHWM") - base,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.bench.methods", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="xlm", choices=sorted(PRESETS), help="model preset (default xlm)")
    parser.add_argument("--shape", default=None, help="input shape, e.g. 4,128,768 (default: the preset's)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.shape:
        try:
            shape = tuple(int(s) for s in args.shape.split(","))
        except ValueError:
            parser.error(f"--shape: expected integers separated by commas, e.g. 4,128,768; got {args.shape!r}")
        if len(shape) < 2 or min(shape) < 1 or shape[-1] != PRESETS[args.preset].config.input_dim:
            parser.error(
                f"--shape: needs positive sizes ending in the preset's input_dim "
                f"({PRESETS[args.preset].config.input_dim}), got {args.shape!r}"
            )
    from conformance.isolation import quiet_third_party

    quiet_third_party(verbose=False)  # before TensorFlow loads (with keras_pkm)
    from pkm_models import get_preset
    from pkm_models.keras_pkm import METHODS

    if not args.shape:
        shape = get_preset(args.preset).input_shape
    if args.one:
        print(json.dumps(_measure(args.preset, shape, *args.one, args.runs)))
        return 0
    rows = []
    for method in METHODS:
        for mode in MODES:
            cmd = [sys.executable, "-m", "conformance.bench.methods", "--preset", args.preset]
            cmd += ["--shape", ",".join(map(str, shape)), "--runs", str(args.runs), "--one", method, mode]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"{method} {mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{method:>10} {mode:>8}: {row['median_ms']:8.1f} ms  peak +{row['peak_extra_mb']:7.0f} MB", flush=True
            )
    print(f"\npreset {args.preset}, input {shape}, median of {args.runs} runs")
    print("| method | mode | median (ms) | peak extra memory (MB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['mode']} | {r['median_ms']:.1f} | {r['peak_extra_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
