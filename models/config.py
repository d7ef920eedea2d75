"""One config type for both implementations, its validation, and the named presets.

The defaults are those of XLM's ``HashingMemory`` in the PKM-layer notebook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pkm_models.errors import PKMError

# The named tensors every implementation and export can return, in pipeline order:
# query (bs*heads, k_dim), scores / indices / weights (bs*heads, knn), output (..., v_dim).
TAPS = ("query", "scores", "indices", "weights", "output")


def tap_names(layers: int) -> list[str]:
    """The taps of a network of ``layers`` PKM layers, in pipeline order: the bare
    :data:`TAPS` for one layer; ``<i>/<tap>`` for every layer ``i`` of more."""
    if layers == 1:
        return list(TAPS)
    return [f"{i}/{tap}" for i in range(layers) for tap in TAPS]


class ConfigError(PKMError, ValueError):
    """A config field is missing, unknown, of the wrong type or out of range."""


@dataclasses.dataclass(frozen=True)
class PKMConfig:
    """Hyper-parameters of one product-key memory layer.

    ``input_dim`` is only needed by the PyTorch reference; the Keras port reads it from
    the input shape when it is built.
    """

    input_dim: int = 768
    output_dim: int = 768  # v_dim: the size of a value row
    k_dim: int = 256  # query and key size; split in two halves for the product keys
    heads: int = 4
    knn: int = 32  # value rows read per head
    n_keys: int = 512  # sub-keys per half: the memory has n_keys**2 value rows
    query_batchnorm: bool = False
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"PKMConfig.{f.name}: expected an integer, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"PKMConfig.{f.name}: expected true or false, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ConfigError(f"PKMConfig.{f.name}: expected a number, got {value!r}")
        for name in ("input_dim", "output_dim", "k_dim", "heads", "knn", "n_keys"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"PKMConfig.{name}: must be positive, got {getattr(self, name)}")
        if self.k_dim % 2:
            raise ConfigError(
                f"PKMConfig.k_dim: must be even (it is split into two product-key halves), got {self.k_dim}"
            )
        if self.knn > self.n_keys:
            raise ConfigError(
                f"PKMConfig.knn: cannot select {self.knn} of only n_keys={self.n_keys} sub-keys; use knn <= n_keys"
            )
        for name in ("input_dropout", "query_dropout", "value_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"PKMConfig.{name}: must be in [0, 1), got {p}")

    # derived sizes ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of value rows (memory slots)."""
        return self.n_keys**2

    @property
    def v_dim(self) -> int:
        return self.output_dim

    @property
    def half(self) -> int:
        return self.k_dim // 2

    # (de)serialization ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PKMConfig:
        """Build a config from a mapping, rejecting unknown keys by name."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a PKM config must be a mapping of field -> value, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown PKMConfig field(s) {unknown}; known fields: {known}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> PKMConfig:
        """A copy with some fields changed (validated like any config)."""
        return PKMConfig.from_dict({**self.to_dict(), **changes})


def check_stackable(config: PKMConfig, layers: int, what: str) -> None:
    """Raise ConfigError unless ``layers`` layers of ``config`` can run in sequence."""
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ConfigError(f"{what}: layers must be an integer >= 1, got {layers!r}")
    if layers > 1 and config.input_dim != config.output_dim:
        raise ConfigError(
            f"{what}: stacked layers need input_dim == output_dim, got {config.input_dim} -> {config.output_dim}"
        )


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model: ``layers`` identical-shape PKM layers applied in sequence, and a
    typical input shape for it."""

    name: str
    config: PKMConfig
    layers: int
    input_shape: tuple[int, ...]
    description: str

    def __post_init__(self) -> None:
        check_stackable(self.config, self.layers, f"preset {self.name!r}")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            config=PKMConfig(input_dim=16, output_dim=8, k_dim=8, heads=2, knn=4, n_keys=8),
            layers=1,
            input_shape=(3, 5, 16),
            description="a few KB of values (64 rows of 8): for quick tests",
        ),
        Preset(
            name="small",
            config=PKMConfig(input_dim=64, output_dim=64, k_dim=32, heads=4, knn=8, n_keys=32),
            layers=1,
            input_shape=(2, 7, 64),
            description="1024 value rows of 64, all features at a size that runs in milliseconds",
        ),
        Preset(
            name="xlm",
            config=PKMConfig(),
            layers=1,
            input_shape=(4, 128, 768),
            description="the XLM notebook's HashingMemory defaults at 768 -> 768 (805 MB of values)",
        ),
        Preset(
            name="seed-bench",
            config=PKMConfig(),
            layers=6,
            input_shape=(16, 256, 768),
            description="the seed README's benchmark: 6 XLM-default layers, 768 -> 768 (4.8 GB)",
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None
