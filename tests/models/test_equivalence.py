"""Forward equivalence of the PyTorch reference and the Keras port.

Tolerance: every tap agrees within ATOL (absolute, float32) on every row whose product-key
selection is not a near-tie; measured maxima are in docs/equivalence.md. Meta's
memory-layer options (docs/memory-layers.md) are checked the same way, each alone and all
together, on one layer and on a network of three, ``layer_output`` included.
"""

import numpy as np
import pytest
import tensorflow as tf
import torch

from pkm_models import PKMConfig, get_preset
from pkm_models.keras_pkm import METHODS
from pkm_models.weights import make_input
from tests.models.helpers import (
    assert_model_taps_match,
    assert_taps_match,
    build_models,
    build_pair,
    keras_model_taps,
    keras_taps,
    torch_model_taps,
    torch_taps,
)

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


# --- Meta's memory-layer options -------------------------------------------------------------
META_BASE = PKMConfig(input_dim=24, output_dim=24, k_dim=8, heads=2, knn=4, n_keys=8)
OPTIONS = {
    "value_dim": {"value_dim": 16},
    "swilu": {"swilu_projection": True},
    "gated": {"gated": True},
    "bf16": {"value_dtype": "bfloat16"},
    "shared": {"share_values": True},
    "all": {"value_dim": 16, "swilu_projection": True, "gated": True, "value_dtype": "bfloat16", "share_values": True},
}
META_ATOL = 1e-5  # float32: a bfloat16 read one bfloat16 step away (2**-9 here) would fail it


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("option", OPTIONS)
def test_meta_options_match_the_reference(option, layers):
    config = META_BASE.replace(**OPTIONS[option])
    torch_model, keras_model, weights = build_models(config, layers, seed=5)
    x = make_input((2, 5, config.input_dim), seed=6)
    ref = torch_model_taps(torch_model, x)
    errors = assert_model_taps_match(ref, keras_model_taps(keras_model, x), weights, config, layers, META_ATOL)
    # the deployed forward returns the last layer's final output, as the reference's
    last = f"{layers - 1}/" if layers > 1 else ""
    final = ref.get(last + "layer_output", ref[last + "output"])
    np.testing.assert_allclose(np.asarray(keras_model(x)), final, atol=META_ATOL, rtol=0)
    print(f"{option} layers={layers}: {errors}")


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("method", METHODS)
def test_meta_options_every_method_and_mode(method, mode):
    """Every weighted-sum method sums a bfloat16 table in slot order and rounds once, eagerly,
    under tf.function and compiled by XLA, on the 3-layer shared network with every option."""
    config = META_BASE.replace(**OPTIONS["all"])
    torch_model, keras_model, weights = build_models(config, 3, seed=8, method=method)
    x = make_input((3, 4, config.input_dim), seed=9)
    wrap = None if mode == "eager" else (lambda f: tf.function(f, jit_compile=mode == "xla"))
    got = keras_model_taps(keras_model, tf.constant(x), fn=wrap)
    assert_model_taps_match(torch_model_taps(torch_model, x), got, weights, config, 3, META_ATOL)


def test_meta_options_in_training_mode_with_batchnorm():
    """Training mode (batch statistics, running statistics updated) with every option: no
    dropout, so the two frameworks compute the same function. Each layer normalises its
    queries by the batch's own spread, which is small for a projected and gated input
    (|layer_output| ~0.1): float32 differences grow about tenfold per layer (2/query: 1.5e-5
    at |q| 0.44), so the taps are judged with the run's default rtol, 1e-4, as well."""
    config = META_BASE.replace(query_batchnorm=True, **OPTIONS["all"])
    torch_model, keras_model, weights = build_models(config, 3, seed=10)
    x = make_input((2, 6, config.input_dim), seed=11)
    ref = torch_model_taps(torch_model, x, training=True)
    got = keras_model_taps(keras_model, x, training=True)
    assert_model_taps_match(ref, got, weights, config, 3, META_ATOL, rtol=1e-4)
    for i, layer in enumerate(keras_model.layers):
        bn = torch_model.layers[i].query_proj[1]
        np.testing.assert_allclose(layer.bn_moving_mean.numpy(), bn.running_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(layer.bn_moving_variance.numpy(), bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
