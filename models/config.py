"""One config type for both implementations, its validation, and the named presets.

The defaults are those of XLM's ``HashingMemory`` in the PKM-layer notebook.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pkm_models.errors import PKMError

# The named tensors every implementation and export can return, in pipeline order:
# query (bs*heads, k_dim), scores / indices / weights (bs*heads, knn), output (..., v_dim):
# the memory's weighted sum of value rows. These five are the contract.
TAPS = ("query", "scores", "indices", "weights", "output")
# A layer that projects or gates its read (Meta's memory layers: SwiLU projection,
# ``mem_v_dim``, gating) adds its final output after ``output``: (..., output_dim).
LAYER_OUTPUT = "layer_output"
VALUE_DTYPES = ("float32", "bfloat16")


def layer_taps(config: PKMConfig | None = None) -> tuple[str, ...]:
    """One layer's taps: :data:`TAPS`, and :data:`LAYER_OUTPUT` for a layer whose final
    output is not its weighted sum (``config.projects_output``)."""
    return (*TAPS, LAYER_OUTPUT) if config is not None and config.projects_output else TAPS


def tap_names(layers: int, config: PKMConfig | None = None) -> list[str]:
    """The taps of a network of ``layers`` PKM layers of ``config``, in pipeline order: the
    bare :func:`layer_taps` for one layer; ``<i>/<tap>`` for every layer ``i`` of more."""
    taps = layer_taps(config)
    if layers == 1:
        return list(taps)
    return [f"{i}/{tap}" for i in range(layers) for tap in taps]


class ConfigError(PKMError, ValueError):
    """A config field is missing, unknown, of the wrong type or out of range."""


@dataclasses.dataclass(frozen=True)
class PKMConfig:
    """Hyper-parameters of one product-key memory layer.

    ``input_dim`` is only needed by the PyTorch reference; the Keras port reads it from
    the input shape when it is built.

    The fields after the dropouts are the options of Meta's memory layers ("Memory Layers
    at Scale", docs/memory-layers.md); their defaults are XLM's layer, and a config that
    leaves them at their defaults serialises as before (:meth:`to_dict`).
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
    # Meta's memory layers (each default is XLM's behaviour)
    value_dim: int = 0  # mem_v_dim: 0 (or Meta's -1): the value dim is output_dim; > 0: own size, projected
    swilu_projection: bool = False  # value_proj(read * silu(swilu_projection(input)))
    gated: bool = False  # mem_gated: sigmoid(gating(input)) * out
    value_dtype: str = "float32"  # "bfloat16": the table is stored in bf16, summed in float32
    share_values: bool = False  # mem_share_values: every layer of a network reads one table

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"PKMConfig.{f.name}: expected an integer, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"PKMConfig.{f.name}: expected true or false, got {value!r}")
            if f.type == "str" and not isinstance(value, str):
                raise ConfigError(f"PKMConfig.{f.name}: expected a string, got {value!r}")
            if f.type == "float" and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ConfigError(f"PKMConfig.{f.name}: expected a number, got {value!r}")
        if self.value_dim == -1:  # Meta's spelling of "the output dim"
            object.__setattr__(self, "value_dim", 0)
        if self.value_dim < 0:
            raise ConfigError(f"PKMConfig.value_dim: 0 or -1 (the output dim) or a positive size, got {self.value_dim}")
        if self.value_dtype not in VALUE_DTYPES:
            raise ConfigError(f"PKMConfig.value_dtype: expected one of {list(VALUE_DTYPES)}, got {self.value_dtype!r}")
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
        """The size of a value row: ``value_dim`` when set, else ``output_dim``."""
        return self.value_dim or self.output_dim

    @property
    def projects_value(self) -> bool:
        """The read goes through ``value_proj`` (Meta's ``v_proj``: SwiLU, or an own value dim)."""
        return self.swilu_projection or self.value_dim > 0

    @property
    def projects_output(self) -> bool:
        """The layer's output is not its weighted sum: it is projected or gated."""
        return self.projects_value or self.gated

    @property
    def variant(self) -> list[str]:
        """The options of Meta's memory layers this config sets (empty for XLM's layer)."""
        defaults = PKMConfig()
        return [name for name in _VARIANT_FIELDS if getattr(self, name) != getattr(defaults, name)]

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
        """Every field, except Meta's options left at their (XLM) defaults: an XLM config
        serialises exactly as it did before they existed."""
        out = dataclasses.asdict(self)
        for name in _VARIANT_FIELDS:
            if name not in self.variant:
                del out[name]
        return out

    def replace(self, **changes: Any) -> PKMConfig:
        """A copy with some fields changed (validated like any config)."""
        return PKMConfig.from_dict({**self.to_dict(), **changes})


_VARIANT_FIELDS = ("value_dim", "swilu_projection", "gated", "value_dtype", "share_values")


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
