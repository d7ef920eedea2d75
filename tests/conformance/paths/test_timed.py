"""What the benchmark times: one pass on an input already in place, same result as the
conformance run's pass."""

import numpy as np
import pytest

from conformance.cases import load_cases
from conformance.paths import CaseContext
from pkm_models.config import TAPS
from pkm_models.weights import make_input


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    (case,) = load_cases(names=["tiny"])
    context = CaseContext(case, case.spec.weights(), export_dir=tmp_path_factory.mktemp("exports"))
    yield context
    context.close()


def _host(value) -> np.ndarray:
    """A torch or TensorFlow tensor or an ONNX Runtime OrtValue, on the host."""
    if hasattr(value, "cpu"):
        value = value.cpu()
    return np.asarray(value.numpy())


@pytest.mark.parametrize(
    "name",
    [
        "torch-eager-cpu",
        "torch-compile-cpu",
        "torch-eager-cpu[fast-bag]",
        "tf-function-cpu",
        "tf-xla-cpu[fused]",
        "ort-cpu[torch-fast]",
        "ort-cpu[tf2onnx]",
    ],
)
def test_timed_pass_computes_what_the_conformance_pass_computes(context, name):
    from conformance.paths import get_path

    path = get_path(name)
    x = make_input((2, 3, context.case.config.input_dim), seed=5)
    expected = path.prepare(context)(x)
    timed = path.prepare_timed(context, x)
    for _ in range(2):  # repeatable: the bound input and outputs are reused
        outputs = timed()
        got = [outputs[k] for k in TAPS] if isinstance(outputs, dict) else list(outputs)
        for tap, value in zip(TAPS, got, strict=True):
            np.testing.assert_allclose(_host(value), expected[tap], atol=1e-6, err_msg=f"{name} {tap}")
