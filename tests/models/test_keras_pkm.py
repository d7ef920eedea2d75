"""The Keras port as a Keras layer: build from shapes, tf.function and XLA, dynamic
shapes, serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pkm_models import ConfigError, get_preset
from pkm_models.keras_pkm import METHODS, ProductKeyMemory, build_keras_model
from pkm_models.weights import make_input
from tests.models.helpers import assert_taps_match, build_pair, keras_taps, torch_taps

TINY = get_preset("tiny").config


def test_builds_from_the_input_shape_without_input_dim():
    layer = ProductKeyMemory(output_dim=8, k_dim=8, heads=2, knn=4, n_keys=8)
    out = layer(np.zeros((3, 5, 16), np.float32))
    assert out.shape == (3, 5, 8)
    assert layer.input_dim == 16
    assert layer.query_kernel.shape == (16, 16)
    assert {w.name for w in layer.weights} == {"query_kernel", "query_bias", "keys", "values"}


def test_batchnorm_weights_are_named_and_running_stats_not_trainable():
    layer = ProductKeyMemory(output_dim=8, k_dim=8, heads=2, knn=4, n_keys=8, query_batchnorm=True)
    layer.build((None, 16))
    assert {w.name for w in layer.non_trainable_weights} == {"bn_moving_mean", "bn_moving_variance"}
    assert {"bn_gamma", "bn_beta"} <= {w.name for w in layer.trainable_weights}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("jit", [False, True], ids=["tf.function", "xla"])
def test_compiled_with_dynamic_shapes_matches_eager(method, jit):
    config = TINY.replace(query_batchnorm=True)
    _, layer, _ = build_pair(config, method=method)
    fn = tf.function(
        lambda x: layer(x, return_taps=True),
        jit_compile=jit,
        input_signature=[tf.TensorSpec((None, None, config.input_dim), tf.float32)],
    )
    for shape in [(1, 1), (2, 7), (5, 3)]:  # batch 1, and sequence lengths not seen before
        x = make_input((*shape, config.input_dim), seed=sum(shape))
        eager = layer(x, return_taps=True)
        compiled = fn(tf.constant(x))
        for name in eager:
            np.testing.assert_allclose(np.asarray(compiled[name]), np.asarray(eager[name]), atol=1e-6, err_msg=name)
        assert compiled["output"].shape == (*shape, config.output_dim)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "config",
    [
        get_preset("small").config,  # 4 heads x 8 rows = 32 slots: two of the "fused" method's blocks of 16
        get_preset("small").config.replace(heads=2, knn=10),  # 20 slots: a full block and a partial one
    ],
    ids=["32-slots", "20-slots"],
)
def test_every_method_matches_the_reference(method, config):
    torch_layer, keras_layer, weights = build_pair(config, method=method)
    x = make_input((3, 5, config.input_dim), seed=7)
    assert_taps_match(torch_taps(torch_layer, x), keras_taps(keras_layer, x), weights, config, atol=1e-5)


def test_fused_method_gradients_match_einsum():
    config = get_preset("small").config
    x = tf.constant(make_input((2, 3, config.input_dim), seed=3))
    grads = {}
    for method in ("einsum", "fused"):
        _, layer, _ = build_pair(config, method=method)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True) ** 2)
        grads[method] = dict(
            zip([w.name for w in layer.trainable_weights], tape.gradient(loss, layer.trainable_weights), strict=True)
        )
    for name, grad in grads["einsum"].items():
        np.testing.assert_allclose(
            np.asarray(tf.convert_to_tensor(grads["fused"][name])),
            np.asarray(tf.convert_to_tensor(grad)),
            atol=1e-5,
            err_msg=name,
        )


def test_training_under_xla_updates_running_stats():
    config = TINY.replace(query_batchnorm=True)
    _, layer, _ = build_pair(config)
    before = layer.bn_moving_mean.numpy().copy()
    fn = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    fn(tf.constant(make_input((2, 3, config.input_dim), seed=1)))
    assert not np.array_equal(layer.bn_moving_mean.numpy(), before)


def test_one_dimensional_input_gives_a_batch_of_one_like_the_reference():
    torch_layer, keras_layer, _ = build_pair(TINY)
    import torch

    x = make_input((TINY.input_dim,), seed=1)
    with torch.no_grad():
        ref = torch_layer.eval()(torch.from_numpy(x)).numpy()
    got = np.asarray(keras_layer(x))
    assert got.shape == ref.shape == (1, TINY.output_dim)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_keras_file_round_trip_is_exact(tmp_path):
    config = TINY.replace(query_batchnorm=True, output_dim=TINY.input_dim)
    model = build_keras_model(config, layers=2, method="accumulate")
    x = make_input((2, 3, config.input_dim), seed=4)
    path = tmp_path / "pkm.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    layer = loaded.layers[0]
    assert isinstance(layer, ProductKeyMemory)
    assert layer.get_config() == model.layers[0].get_config()
    assert layer.method == "accumulate" and layer.query_batchnorm


def test_get_config_rebuilds_the_layer():
    layer = ProductKeyMemory(output_dim=8, k_dim=8, heads=2, knn=4, n_keys=8, value_dropout=0.1, seed=3)
    clone = ProductKeyMemory.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_dropout_only_in_training():
    config = TINY.replace(input_dropout=0.5)
    _, layer, _ = build_pair(config)
    x = make_input((2, 3, config.input_dim), seed=1)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(layer(x, training=False)))
    assert not np.allclose(np.asarray(layer(x, training=True)), np.asarray(layer(x)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"method": "scatter"},
            r"unknown method 'scatter'; available: \['einsum', 'reduce_sum', 'accumulate', 'fused'\]",
        ),
        ({"k_dim": 7}, r"PKMConfig\.k_dim"),
        ({"knn": 100}, r"PKMConfig\.knn"),
        ({"batchnorm_momentum": 2.0}, "batchnorm_momentum"),
        ({"batchnorm_epsilon": 0.0}, "batchnorm_epsilon"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"output_dim": 8, "k_dim": 8, "heads": 2, "knn": 4, "n_keys": 8, **kwargs}
    with pytest.raises(ConfigError, match=match):
        ProductKeyMemory(**args)


def test_stacking_needs_equal_dims():
    with pytest.raises(ConfigError, match="stacked layers need input_dim == output_dim, got 16 -> 8"):
        build_keras_model(TINY, layers=2)


def test_unknown_last_dimension_and_wrong_input_dim():
    with pytest.raises(ConfigError, match="last input dimension must be known"):
        ProductKeyMemory(output_dim=8, k_dim=8, heads=2, knn=4, n_keys=8).build((None, None))
    with pytest.raises(ConfigError, match="built for input_dim=16"):
        ProductKeyMemory.from_pkm_config(TINY).build((None, 15))
