import dataclasses

import pytest

from pkm_models import PRESETS, ConfigError, PKMConfig, get_preset
from pkm_models.errors import PKMError


def test_defaults_are_the_xlm_notebooks():
    c = PKMConfig()
    assert (c.k_dim, c.heads, c.knn, c.n_keys, c.query_batchnorm) == (256, 4, 32, 512, False)
    assert c.size == 512**2


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"k_dim": 7}, "k_dim"),
        ({"knn": 9, "n_keys": 8}, "knn"),
        ({"heads": 0}, "heads"),
        ({"input_dim": -1}, "input_dim"),
        ({"output_dim": 0}, "output_dim"),
        ({"n_keys": 0, "knn": 0}, "knn"),
        ({"input_dropout": 1.0}, "input_dropout"),
        ({"query_dropout": -0.1}, "query_dropout"),
        ({"heads": 2.5}, "heads"),
        ({"heads": True}, "heads"),
        ({"query_batchnorm": "yes"}, "query_batchnorm"),
    ],
)
def test_invalid_field_is_named(changes, field):
    with pytest.raises(ConfigError, match=rf"PKMConfig\.{field}"):
        PKMConfig(**changes)


def test_unknown_field_is_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown PKMConfig field\(s\) \['kdim'\]; known fields: \['input_dim'"):
        PKMConfig.from_dict({"kdim": 4})


def test_config_errors_are_the_projects_and_value_errors():
    with pytest.raises(PKMError):
        PKMConfig(k_dim=3)
    with pytest.raises(ValueError):
        PKMConfig(k_dim=3)


def test_round_trip_through_dict():
    c = PKMConfig(input_dim=10, query_batchnorm=True)
    assert PKMConfig.from_dict(c.to_dict()) == c
    assert c.replace(knn=4).knn == 4
    with pytest.raises(ConfigError):
        c.replace(knn=10_000)


def test_presets():
    assert set(PRESETS) >= {"tiny", "small", "xlm", "seed-bench"}
    tiny = get_preset("tiny")
    assert tiny.config.size * tiny.config.v_dim * 4 < 16 * 1024  # a few KB of values
    assert get_preset("xlm").config == dataclasses.replace(PKMConfig(), input_dim=768, output_dim=768)
    seed = get_preset("seed-bench")
    assert (seed.layers, seed.input_shape, seed.config.query_batchnorm) == (6, (16, 256, 768), False)
    for p in PRESETS.values():
        assert p.input_shape[-1] == p.config.input_dim


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(
        ConfigError, match=r"unknown preset 'huge'; available: \['seed-bench', 'small', 'tiny', 'xlm'\]"
    ):
        get_preset("huge")
