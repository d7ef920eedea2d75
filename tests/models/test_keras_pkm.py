"""The Keras port as a Keras layer: build from shapes, tf.function and XLA, dynamic
shapes, serialization; Meta's options as Keras weights (a shared table is one variable, a
bfloat16 table a bfloat16 one)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

from pkm_models import ConfigError, get_preset, keras_pkm
from pkm_models.convert import ConversionError, get_keras_weights, set_keras_weights
from pkm_models.keras_pkm import METHODS, ProductKeyMemory, build_keras_model
from pkm_models.torch_pkm import bf16_weighted_sum, build_torch_model
from pkm_models.weights import make_input, make_weights
from tests.models.helpers import META_ALL_OPTIONS, assert_taps_match, build_pair, keras_taps, torch_taps

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


@pytest.mark.parametrize("method,graph", [("fused", False), ("auto", True)], ids=["fused-eager", "auto-function"])
def test_fused_and_default_method_gradients_match_einsum(method, graph):
    """The default method in a tf.function is the fused one, on padded token counts."""
    config = get_preset("small").config
    x = tf.constant(make_input((2, 3, config.input_dim), seed=3))
    grads = {}
    for name in ("einsum", method):
        _, layer, _ = build_pair(config, method=name)

        def gradients(x, layer=layer):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, training=True) ** 2)
            return tape.gradient(loss, layer.trainable_weights)

        computed = (tf.function(gradients) if graph else gradients)(x)
        grads[name] = dict(zip([w.name for w in layer.trainable_weights], computed, strict=True))
    assert set(grads[method]) == set(grads["einsum"])
    for name, grad in grads["einsum"].items():
        got = np.asarray(tf.convert_to_tensor(grads[method][name]))
        assert np.any(got != 0), name
        np.testing.assert_allclose(got, np.asarray(tf.convert_to_tensor(grad)), atol=1e-5, err_msg=name)


def test_default_method_is_fused_in_graphs_and_by_size_eagerly():
    layer = ProductKeyMemory(output_dim=768, k_dim=16, heads=4, knn=32, n_keys=64)
    assert layer.method == "auto" and build_keras_model(TINY).layers[0].method == "auto"
    gathered_per_token = 4 * 32 * 768 * 4  # heads x knn x v_dim x float32
    threshold = keras_pkm.AUTO_EAGER_FUSED_BYTES // gathered_per_token + 1
    assert layer.resolved_method(1) == "einsum"
    assert layer.resolved_method(threshold - 2) == "einsum"
    assert layer.resolved_method(threshold) == "fused"
    seen = []
    tf.function(lambda: seen.append(layer.resolved_method(1)))()
    assert seen == ["fused"]  # traced into a graph
    assert ProductKeyMemory(output_dim=8, method="einsum").resolved_method(10**6) == "einsum"


def test_fused_buckets_are_the_documented_list():
    assert keras_pkm.FUSED_BUCKETS[:8] == (64, 96, 128, 192, 256, 384, 512, 768)
    assert [keras_pkm.fused_bucket(n) for n in (1, 64, 65, 96, 97, 511, 512, 513, 5000)] == [
        64,
        64,
        96,
        96,
        128,
        512,
        512,
        768,
        6144,
    ]
    for n in range(65, 5000, 37):  # never more than 1.5x the rows
        assert n <= keras_pkm.fused_bucket(n) <= 1.5 * n


TOKEN_COUNTS = [1, 2, 3, 5, 8, 13, 21, 34, 55, 64, 65, 70, 96, 97, 100, 128]  # buckets 64, 96 and 128


def test_fused_padding_gives_identical_outputs_and_one_trace_per_bucket(monkeypatch):
    config = get_preset("small").config
    _, fused, _ = build_pair(config, method="fused")
    _, einsum, _ = build_pair(config, method="einsum")
    monkeypatch.setattr(keras_pkm, "_compiled_blockwise_sum", None)  # count this test's traces only
    for tokens in TOKEN_COUNTS:
        x = make_input((tokens, config.input_dim), seed=tokens)
        np.testing.assert_allclose(np.asarray(fused(x)), np.asarray(einsum(x)), atol=1e-6)
    # eagerly, one trace, so one XLA compilation, per bucket
    assert keras_pkm._compiled_blockwise_sum.experimental_get_tracing_count() == 3


def test_fused_padding_in_a_graph_with_dynamic_tokens_reaches_only_buckets(monkeypatch):
    config = get_preset("small").config
    _, fused, _ = build_pair(config, method="fused")
    _, einsum, _ = build_pair(config, method="einsum")
    compiled = tf.function(keras_pkm._blockwise_sum, jit_compile=True)
    seen = []  # the token count of every call of the compiled block, at run time

    def recording(values, indices, weights, n, slots):
        rows = tf.numpy_function(lambda k: (seen.append(int(k)), k)[1], [tf.shape(indices)[0]], tf.int32)
        with tf.control_dependencies([rows]):
            return tf.identity(compiled(values, indices, weights, n, slots))

    monkeypatch.setattr(keras_pkm, "_compiled_blockwise_sum", recording)
    dynamic = tf.function(fused, input_signature=[tf.TensorSpec((None, config.input_dim), tf.float32)])
    for tokens in TOKEN_COUNTS:
        x = make_input((tokens, config.input_dim), seed=tokens)
        got = dynamic(tf.constant(x))
        assert got.shape == (tokens, config.output_dim)
        np.testing.assert_allclose(np.asarray(got), np.asarray(einsum(x)), atol=1e-6)
    # XLA compiles once per shape it sees: three, for sixteen token counts
    assert len(seen) == len(TOKEN_COUNTS) and set(seen) == {64, 96, 128}


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
            r"unknown method 'scatter'; available: \['auto', 'einsum', 'reduce_sum', 'accumulate', 'fused'\]",
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


# --- Meta's memory-layer options as Keras weights ----------------------------------------------
META = META_ALL_OPTIONS


def test_shared_table_is_one_variable():
    model = build_keras_model(META, layers=3, seed=1)
    first, *others = model.layers
    assert all(layer.values is first.values and layer.values_owner is first for layer in others)
    assert first.values_owner is None
    assert [w.name for w in model.weights].count("values") == 1  # held once by the model
    torch_model = build_torch_model(META, 3, seed=1)
    assert sum(math.prod(w.shape) for w in model.weights) == sum(p.numel() for p in torch_model.parameters())
    # read back as one array under every layer's name, equal to the reference's weights
    weights = get_keras_weights(model)
    assert weights["layers.2.values.weight"] is weights["layers.0.values.weight"]
    expected = make_weights(META, 1, layers=3)
    assert set(weights) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
    # one gradient for the table, gathering every layer's reads
    x = tf.constant(make_input((2, 3, META.input_dim), seed=2))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True) ** 2)
    grads = tape.gradient(loss, model.trainable_weights)
    assert [w.name for w in model.trainable_weights].count("values") == 1
    assert all(g is not None for g in grads)


def test_a_shared_table_loads_only_one_table():
    model = build_keras_model(META, layers=3, seed=None)
    weights = make_weights(META, 1, layers=3)
    copies = {k: (v.copy() if k.endswith("values.weight") else v) for k, v in weights.items()}
    set_keras_weights(model, copies)  # equal copies: one table
    np.testing.assert_array_equal(model.layers[2].values.numpy().astype(np.float32), weights["layers.0.values.weight"])
    copies["layers.2.values.weight"] = copies["layers.2.values.weight"] + 1
    with pytest.raises(ConversionError, match=r"pkm_2/values differs from pkm_0/values, the table it shares"):
        set_keras_weights(model, copies)


def test_sharing_is_set_before_building_and_only_with_a_layer_of_the_same_table():
    owner = ProductKeyMemory.from_pkm_config(META, name="owner")
    owner.build((None, META.input_dim))
    built = ProductKeyMemory.from_pkm_config(META)
    built.build((None, META.input_dim))
    with pytest.raises(ConfigError, match="before it is built"):
        built.share_values_of(owner)
    with pytest.raises(ConfigError, match="another ProductKeyMemory"):
        ProductKeyMemory.from_pkm_config(META).share_values_of(keras.layers.Dense(3))
    other = ProductKeyMemory.from_pkm_config(META.replace(value_dtype="float32"))
    other.share_values_of(owner)
    with pytest.raises(ConfigError, match=r"cannot share 'owner''s value table \(\(64, 16\), 'bfloat16'\)"):
        other.build((None, META.input_dim))


def test_bfloat16_table_is_a_bfloat16_variable_and_its_read_is_the_references():
    """The table is stored in bfloat16, holding the reference's values; every method's read
    is the reference's ``bf16_weighted_sum`` of the slots it selected, exactly."""
    config = TINY.replace(value_dtype="bfloat16")
    x = make_input((3, 4, config.input_dim), seed=5)
    for method in METHODS:
        _, layer, weights = build_pair(config, method=method)
        assert layer.values.dtype == "bfloat16"
        np.testing.assert_array_equal(layer.values.numpy().astype(np.float32), weights["values.weight"])
        taps = keras_taps(layer, x)
        n = config.heads * config.knn
        expected = bf16_weighted_sum(
            torch.from_numpy(weights["values.weight"]).bfloat16(),
            torch.tensor(taps["indices"].reshape(-1, n)),
            torch.tensor(taps["weights"].reshape(-1, n)),
        ).numpy()
        np.testing.assert_array_equal(taps["output"].reshape(-1, config.output_dim), expected, err_msg=method)


def test_meta_layer_config_and_keras_file_round_trip(tmp_path):
    model = build_keras_model(META, layers=3, seed=3, method="einsum")
    config = model.layers[1].get_config()
    assert {k: config[k] for k in META.variant} == {k: getattr(META, k) for k in META.variant}
    assert ProductKeyMemory.from_config(config).get_config() == config
    assert not set(META.variant) & set(build_keras_model(TINY).layers[0].get_config())  # XLM's config as it was
    x = make_input((2, 3, META.input_dim), seed=4)
    path = tmp_path / "meta.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    assert loaded.layers[0].values.dtype == "bfloat16"


def test_value_dropout_comes_after_the_projection():
    """As in the reference: the read (``output``) is not dropped out, the projected output is."""
    config = META.replace(gated=False, value_dropout=0.5)
    _, layer, _ = build_pair(config)
    x = make_input((2, 3, config.input_dim), seed=1)
    plain, trained = keras_taps(layer, x), keras_taps(layer, x, training=True)
    np.testing.assert_array_equal(trained["output"], plain["output"])
    dropped = trained["layer_output"] == 0
    assert 0.2 < dropped.mean() < 0.8 and not np.any(plain["layer_output"] == 0)
    np.testing.assert_allclose(trained["layer_output"][~dropped], 2 * plain["layer_output"][~dropped], rtol=1e-6)
