"""What explains a machine's benchmark figures: CPU and flags, threads, bandwidth, page faults.

    python -m conformance.bench.machine [--preset cpu] [--json]

The same PKM pass took 1.2-2.7x longer on one machine than on another of the same kind.
These figures are what a table from one machine needs to be read against another's:

* the CPU model and the instruction-set flags that the runtimes' kernels use (AVX2, FMA,
  AVX-512 and its BF16 / VNNI extensions, AMX);
* logical, usable (this process's affinity) and physical cores, and the threads each runtime
  computes with: ``torch.get_num_threads``, TensorFlow's intra- and inter-op settings (0: its
  own choice, all usable cores), and ONNX Runtime's default intra-op pool, *counted* (the
  threads a default session starts, plus the caller's);
* copy bandwidth (a large ``np.copyto``: read + write bytes over time);
* first touch: writing a freshly allocated buffer the size of one layer's gathered value
  rows (the temporary that the gathering methods write) against writing it again. The
  difference is the kernel's page faults (zeroing and mapping 4 KB pages), which a
  runtime pays every pass whose allocator returns such buffers to the system.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# flags that decide which kernels torch, TensorFlow (oneDNN) and ONNX Runtime (MLAS) run
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
FIRST_TOUCH_MAX_BYTES = 2 << 30  # the seed preset's 1.6 GB per layer fits; larger is capped


def memory_bandwidth_gbs(megabytes: int = 512, repeats: int = 7) -> float:
    """Copy bandwidth of this machine's memory: (read + write bytes) / time of a large copy."""
    import numpy as np

    from conformance.bench import time_calls

    a = np.ones(megabytes * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    return 2 * a.nbytes / statistics.median(time_calls(lambda: np.copyto(b, a), repeats)) / 1e9


def first_touch(nbytes: int, repeats: int = 5) -> dict:
    """Seconds to allocate a fresh buffer of ``nbytes`` and write it once (page faults
    included), and to write the same buffer again (median of ``repeats`` each)."""
    import numpy as np

    n = max(1, min(nbytes, FIRST_TOUCH_MAX_BYTES) // 4)
    fresh, again = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buffer = np.empty(n, np.float32)  # large: its own mapping, returned on free
        buffer.fill(1.0)
        t1 = time.perf_counter()
        buffer.fill(2.0)
        t2 = time.perf_counter()
        fresh.append(t1 - t0)
        again.append(t2 - t1)
        del buffer
    first, rewrite = statistics.median(fresh), statistics.median(again)
    return {
        "bytes": 4 * n,
        "first_touch_s": first,
        "rewrite_s": rewrite,
        "first_touch_gb_per_s": 4 * n / first / 1e9,
        "rewrite_gb_per_s": 4 * n / rewrite / 1e9,
    }


def cpu_info(cpuinfo: str | None = None) -> dict:
    """CPU model, the :data:`FLAGS` it has, and its cores, from ``/proc/cpuinfo`` (Linux;
    fields that cannot be read are None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags, cores = None, None, set()
    physical_id = None
    for line in cpuinfo.splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key == "flags" and flags is None:
            flags = set(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cpu_model": model,
        "cpu_flags": None if flags is None else {f: f in flags for f in FLAGS},
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "physical_cores": len(cores) or None,
    }


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def runtime_threads(request: dict | None = None) -> dict:
    """The threads each runtime computes with, in this process (see the module docstring)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import onnx
    import onnxruntime as ort
    import tensorflow as tf
    import torch
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "threads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    before = _thread_count()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_threads = _thread_count() - before + 1  # the pool's threads and the caller's
    del session
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "tensorflow_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tensorflow_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "onnxruntime_intra_op_threads": ort_threads,
    }


def gathered_bytes(preset) -> int:
    """Bytes of value rows one layer of a bench preset gathers per pass."""
    return preset.value_bytes() // preset.layers


def measure(gathered_bytes: int, timeout: float = 300) -> dict:
    """Every figure of this module; runtime threads are read in a fresh process (the
    bench's parent does not load the runtimes). ``gathered_bytes``: one layer's gathered
    value rows, the size of the first-touch buffer."""
    from conformance.isolation import run_json_worker

    threads, why = run_json_worker("conformance.bench.machine", {}, timeout)
    if threads is None or threads.get("status") == "error":
        threads = {"runtime_threads_error": why or threads.get("reason")}
    return {
        **cpu_info(),
        **threads,
        "copy_gb_per_s": memory_bandwidth_gbs(),
        "first_touch": first_touch(gathered_bytes),
    }


def summary(m: dict) -> list[str]:
    """The figures as a few lines of text (for bench.md and the terminal)."""
    flags = m.get("cpu_flags")
    flag_text = "unknown" if flags is None else (", ".join(f for f, on in flags.items() if on) or "none of them")
    touch = m.get("first_touch") or {}
    lines = [
        f"CPU: {m.get('cpu_model')}; flags: {flag_text} (of {', '.join(FLAGS)}); cores: "
        f"{m.get('logical_cores')} logical, {m.get('usable_cores')} usable, {m.get('physical_cores')} physical.",
    ]
    if "torch_threads" in m:
        lines.append(
            f"Threads: torch {m['torch_threads']} (inter-op {m['torch_interop_threads']}), TensorFlow intra-op "
            f"{m['tensorflow_intra_op_threads']} / inter-op {m['tensorflow_inter_op_threads']} (0: TensorFlow's "
            f"choice, every usable core), ONNX Runtime intra-op {m['onnxruntime_intra_op_threads']} (counted)."
        )
    else:
        lines.append(f"Threads: not measured ({m.get('runtime_threads_error')}).")
    if "copy_gb_per_s" in m:
        lines.append(f"Copy bandwidth: {m['copy_gb_per_s']:.1f} GB/s.")
    if touch:
        lines.append(
            f"First touch of a fresh {touch['bytes'] / 1e6:,.0f} MB buffer (one layer's gathered value rows): "
            f"{touch['first_touch_s'] * 1e3:.1f} ms ({touch['first_touch_gb_per_s']:.1f} GB/s) against "
            f"{touch['rewrite_s'] * 1e3:.1f} ms ({touch['rewrite_gb_per_s']:.1f} GB/s) to write it again."
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.bench.machine", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--preset", default="cpu", help="bench preset whose gathered rows size the first-touch buffer (default cpu)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    from conformance.bench import BenchError, get_bench_preset

    try:
        preset = get_bench_preset(args.preset)
    except BenchError as exc:
        parser.error(str(exc))
    figures = measure(gathered_bytes(preset))
    print(json.dumps(figures, indent=2) if args.json else "\n".join(summary(figures)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):  # a worker request
        from conformance.isolation import serve

        sys.exit(serve(runtime_threads))
    sys.exit(main())
