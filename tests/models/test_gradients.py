"""Gradient parity: the same loss gives the same gradients in both frameworks, and SGD
steps give the same weights and batchnorm running statistics."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

from pkm_models import get_preset
from pkm_models.convert import get_keras_weights, state_dict_to_numpy
from pkm_models.weights import make_input
from tests.models.helpers import build_pair

CASES = [(p, bn) for p in ("tiny", "small") for bn in (False, True)]
# gradient name (torch names) -> max abs difference allowed
GRAD_ATOL = 1e-5


def _loss_weights(config, shape, seed=7):
    return np.random.default_rng(seed).normal(size=(*shape, config.output_dim)).astype(np.float32)


def torch_grads(layer, x, r):
    layer.train()
    layer.zero_grad()
    xt = torch.from_numpy(x).requires_grad_(True)
    loss = (layer(xt) * torch.from_numpy(r)).sum()
    loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in layer.named_parameters()}
    grads["input"] = xt.grad.numpy()
    return float(loss.detach()), grads


def keras_grads(layer, x, r):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt, training=True) * r)
    variables = layer.trainable_variables
    grads = tape.gradient(loss, [xt, *variables])
    named = {"input": np.asarray(tf.convert_to_tensor(grads[0]))}
    keras_named = {v.name: np.asarray(tf.convert_to_tensor(g)) for v, g in zip(variables, grads[1:], strict=True)}
    named.update(_to_torch_names(keras_named))
    return float(loss), named


def _to_torch_names(keras_named):
    from pkm_models.convert import keras_to_torch

    return keras_to_torch(keras_named)


@pytest.mark.parametrize(("preset", "bn"), CASES, ids=str)
def test_gradients_match(preset, bn):
    config = get_preset(preset).config.replace(query_batchnorm=bn)
    torch_layer, keras_layer, _ = build_pair(config)
    x = make_input((2, 5, config.input_dim), seed=3)
    r = _loss_weights(config, (2, 5))
    loss_t, gt = torch_grads(torch_layer, x, r)
    loss_k, gk = keras_grads(keras_layer, x, r)
    assert loss_k == pytest.approx(loss_t, abs=1e-4)
    expected = {"input", "query_proj.0.weight", "query_proj.0.bias", "keys", "values.weight"}
    if bn:
        expected |= {"query_proj.1.weight", "query_proj.1.bias"}
    assert set(gt) == set(gk) == expected
    for name in sorted(expected):
        assert gk[name].shape == gt[name].shape, name
        assert np.abs(gt[name]).max() > 0, f"{name}: zero gradient proves nothing"
        np.testing.assert_allclose(gk[name], gt[name], atol=GRAD_ATOL, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm"])
def test_sgd_steps_give_the_same_weights_and_running_stats(bn):
    config = get_preset("small").config.replace(query_batchnorm=bn)
    torch_layer, keras_layer, _ = build_pair(config)
    torch_opt = torch.optim.SGD(torch_layer.parameters(), lr=0.5)
    keras_opt = keras.optimizers.SGD(learning_rate=0.5)
    for step in range(4):
        x = make_input((3, 4, config.input_dim), seed=100 + step)
        r = _loss_weights(config, (3, 4), seed=step)
        torch_grads(torch_layer, x, r)
        torch_opt.step()
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(keras_layer(xt, training=True) * r)
        grads = tape.gradient(loss, keras_layer.trainable_variables)
        keras_opt.apply_gradients(zip(grads, keras_layer.trainable_variables, strict=True))

    expected = state_dict_to_numpy(torch_layer.state_dict())
    got = get_keras_weights(keras_layer)
    assert set(got) == set(expected)
    initial = build_pair(config)[2]
    for name in sorted(expected):
        assert not np.array_equal(expected[name], initial[name]), f"{name} did not move"
        np.testing.assert_allclose(got[name], expected[name], atol=2e-5, rtol=1e-4, err_msg=name)
