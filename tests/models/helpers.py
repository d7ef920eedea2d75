"""Building both implementations with the same weights, and comparing their taps."""

from __future__ import annotations

import numpy as np
import torch

from pkm_models import PKMConfig, make_weights
from pkm_models.config import tap_names
from pkm_models.convert import pkm_layers, set_keras_weights, split_layers
from pkm_models.keras_pkm import ProductKeyMemory, build_keras_model
from pkm_models.selection import selection_margins
from pkm_models.stack import stack_forward
from pkm_models.torch_pkm import HashingMemory, build_torch_model

# Scores closer than this at a top-k boundary may legitimately select differently in
# float32 (scores agree to ~1e-6 between the frameworks, see test_equivalence).
TIE_TOL = 1e-5

# every option of Meta's memory layers at once: own value dim, SwiLU, gate, one bf16 table
META_ALL_OPTIONS = PKMConfig(
    input_dim=24,
    output_dim=24,
    k_dim=8,
    heads=2,
    knn=4,
    n_keys=8,
    value_dim=16,
    swilu_projection=True,
    gated=True,
    value_dtype="bfloat16",
    share_values=True,
)


def build_pair(config: PKMConfig, seed: int = 0, method: str = "einsum", input_rank: int = 3):
    """(torch HashingMemory, built Keras ProductKeyMemory, numpy weights), same weights."""
    weights = make_weights(config, seed)
    torch_layer = HashingMemory(**config.to_dict())
    torch_layer.load_weights(weights)
    keras_layer = ProductKeyMemory.from_pkm_config(config, method=method)
    keras_layer.build((None,) * (input_rank - 1) + (config.input_dim,))
    set_keras_weights(keras_layer, weights)
    return torch_layer, keras_layer, weights


def torch_taps(layer: HashingMemory, x: np.ndarray, training: bool = False) -> dict[str, np.ndarray]:
    layer.train(training)
    with torch.no_grad():
        taps = layer(torch.from_numpy(x), return_taps=True)
    return {k: v.numpy() for k, v in taps.items()}


def keras_taps(layer: ProductKeyMemory, x: np.ndarray, training: bool = False) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in layer(x, training=training, return_taps=True).items()}


def assert_taps_match(ref, got, weights, config: PKMConfig, atol: float) -> dict[str, float]:
    """Assert that ``got`` matches ``ref`` tap by tap; returns the max abs error per tap.

    Rows whose selection differs must be near-ties in the reference (margin < TIE_TOL);
    for those rows, ``got``'s output must be the weighted sum of its own selection.
    """
    errors = {}
    for name in ("query", "scores", "indices", "weights", "output"):
        assert ref[name].shape == got[name].shape, f"{name}: shape {got[name].shape} != {ref[name].shape}"
    assert got["indices"].dtype == np.int64 and ref["indices"].dtype == np.int64
    errors["query"] = float(np.abs(ref["query"] - got["query"]).max())
    assert errors["query"] <= atol, f"query differs by {errors['query']}"

    margins = selection_margins(ref["query"], weights["keys"], config.knn)
    differ = np.any(ref["indices"] != got["indices"], axis=1)  # (bs*heads,)
    assert np.all(margins[differ] < TIE_TOL), (
        f"{int(differ.sum())} rows select different slots without a near-tie: margins {margins[differ]}"
    )
    same = ~differ
    for name in ("scores", "weights"):
        errors[name] = float(np.abs(ref[name][same] - got[name][same]).max(initial=0.0))
        assert errors[name] <= atol, f"{name} differs by {errors[name]}"

    out_ref = ref["output"].reshape(-1, config.v_dim)
    out_got = got["output"].reshape(-1, config.v_dim)
    token_differs = differ.reshape(-1, config.heads).any(axis=1)  # (bs,)
    errors["output"] = float(np.abs(out_ref[~token_differs] - out_got[~token_differs]).max(initial=0.0))
    assert errors["output"] <= atol, f"output differs by {errors['output']}"
    if token_differs.any():  # the other framework's output is its own selection's weighted sum
        values = weights["values.weight"].astype(np.float64)
        idx = got["indices"].reshape(-1, config.heads * config.knn)[token_differs]
        w = got["weights"].reshape(-1, config.heads * config.knn)[token_differs].astype(np.float64)
        expected = np.einsum("bn,bnd->bd", w, values[idx])
        assert np.abs(out_got[token_differs] - expected).max() <= atol
    errors["ambiguous_rows"] = int(differ.sum())
    return errors


# --- networks: build_torch_model / build_keras_model, every layer's taps -----------------------
def build_models(config: PKMConfig, layers: int = 1, seed: int = 0, method: str = "einsum"):
    """(torch reference, Keras model, numpy weights): ``layers`` layers of ``config`` built
    the way the conformance run builds them, loaded with the same weights."""
    weights = make_weights(config, seed, layers=layers)
    return (
        build_torch_model(config, layers, weights=weights),
        build_keras_model(config, layers, seed=None, method=method, weights=weights),
        weights,
    )


def torch_model_taps(model, x: np.ndarray, training: bool = False) -> dict[str, np.ndarray]:
    model.train(training)
    with torch.no_grad():
        taps = model(torch.from_numpy(x), return_taps=True)
    return {k: v.numpy() for k, v in taps.items()}


def keras_model_taps(model, x, training: bool = False, fn=None) -> dict[str, np.ndarray]:
    """Every layer's taps of a Keras model (``fn``: a wrapper such as ``tf.function``)."""

    def call(layer, t, return_taps):
        return layer(t, training=training, return_taps=return_taps)

    def forward(t):
        return stack_forward(pkm_layers(model), t, call, return_taps=True)

    return {k: np.asarray(v) for k, v in (fn(forward) if fn else forward)(x).items()}


def assert_model_taps_match(
    ref, got, weights, config: PKMConfig, layers: int, atol: float, rtol: float = 0.0
) -> dict[str, float]:
    """Every tap of every layer, ``layer_output`` included: the same names in the same
    order, the same selections (none of these rows may be a near-tie in the reference),
    every float tap within ``atol + rtol * |reference|``. Returns the max abs error per tap."""
    assert list(got) == list(ref) == tap_names(layers, config)
    errors = {}
    for i, layer_weights in enumerate(split_layers(weights)):
        prefix = "" if layers == 1 else f"{i}/"
        margins = selection_margins(ref[prefix + "query"], layer_weights["keys"], config.knn)
        assert np.all(margins >= TIE_TOL), f"layer {i}: a near-tie in the reference; pick another input"
        np.testing.assert_array_equal(got[prefix + "indices"], ref[prefix + "indices"], err_msg=prefix + "indices")
        assert got[prefix + "indices"].dtype == np.int64
    for name in ref:
        assert got[name].shape == ref[name].shape and got[name].dtype == ref[name].dtype, name
        err = np.abs(got[name].astype(np.float64) - ref[name])
        errors[name] = float(err.max(initial=0.0))
        assert np.all(err <= atol + rtol * np.abs(ref[name])), f"{name} differs by {errors[name]}"
    return errors
