"""The loop-free forward is the reference's function, tap for tap."""

import numpy as np
import pytest
import torch

from pkm_models import get_preset
from pkm_models.torch_fast import fast_module
from pkm_models.torch_pkm import HashingMemory, PKMStack, build_torch_model
from pkm_models.weights import make_input, make_weights
from tests.models.helpers import assert_taps_match


@pytest.mark.parametrize("weighted_sum", ["gather", "bag"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("lead", [(6,), (2, 3), (2, 2, 3)], ids=["2d", "3d", "4d"])
def test_fast_forward_matches_the_reference(preset, bn, lead, weighted_sum):
    config = get_preset(preset).config.replace(query_batchnorm=bn)
    reference = HashingMemory.from_config(config, seed=1).eval()
    fast = fast_module(reference, weighted_sum=weighted_sum)
    x = torch.from_numpy(make_input((*lead, config.input_dim), seed=len(lead)))
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in reference(x, return_taps=True).items()}
        got = {k: v.numpy() for k, v in fast(x, return_taps=True).items()}
    assert_taps_match(ref, got, make_weights(config, 1), config, atol=1e-6)


def test_fast_stack_shares_parameters_and_matches():
    config = get_preset("tiny").config.replace(output_dim=16)
    reference = build_torch_model(config, layers=3, seed=0).eval()
    assert isinstance(reference, PKMStack)
    fast = fast_module(reference)
    assert fast.layers[0].reference.values.weight is reference.layers[0].values.weight
    x = torch.from_numpy(make_input((2, 4, 16), seed=0))
    with torch.no_grad():
        np.testing.assert_allclose(fast(x).numpy(), reference(x).numpy(), atol=1e-6)


def test_rejects_other_modules():
    with pytest.raises(TypeError, match="expected HashingMemory or PKMStack"):
        fast_module(torch.nn.Linear(2, 2))


def test_unknown_weighted_sum_lists_the_known_ones():
    reference = HashingMemory.from_config(get_preset("tiny").config, seed=0)
    with pytest.raises(ValueError, match=r"unknown weighted_sum 'loop'; available: \['gather', 'bag'\]"):
        fast_module(reference, weighted_sum="loop")
