"""Property-based: every valid config runs and agrees across PyTorch and Keras; every
invalid one fails with the project's own error type."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pkm_models import PKMConfig
from pkm_models.errors import PKMError
from pkm_models.weights import make_input
from tests.models.helpers import assert_taps_match, build_pair, keras_taps, torch_taps


@st.composite
def valid_configs(draw):
    n_keys = draw(st.integers(1, 12))
    return PKMConfig(
        input_dim=draw(st.integers(1, 12)),
        output_dim=draw(st.integers(1, 12)),
        k_dim=2 * draw(st.integers(1, 6)),
        heads=draw(st.integers(1, 3)),
        knn=draw(st.integers(1, n_keys)),
        n_keys=n_keys,
        query_batchnorm=draw(st.booleans()),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=valid_configs(), lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**31))
def test_every_valid_config_agrees_across_frameworks(config, lead, seed):
    torch_layer, keras_layer, weights = build_pair(config, seed=seed % 1000, input_rank=len(lead) + 1)
    x = make_input((*lead, config.input_dim), seed=seed % 997)
    ref = torch_taps(torch_layer, x)
    got = keras_taps(keras_layer, x)
    assert np.all(np.isfinite(ref["output"]))
    assert_taps_match(ref, got, weights, config, atol=1e-5)


bad_field = st.sampled_from(
    [
        {"k_dim": 3},
        {"k_dim": 0},
        {"knn": 13, "n_keys": 12},
        {"heads": 0},
        {"input_dim": -2},
        {"output_dim": 0},
        {"n_keys": 0, "knn": 0},
        {"input_dropout": 1.5},
        {"heads": 1.5},
        {"query_batchnorm": 1},
        {"value_dropout": "0.1"},
    ]
)


@settings(max_examples=40, deadline=None)
@given(base=valid_configs(), bad=bad_field)
def test_every_invalid_config_fails_with_the_projects_error(base, bad):
    with pytest.raises(PKMError):
        PKMConfig.from_dict({**base.to_dict(), **bad})


@settings(max_examples=30, deadline=None)
@given(extra=st.dictionaries(st.text(min_size=1, max_size=8), st.integers(), min_size=1, max_size=3))
def test_unknown_fields_fail_with_the_projects_error(extra):
    known = set(PKMConfig.__dataclass_fields__)
    extra = {k: v for k, v in extra.items() if k not in known}
    assume(extra)
    with pytest.raises(PKMError, match="unknown PKMConfig field"):
        PKMConfig.from_dict(extra)
