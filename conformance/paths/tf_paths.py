"""The Keras port on TensorFlow: eager, tf.function and XLA, on CPU and GPU."""

from __future__ import annotations

import numpy as np

from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable

MODES = ("eager", "function", "xla")


class TFPath(ExecutionPath):
    family = "tf"

    def __init__(self, mode: str, device: str):
        self.mode, self.device = mode, device
        self.name = f"tf-{mode}-{device}"

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

        if context.case.spec.layers != 1:
            raise PathUnavailable("TF paths run single-layer cases")
        layer = context.keras_model.layers[-1]
        device = "/GPU:0" if self.device == "gpu" else "/CPU:0"
        if self.mode == "eager":
            fn = lambda t: layer(t, return_taps=True)  # noqa: E731
        else:
            fn = tf.function(lambda t: layer(t, return_taps=True), jit_compile=self.mode == "xla")

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            with tf.device(device):
                taps = fn(tf.constant(x))
            return {k: np.asarray(v) for k, v in taps.items()}

        return run
