"""Each stage of one layer alone, in each runtime: where the execution paths differ.

    python -m conformance.bench.stages [--preset xlm] [--tokens 512] [--runs 15] [--slots 8]

On random data of the layer's shapes, in one process, on the CPU, median of ``--runs``
after 2 warm-up calls:

* ``read``: a sequential read of the whole value table (numpy sum, one thread), as GB/s;
* ``top-k``: the sub-key top-k, ``(heads * 2 * tokens, n_keys)`` rows, k = ``knn``;
* ``rows``: gathering the ``tokens x heads x knn`` selected value rows and summing them
  with their weights: PyTorch's ``EmbeddingBag``, ONNX Runtime's ``Gather`` + ``MatMul``
  8 slots at a time (as in the ``torch-fast`` export), TensorFlow's gather + einsum (the
  seed's), and the Keras port's ``fused`` blocks compiled by XLA (``--slots`` slots per
  block: the port's ``FUSED_SLOTS`` by default).

Every runtime's result is checked against PyTorch's before it is timed.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import numpy as np

from pkm_models.config import PRESETS

SLOTS = 8  # as FastHashingMemory's chunk


def _median_ms(fn, runs: int) -> float:
    from conformance.bench import time_calls

    time_calls(fn, 2)  # warm-up
    return 1e3 * statistics.median(time_calls(fn, runs))


def _ort_session(nodes, inputs, outputs, initializers=()):
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from conformance.paths.ort_paths import session_options

    graph = helper.make_graph(nodes, "stage", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])


def _ort_topk(k: int):
    from onnx import TensorProto, helper

    session = _ort_session(
        [helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", "n"])],
        [
            helper.make_tensor_value_info("values", TensorProto.FLOAT, ["rows", k]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["rows", k]),
        ],
        [helper.make_tensor("k", TensorProto.INT64, [1], [k])],
    )
    return lambda x: session.run(None, {"x": x})


def _ort_rows(n: int, slots: int = SLOTS):
    """Gather + batched MatMul, ``slots`` slots at a time, summed with Add: torch-fast's graph."""
    from onnx import TensorProto, helper

    slots = math.gcd(n, slots)  # blocks of equal size
    blocks = n // slots
    nodes = [
        helper.make_node("Split", ["indices"], [f"i{b}" for b in range(blocks)], axis=1, num_outputs=blocks),
        helper.make_node("Unsqueeze", ["weights", "one"], ["weights_3d"]),
        helper.make_node("Split", ["weights_3d"], [f"w{b}" for b in range(blocks)], axis=2, num_outputs=blocks),
    ]
    for b in range(blocks):
        nodes.append(helper.make_node("Gather", ["values", f"i{b}"], [f"r{b}"]))
        nodes.append(helper.make_node("MatMul", [f"w{b}", f"r{b}"], [f"p{b}"]))
    total = "p0"
    for b in range(1, blocks):
        nodes.append(helper.make_node("Add", [total, f"p{b}"], [f"s{b}"]))
        total = f"s{b}"
    nodes.append(helper.make_node("Squeeze", [total, "one"], ["output"]))
    session = _ort_session(
        nodes,
        [
            helper.make_tensor_value_info("values", TensorProto.FLOAT, ["size", "dim"]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["tokens", n]),
            helper.make_tensor_value_info("weights", TensorProto.FLOAT, ["tokens", n]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["tokens", "dim"])],
        [helper.make_tensor("one", TensorProto.INT64, [1], [1])],
    )
    return lambda values, indices, weights: session.run(
        None, {"values": values, "indices": indices, "weights": weights}
    )[0]


def measure(preset: str = "xlm", tokens: int = 512, runs: int = 15, seed: int = 0, slots: int | None = None) -> dict:
    """``{"read_gb_per_s": float, "top-k": {runtime: ms}, "rows": {runtime: ms},
    "fused_slots": int}``, every runtime on the CPU."""
    import tensorflow as tf

    with tf.device("/CPU:0"):
        return _measure(preset, tokens, runs, seed, slots)


def _measure(preset: str, tokens: int, runs: int, seed: int, slots: int | None) -> dict:
    import tensorflow as tf
    import torch

    from pkm_models import get_preset
    from pkm_models.keras_pkm import FUSED_SLOTS, _blockwise_sum

    c = get_preset(preset).config
    rng = np.random.default_rng(seed)
    n = c.heads * c.knn
    values = rng.standard_normal((c.n_keys**2, c.v_dim), dtype=np.float32)
    scores = rng.standard_normal((c.heads * 2 * tokens, c.n_keys), dtype=np.float32)
    indices = rng.integers(0, c.n_keys**2, (tokens, n))
    weights = rng.random((tokens, n), dtype=np.float32)

    read_ms = _median_ms(lambda: values.sum(dtype=np.float32), runs)
    result = {"read_gb_per_s": values.nbytes / read_ms / 1e6, "top-k": {}, "rows": {}}

    # top-k
    s_torch = torch.from_numpy(scores)
    expected = s_torch.topk(c.knn, dim=-1).values.numpy()
    ort_topk = _ort_topk(c.knn)
    s_tf = tf.constant(scores)
    tf_topk = tf.function(lambda x: tf.math.top_k(x, c.knn).values)
    xla_topk = tf.function(lambda x: tf.math.top_k(x, c.knn).values, jit_compile=True)
    topk = {
        "torch": lambda: s_torch.topk(c.knn, dim=-1).values.numpy(),
        "onnxruntime": lambda: ort_topk(scores)[0],
        "tf.function": lambda: tf_topk(s_tf).numpy(),
        "xla": lambda: xla_topk(s_tf).numpy(),
    }
    for name, fn in topk.items():
        np.testing.assert_array_equal(fn(), expected, err_msg=f"top-k: {name}")
        result["top-k"][name] = _median_ms(fn, runs)

    # gather and weighted sum of the selected rows
    v_torch, i_torch, w_torch = torch.from_numpy(values), torch.from_numpy(indices), torch.from_numpy(weights)

    def embedding_bag():
        with torch.inference_mode():
            return torch.nn.functional.embedding_bag(i_torch, v_torch, per_sample_weights=w_torch, mode="sum").numpy()

    expected = embedding_bag()
    ort_rows = _ort_rows(n)
    v_tf = tf.constant(values)
    i_tf, w_tf = tf.constant(indices.astype(np.int32)), tf.constant(weights)
    einsum = tf.function(lambda v, i, w: tf.einsum("bn,bnd->bd", w, tf.gather(v, i)))
    slots = slots or FUSED_SLOTS
    result["fused_slots"] = slots
    fused = tf.function(lambda v, i, w: _blockwise_sum(v, i, w, n, slots), jit_compile=True)
    rows = {
        "torch": embedding_bag,
        "onnxruntime": lambda: ort_rows(values, indices, weights),
        "tf.function": lambda: einsum(v_tf, i_tf, w_tf).numpy(),
        "xla": lambda: fused(v_tf, i_tf, w_tf).numpy(),
    }
    for name, fn in rows.items():
        np.testing.assert_allclose(fn(), expected, rtol=1e-4, atol=1e-4, err_msg=f"rows: {name}")
        result["rows"][name] = _median_ms(fn, runs)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.bench.stages", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="xlm", choices=sorted(PRESETS), help="model preset (default xlm)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per pass (default 512, the cpu bench)")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument(
        "--slots", type=int, default=None, help="slots per block of the XLA-fused sum (default: the Keras port's)"
    )
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.runs < 1 or (args.slots is not None and args.slots < 1):
        parser.error("--tokens, --runs and --slots must be >= 1")
    from conformance.isolation import quiet_third_party

    quiet_third_party(verbose=False)
    result = measure(args.preset, args.tokens, args.runs, slots=args.slots)
    print(f"preset {args.preset}, {args.tokens} tokens, median of {args.runs} runs")
    print(f"XLA-fused sum: {result['fused_slots']} slots per block")
    print(f"sequential read of the value table (numpy, one thread): {result['read_gb_per_s']:.1f} GB/s\n")
    runtimes = list(result["top-k"])
    print("| stage | " + " | ".join(runtimes) + " |\n|---|" + "---|" * len(runtimes))
    for stage in ("top-k", "rows"):
        print(f"| {stage} | " + " | ".join(f"{result[stage][r]:.2f} ms" for r in runtimes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
