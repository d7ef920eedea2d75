"""Meta's memory-layer options in the PyTorch reference and its loop-free twin: each is
checked against a numpy computation written here from the formulas of docs/memory-layers.md,
and XLM's layer stays what it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pkm_models.config import LAYER_OUTPUT, TAPS, ConfigError, PKMConfig, tap_names
from pkm_models.convert import ConversionError, state_dict_to_numpy
from pkm_models.torch_fast import fast_module
from pkm_models.torch_pkm import build_torch_model
from pkm_models.weights import make_weights, share_tables

BASE = PKMConfig(input_dim=24, output_dim=24, k_dim=8, heads=2, knn=4, n_keys=8)
META = BASE.replace(swilu_projection=True, value_dtype="bfloat16", share_values=True)


def _x(shape=(2, 3, 24), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _taps(model, x):
    with torch.inference_mode():
        return {k: v.numpy() for k, v in model(torch.from_numpy(x), return_taps=True).items()}


def _bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even), the textbook way on the bits."""
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    lower = bits & 0xFFFF
    upper = bits >> 16
    up = (lower > 0x8000) | ((lower == 0x8000) & (upper & 1 == 1))
    return ((upper + up.astype(np.uint64)) << 16).astype(np.uint32).view(np.float32)


def _sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def test_xlm_config_serialises_as_before():
    assert BASE.variant == []
    assert set(BASE.to_dict()) == {
        "input_dim",
        "output_dim",
        "k_dim",
        "heads",
        "knn",
        "n_keys",
        "query_batchnorm",
        "input_dropout",
        "query_dropout",
        "value_dropout",
    }
    assert tap_names(1, BASE) == list(TAPS)
    assert PKMConfig.from_dict(META.to_dict()) == META
    assert PKMConfig(value_dim=-1) == PKMConfig()  # Meta's spelling of "the output dim"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("value_dtype", "float16", "value_dtype"), ("value_dim", -2, "value_dim"), ("gated", 1, "true or false")],
)
def test_bad_options_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        BASE.replace(**{field: value})


def test_swilu_and_gate_follow_the_formula():
    config = BASE.replace(swilu_projection=True, gated=True, value_dim=16)
    model = build_torch_model(config, seed=2).eval()
    w = make_weights(config, 2)
    x = _x()
    taps = _taps(model, x)
    assert taps["output"].shape == (2, 3, 16)  # the read: v_dim
    assert taps[LAYER_OUTPUT].shape == (2, 3, 24)  # the layer's output: output_dim
    flat = x.reshape(-1, 24).astype(np.float64)
    read = taps["output"].reshape(-1, 16).astype(np.float64)
    swilu = flat @ w["swilu_projection.weight"].T + w["swilu_projection.bias"]
    out = (read * swilu * _sigmoid(swilu)) @ w["value_proj.weight"].T + w["value_proj.bias"]
    out = _sigmoid(flat @ w["gating.weight"].T + w["gating.bias"]) * out
    np.testing.assert_allclose(taps[LAYER_OUTPUT].reshape(-1, 24), out, rtol=1e-5, atol=1e-6)
    # the read is still the weighted sum of the selected rows
    rows = w["values.weight"][taps["indices"]]  # (bs*heads,knn,v_dim)
    summed = np.einsum("rk,rkv->rv", taps["weights"].astype(np.float64), rows).reshape(-1, 2, 16).sum(1)
    np.testing.assert_allclose(read, summed, rtol=1e-5, atol=1e-6)
    # the deployed forward returns the layer's output
    with torch.inference_mode():
        np.testing.assert_array_equal(model(torch.from_numpy(x)).numpy(), taps[LAYER_OUTPUT])


def test_bf16_table_sums_in_float32_in_slot_order_and_rounds_once():
    config = BASE.replace(value_dtype="bfloat16")
    model = build_torch_model(config, seed=4).eval()
    assert model.values.weight.dtype == torch.bfloat16
    table = make_weights(config, 4)["values.weight"]
    np.testing.assert_array_equal(_bf16(table), table)  # the generated table holds bf16 values
    x = _x(seed=5)
    taps = _taps(model, x)
    idx = taps["indices"].reshape(-1, 2 * 4)  # (bs,heads*knn): slot order
    wts = taps["weights"].reshape(-1, 2 * 4)
    acc = np.zeros((idx.shape[0], 24), np.float32)
    for j in range(idx.shape[1]):
        acc = acc + wts[:, j : j + 1] * table[idx[:, j]]  # float32 product, float32 sum
    np.testing.assert_array_equal(taps["output"].reshape(-1, 24), _bf16(acc))


def test_shared_table_is_held_once():
    model = build_torch_model(META, layers=3, seed=1).eval()
    tables = {layer.values.weight.data_ptr() for layer in model.layers}
    assert len(tables) == 1
    weights = make_weights(META, 1, layers=3)
    assert weights["layers.1.values.weight"] is weights["layers.0.values.weight"]
    unique = {id(v) for v in weights.values()}
    assert len(unique) == len(weights) - 2
    # loading checks the aliases are one table
    bad = dict(weights)
    bad["layers.2.values.weight"] = bad["layers.0.values.weight"] + 1
    with pytest.raises(ConversionError, match=r"layers\.2\.values\.weight differs"):
        model.load_weights(bad)
    # copies that are equal are made one array again
    copied = {k: np.array(v) for k, v in weights.items()}
    shared = share_tables(copied, META)
    assert shared["layers.2.values.weight"] is shared["layers.0.values.weight"]
    # round trip through a state_dict (bf16 comes back as float32 holding the same values)
    back = state_dict_to_numpy(model.state_dict())
    assert all(np.array_equal(back[k], weights[k]) for k in weights)


def test_layers_feed_their_projected_output_forward():
    model = build_torch_model(META, layers=3, seed=1).eval()
    x = _x()
    taps = _taps(model, x)
    with torch.inference_mode():
        second = model.layers[1](torch.from_numpy(taps["0/" + LAYER_OUTPUT]), return_taps=True)
    np.testing.assert_array_equal(second["query"].numpy(), taps["1/query"])
    assert list(taps) == tap_names(3, META)


@pytest.mark.parametrize("weighted_sum", ["gather", "bag"])
def test_loop_free_twin_agrees(weighted_sum):
    config = META.replace(gated=True)
    model = build_torch_model(config, layers=3, seed=6).eval()
    x = _x((2, 5, 24), seed=7)
    ref = _taps(model, x)
    fast = _taps(fast_module(model, weighted_sum), x)
    assert list(fast) == list(ref)
    for name in ref:  # sub-key scores come from one batched matmul: float32 rounding apart
        if name.endswith("indices"):
            np.testing.assert_array_equal(fast[name], ref[name], err_msg=name)
        else:
            np.testing.assert_allclose(fast[name], ref[name], atol=1e-6, rtol=1e-6, err_msg=name)


def test_xlm_default_is_bit_identical_to_embedding_bag():
    """XLM's layer still sums with nn.EmbeddingBag (no float32 loop, no extra tap)."""
    model = build_torch_model(BASE, seed=3).eval()
    x = _x()
    taps = _taps(model, x)
    assert list(taps) == list(TAPS)
    with torch.inference_mode():
        bag = model.values(
            torch.from_numpy(taps["indices"]).view(-1, 8),
            per_sample_weights=torch.from_numpy(taps["weights"]).view(-1, 8),
        )
    np.testing.assert_array_equal(taps["output"].reshape(-1, 24), bag.numpy())
