"""The Keras port on TensorFlow: eager, tf.function and XLA, on CPU and GPU."""

from __future__ import annotations

import numpy as np

from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable

MODES = ("eager", "function", "xla")


class TFPath(ExecutionPath):
    family = "tf"

    def __init__(self, mode: str, device: str, method: str = "einsum"):
        self.mode, self.device, self.method = mode, device, method
        # the default method keeps DESIGN.md's plain name; others are bench variants
        self.name = f"tf-{mode}-{device}" + ("" if method == "einsum" else f"[{method}]")

    def check(self, case) -> None:
        if self.device == "gpu":
            import tensorflow as tf

            if not tf.config.list_physical_devices("GPU"):
                built = tf.test.is_built_with_cuda()
                raise PathUnavailable(
                    f"TensorFlow {tf.__version__} sees no GPU" + ("" if built else " (this build has no CUDA support)")
                )

    def _function(self, context: CaseContext):
        import tensorflow as tf

        layers = context.keras_model_with(self.method).layers  # ProductKeyMemory layers

        def forward(t):
            for layer in layers[:-1]:
                t = layer(t)
            return layers[-1](t, return_taps=True)

        return forward if self.mode == "eager" else tf.function(forward, jit_compile=self.mode == "xla")

    @property
    def _device(self) -> str:
        return "/GPU:0" if self.device == "gpu" else "/CPU:0"

    def prepare(self, context: CaseContext):
        import tensorflow as tf

        fn = self._function(context)

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            with tf.device(self._device):
                taps = fn(tf.constant(x))
            return {k: np.asarray(v) for k, v in taps.items()}

        return run

    def prepare_timed(self, context: CaseContext, x: np.ndarray):
        """The input on the device once; the outputs stay there; a GPU synchronises."""
        import tensorflow as tf

        fn = self._function(context)
        with tf.device(self._device):
            t = tf.constant(x)
        gpu = self.device == "gpu"

        def timed():
            with tf.device(self._device):
                taps = fn(t)
            if gpu:
                tf.test.experimental.sync_devices()
            return taps

        return timed
