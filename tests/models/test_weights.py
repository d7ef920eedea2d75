import numpy as np
import pytest

from pkm_models import PKMConfig, get_preset, make_weights
from pkm_models.weights import make_input, weight_shapes

SMALL = get_preset("small").config


def test_names_and_shapes_are_the_torch_state_dict():
    from pkm_models.torch_pkm import HashingMemory

    for bn in (False, True):
        config = SMALL.replace(query_batchnorm=bn)
        weights = make_weights(config, 0)
        state = HashingMemory(**config.to_dict()).state_dict()
        expected = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
        assert {k: v.shape for k, v in weights.items()} == expected
        assert all(v.dtype == np.float32 for v in weights.values())


def test_pure_function_of_config_and_seed():
    a, b, c = make_weights(SMALL, 3), make_weights(SMALL, 3), make_weights(SMALL, 4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])


def test_stream_stable():
    """A tensor does not change when other tensors are added (batchnorm, more layers)."""
    plain = make_weights(SMALL, 0)
    with_bn = make_weights(SMALL.replace(query_batchnorm=True), 0)
    for k, v in plain.items():
        np.testing.assert_array_equal(with_bn[k], v)
    stack = make_weights(SMALL, 0, layers=3)
    assert len(stack) == 3 * len(plain)
    assert not np.array_equal(stack["layers.0.keys"], stack["layers.1.keys"])


def test_distributions_follow_the_reference_init():
    c = PKMConfig(input_dim=100, output_dim=64, k_dim=32, heads=2, knn=4, n_keys=64, query_batchnorm=True)
    w = make_weights(c, 0)
    assert np.abs(w["keys"]).max() <= 1 / np.sqrt(16)
    assert np.abs(w["keys"]).max() > 0.9 / np.sqrt(16)
    assert np.std(w["values.weight"]) == pytest.approx(64**-0.5, rel=0.02)
    assert np.abs(w["query_proj.0.weight"]).max() <= 0.1
    # batchnorm is far from the identity, so that it matters in every check
    assert np.std(w["query_proj.1.running_mean"]) > 0.1
    assert np.abs(w["query_proj.1.running_var"] - 1).mean() > 0.2
    assert np.abs(w["query_proj.1.weight"] - 1).mean() > 0.1
    assert set(weight_shapes(c)) == set(w)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        make_weights(SMALL, -1)


def test_make_input_is_deterministic():
    np.testing.assert_array_equal(make_input((2, 3), 5), make_input((2, 3), 5))
    assert make_input((2, 3), 5).dtype == np.float32


def test_a_layer_built_directly_is_initialised_like_the_notebook():
    import torch

    from pkm_models.torch_pkm import HashingMemory

    torch.manual_seed(0)
    layer = HashingMemory(input_dim=32, output_dim=64, k_dim=16, heads=2, knn=4, n_keys=16)
    keys = layer.keys.detach().numpy()
    assert np.isfinite(keys).all() and 0.9 / np.sqrt(8) < np.abs(keys).max() <= 1 / np.sqrt(8)
    assert np.std(layer.values.weight.detach().numpy()) == pytest.approx(64**-0.5, rel=0.05)
