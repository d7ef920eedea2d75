"""The seed port's approach, kept as the benchmark's baseline.

A reconstruction of the TensorFlow port the project grew from, as its README describes it
(that port is not part of this repository): XLM's code translated line by line, a Python loop
over the heads with one top-k chain per head, and the weighted sum as ``tf.gather``
followed by ``tf.einsum``. It is labelled ``tf-seed-baseline-*`` wherever it appears and
returns the same taps as every path, so the conformance checks apply to it too.
"""

from __future__ import annotations

import numpy as np

from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable
from conformance.paths.tf_paths import timed_tf_pass
from pkm_models.stack import stack_forward


def _seed_layer(w, config):
    """The seed's forward for one layer, over a dict of tf tensors with torch names."""
    import tensorflow as tf

    heads, k_dim, knn, v_dim = config.heads, config.k_dim, config.knn, config.v_dim
    half = k_dim // 2

    def get_indices_one_head(query, subkeys):  # the notebook's _get_indices, in TF
        bs = tf.shape(query)[0]
        n_keys = subkeys.shape[1]
        q1, q2 = query[:, :half], query[:, half:]
        scores1 = tf.matmul(q1, subkeys[0], transpose_b=True)
        scores2 = tf.matmul(q2, subkeys[1], transpose_b=True)
        scores1, indices1 = tf.math.top_k(scores1, k=knn)
        scores2, indices2 = tf.math.top_k(scores2, k=knn)
        all_scores = tf.reshape(tf.reshape(scores1, (bs, knn, 1)) + tf.reshape(scores2, (bs, 1, knn)), (bs, -1))
        all_indices = tf.reshape(
            tf.reshape(indices1, (bs, knn, 1)) * n_keys + tf.reshape(indices2, (bs, 1, knn)), (bs, -1)
        )
        scores, best = tf.math.top_k(all_scores, k=knn)
        indices = tf.gather(all_indices, best, batch_dims=1)
        return scores, indices

    def call(x, return_taps):
        prefix = tf.shape(x)[:-1]
        bs = tf.reduce_prod(prefix)
        query = tf.matmul(tf.reshape(x, (-1, config.input_dim)), w["query_proj.0.weight"], transpose_b=True)
        query = query + w["query_proj.0.bias"]
        if config.query_batchnorm:
            query = (query - w["query_proj.1.running_mean"]) / tf.sqrt(w["query_proj.1.running_var"] + 1e-5)
            query = query * w["query_proj.1.weight"] + w["query_proj.1.bias"]
        query = tf.reshape(query, (-1, heads, k_dim))
        outputs = [get_indices_one_head(query[:, i], w["keys"][i]) for i in range(heads)]  # per-head loop
        scores = tf.reshape(tf.concat([tf.reshape(s, (bs, 1, knn)) for s, _ in outputs], 1), (-1, knn))
        indices = tf.reshape(tf.concat([tf.reshape(i, (bs, 1, knn)) for _, i in outputs], 1), (-1, knn))
        weights = tf.nn.softmax(scores, axis=-1)
        rows = tf.gather(w["values.weight"], tf.reshape(indices, (bs, heads * knn)))  # gather
        out = tf.einsum("bk,bkd->bd", tf.reshape(weights, (bs, heads * knn)), rows)  # + einsum
        out = tf.reshape(out, tf.concat([prefix, [v_dim]], 0))
        if not return_taps:
            return out
        return {
            "query": tf.reshape(query, (-1, k_dim)),
            "scores": scores,
            "indices": tf.cast(indices, tf.int64),
            "weights": weights,
            "output": out,
        }

    return call


class SeedBaselinePath(ExecutionPath):
    family = "tf"

    def __init__(self, mode: str):
        self.mode = mode
        self.name = f"tf-seed-baseline-{mode}-cpu"

    def check(self, case) -> None:
        if case is not None and case.config.variant:
            raise PathUnavailable(
                f"the seed's port is XLM's layer; it has none of Meta's memory-layer options {case.config.variant}"
            )

    def _function(self, context: CaseContext):
        import tensorflow as tf

        from pkm_models.convert import split_layers

        if self.mode not in ("eager", "function", "xla"):
            raise PathUnavailable(f"unknown mode {self.mode}")
        layers = [
            _seed_layer({k: tf.constant(v) for k, v in w.items()}, context.case.config)
            for w in split_layers(context.weights)
        ]

        def forward(t):
            return stack_forward(layers, t, lambda layer, x, taps: layer(x, taps), return_taps=True)

        return forward if self.mode == "eager" else tf.function(forward, jit_compile=self.mode == "xla")

    def prepare(self, context: CaseContext):
        import tensorflow as tf

        fn = self._function(context)

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            with tf.device("/CPU:0"):
                return {k: np.asarray(v) for k, v in fn(tf.constant(x)).items()}

        return run

    def prepare_timed(self, context: CaseContext, x: np.ndarray):
        """Timed like the Keras port's TensorFlow paths (input placed once, no host copies)."""
        return timed_tf_pass(self._function(context), x)
