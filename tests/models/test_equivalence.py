"""Forward equivalence of the PyTorch reference and the Keras port.

Tolerance: every tap agrees within ATOL (absolute, float32) on every row whose product-key
selection is not a near-tie; measured maxima are in docs/equivalence.md.
"""

import numpy as np
import pytest
import torch

from pkm_models import get_preset
from pkm_models.keras_pkm import METHODS
from pkm_models.weights import make_input
from tests.models.helpers import assert_taps_match, build_pair, keras_taps, torch_taps

ATOL = {"tiny": 1e-5, "small": 1e-5, "xlm": 2e-5}
SHAPES = {2: (6,), 3: (2, 3), 4: (2, 2, 3)}  # leading dims per input rank


@pytest.fixture(scope="module", params=[(p, bn) for p in ("tiny", "small", "xlm") for bn in (False, True)], ids=str)
def pair(request):
    preset, bn = request.param
    config = get_preset(preset).config.replace(query_batchnorm=bn)
    torch_layer, keras_layer, weights = build_pair(config)
    yield preset, config, torch_layer, keras_layer, weights


def _snapshot(torch_layer, keras_layer):
    buffers = {k: v.clone() for k, v in torch_layer.state_dict().items()}
    variables = [(v, np.asarray(v.numpy())) for v in keras_layer.non_trainable_weights]
    return buffers, variables


def _restore(torch_layer, snapshot):
    buffers, variables = snapshot
    torch_layer.load_state_dict(buffers)
    for v, value in variables:
        v.assign(value)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_forward_taps_match(pair, rank, training):
    preset, config, torch_layer, keras_layer, weights = pair
    x = make_input((*SHAPES[rank], config.input_dim), seed=rank)
    snapshot = _snapshot(torch_layer, keras_layer)
    try:
        ref = torch_taps(torch_layer, x, training=training)
        got = keras_taps(keras_layer, x, training=training)
        errors = assert_taps_match(ref, got, weights, config, ATOL[preset])
        assert ref["output"].shape == (*SHAPES[rank], config.output_dim) if rank > 2 else (6, config.output_dim)
        if config.query_batchnorm and training:  # running statistics moved the same way
            bn_mean = torch_layer.query_proj[1].running_mean.numpy()
            np.testing.assert_allclose(keras_layer.bn_moving_mean.numpy(), bn_mean, atol=1e-6)
            bn_var = torch_layer.query_proj[1].running_var.numpy()
            np.testing.assert_allclose(keras_layer.bn_moving_variance.numpy(), bn_var, rtol=1e-5, atol=1e-6)
    finally:
        _restore(torch_layer, snapshot)
    print(f"{preset} bn={config.query_batchnorm} rank={rank} training={training}: {errors}")


def test_batchnorm_matters():
    """With batchnorm on, inference and training queries differ a lot, so the checks above
    test batchnorm, not an identity."""
    config = get_preset("small").config.replace(query_batchnorm=True)
    torch_layer, _, _ = build_pair(config)
    x = make_input((2, 3, config.input_dim), seed=9)
    a = torch_taps(torch_layer, x, training=False)["query"]
    b = torch_taps(torch_layer, x, training=True)["query"]
    assert np.abs(a - b).max() > 0.1


def test_methods_agree():
    config = get_preset("small").config
    x = make_input((2, 5, config.input_dim), seed=1)
    outputs = {}
    for method in METHODS:
        _, keras_layer, _ = build_pair(config, method=method)
        outputs[method] = np.asarray(keras_layer(x))
    for method in METHODS:
        np.testing.assert_allclose(outputs[method], outputs["einsum"], atol=1e-6, err_msg=method)


def test_default_output_is_unchanged_by_taps():
    config = get_preset("tiny").config
    torch_layer, keras_layer, _ = build_pair(config)
    x = make_input((3, 4, config.input_dim), seed=2)
    with torch.no_grad():
        plain = torch_layer.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(plain, torch_taps(torch_layer, x)["output"])
    np.testing.assert_array_equal(np.asarray(keras_layer(x)), keras_taps(keras_layer, x)["output"])
