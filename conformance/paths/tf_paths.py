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

    def prepare(self, context: CaseContext):
        import tensorflow as tf

        layers = context.keras_model_with(self.method).layers  # ProductKeyMemory layers
        device = "/GPU:0" if self.device == "gpu" else "/CPU:0"

        def forward(t):
            for layer in layers[:-1]:
                t = layer(t)
            return layers[-1](t, return_taps=True)

        fn = forward if self.mode == "eager" else tf.function(forward, jit_compile=self.mode == "xla")

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            with tf.device(device):
                taps = fn(tf.constant(x))
            return {k: np.asarray(v) for k, v in taps.items()}

        return run
