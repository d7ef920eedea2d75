"""The Keras port on TensorFlow: eager, tf.function and XLA, on CPU and GPU."""

from __future__ import annotations

import os

import numpy as np

from conformance.isolation import grow_gpu_memory
from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable
from pkm_models.stack import call_module, stack_forward


def keras_backend_problem() -> None:
    """PathUnavailable where Keras runs on another backend than TensorFlow (a user's
    ``KERAS_BACKEND=torch``): the port's layers would then hold torch tensors."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise PathUnavailable(
            f"Keras runs on its {backend!r} backend here (KERAS_BACKEND={os.environ.get('KERAS_BACKEND', '')!r}); "
            "the TensorFlow paths need KERAS_BACKEND=tensorflow, or the variable unset"
        )


class TFPath(ExecutionPath):
    family = "tf"

    def __init__(self, mode: str, device: str, method: str = "auto"):
        self.mode, self.method = mode, method
        self.device = "cuda" if device == "gpu" else "cpu"
        # TensorFlow calls it GPU; the layer's default method keeps the plain name, others say theirs
        self.name = f"tf-{mode}-{device}" + ("" if method == "auto" else f"[{method}]")

    def check(self, case) -> None:
        keras_backend_problem()
        if self.device == "cuda":
            import tensorflow as tf

            grow_gpu_memory()
            if not tf.config.list_physical_devices("GPU"):
                built = tf.test.is_built_with_cuda()
                raise PathUnavailable(
                    f"TensorFlow {tf.__version__} sees no GPU"
                    + (
                        " (it needs the NVIDIA driver and the CUDA libraries of tensorflow[and-cuda]: "
                        "pip install -e '.[cuda]')"
                        if built
                        else " (this build has no CUDA support)"
                    )
                )

    def _function(self, context: CaseContext):
        import tensorflow as tf

        layers = context.keras_model_with(self.method).layers  # ProductKeyMemory layers

        def forward(t):
            return stack_forward(layers, t, call_module, return_taps=True)

        return forward if self.mode == "eager" else tf.function(forward, jit_compile=self.mode == "xla")

    @property
    def _device(self) -> str:
        return "/GPU:0" if self.device == "cuda" else "/CPU:0"

    def prepare(self, context: CaseContext):
        import tensorflow as tf

        fn = self._function(context)

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            with tf.device(self._device):
                taps = fn(tf.constant(x))
            return {k: np.asarray(v) for k, v in taps.items()}

        return run

    def prepare_timed(self, context: CaseContext, x: np.ndarray):
        return timed_tf_pass(self._function(context), x, self._device)

    def table_reads(self, context: CaseContext) -> list:
        """Each Keras layer's weighted sum (its method, as the forward resolves it in this
        mode: eager, inside ``tf.function`` or compiled by XLA), on this path's device."""
        import tensorflow as tf

        from conformance.sweep import TableRead, stored_precision, value_tables

        layers = [layer for layer in context.keras_model_with(self.method).layers if hasattr(layer, "_weighted_sum")]
        config = context.case.config
        n = config.heads * config.knn
        reads = []
        for i, name, reference in value_tables(context.case, context.weights):
            layer = layers[i]

            def weighted_sum(idx, w, layer=layer):
                return layer._weighted_sum(idx, w)

            fn = weighted_sum if self.mode == "eager" else tf.function(weighted_sum, jit_compile=self.mode == "xla")

            def read(indices, weights, fn=fn, layer=layer):
                with tf.device(self._device):
                    idx = tf.constant(np.asarray(indices, np.int64).reshape(-1, n))
                    w = tf.cast(tf.constant(np.asarray(weights, np.float32).reshape(-1, n)), layer.compute_dtype)
                    return np.asarray(tf.cast(fn(idx, w), tf.float32))

            reads.append(TableRead(name, reference, read, config.heads, config.knn, stored_precision(config)))
        return reads


def timed_tf_pass(fn, x: np.ndarray, device: str = "/CPU:0"):
    """A timed pass of the TensorFlow function ``fn``: the input on ``device`` once, the
    outputs left there, a GPU synchronised; traced and compiled before it is returned."""
    import tensorflow as tf

    with tf.device(device):
        t = tf.constant(x)
    gpu = "GPU" in device

    def timed():
        with tf.device(device):
            taps = fn(t)
        if gpu:
            tf.test.experimental.sync_devices()
        return taps

    timed()  # trace and compile for this shape now, whatever the warm-up count
    return timed
