"""Deterministic weights: a pure function of (config, seed), made in numpy.

Every tensor draws from its own generator, seeded by ``(seed, crc32(name))``, so a tensor's
values depend only on the seed, its name and its shape: adding layers, turning batchnorm
on or generating tensors in another order never changes the others. The distributions
follow the reference's initialisation:

==========================  =========================================================
``keys``                    uniform(-1/sqrt(k_dim/2), +1/sqrt(k_dim/2)), like XLM's
                            ``get_uniform_keys``
``values.weight``           normal(0, v_dim**-0.5), like XLM's ``nn.init.normal_``
``query_proj.0.*``          uniform(-1/sqrt(input_dim), +1/sqrt(input_dim)), like
                            ``nn.Linear``'s default
``query_proj.1.*``          batchnorm: affine parameters and running statistics drawn
                            away from the identity (weight in [0.5, 1.5], bias and
                            running mean normal(0, 0.2), running variance in
                            [0.25, 2]) so that batchnorm matters in every comparison
``value_proj.*``             Meta's memory layers (SwiLU, or an own value dim):
                            weight normal(0, output_dim**-0.5) as Meta's
                            ``reset_parameters``, bias like ``nn.Linear``'s default
``swilu_projection.*``      weight normal(0, output_dim**-0.5), bias like ``nn.Linear``
``gating.*``                weight normal(0, input_dim**-0.5), bias like ``nn.Linear``
==========================  =========================================================

A ``bfloat16`` value table is drawn as above and rounded to the nearest bf16 (ties to
even): the arrays stay float32, holding bf16 values exactly. With ``share_values`` the
table is drawn once (``layers.0.values.weight``) and every layer's ``values.weight`` is
that same array: held once.

Names are the PyTorch reference's ``state_dict`` names; a stack of layers prefixes them
with ``layers.<i>.``.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from pkm_models.config import PKMConfig

Weights = dict[str, np.ndarray]


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))


def _normal(seed: int, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
    # Drawn directly in float32: the value table is hundreds of MB at the XLM size.
    out = _rng(seed, name).standard_normal(size=shape, dtype=np.float32)
    out *= np.float32(std)
    out += np.float32(mean)
    return out


def weight_shapes(config: PKMConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every float tensor of one layer (no ``num_batches_tracked``)."""
    c = config
    shapes = {
        "query_proj.0.weight": (c.heads * c.k_dim, c.input_dim),
        "query_proj.0.bias": (c.heads * c.k_dim,),
    }
    if c.query_batchnorm:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"query_proj.1.{suffix}"] = (c.heads * c.k_dim,)
    shapes["keys"] = (c.heads, 2, c.n_keys, c.half)
    shapes["values.weight"] = (c.size, c.v_dim)
    if c.projects_value:
        shapes["value_proj.weight"] = (c.output_dim, c.v_dim)
        shapes["value_proj.bias"] = (c.output_dim,)
    if c.swilu_projection:
        shapes["swilu_projection.weight"] = (c.v_dim, c.input_dim)
        shapes["swilu_projection.bias"] = (c.v_dim,)
    if c.gated:
        shapes["gating.weight"] = (1, c.input_dim)
        shapes["gating.bias"] = (1,)
    return shapes


def round_to_bfloat16(array: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 value (ties to even), still as float32 (in place)."""
    bits = array.view(np.uint32)
    bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    bits &= np.uint32(0xFFFF0000)
    return array


def share_tables(weights: Weights, config: PKMConfig) -> Weights:
    """With ``config.share_values``: every layer's ``values.weight`` made the one array of
    layer 0 (held once), after checking that they are equal; else ``weights`` unchanged."""
    names = sorted((k for k in weights if k.endswith("values.weight")), key=lambda k: (len(k), k))
    if not config.share_values or len(names) < 2:
        return weights
    table = weights[names[0]]
    for name in names[1:]:
        if weights[name] is not table and not np.array_equal(weights[name], table):
            from pkm_models.convert import ConversionError

            raise ConversionError(f"share_values: {name} differs from {names[0]}; a shared table is one table")
    return {k: (table if k in names else v) for k, v in weights.items()}


def shared_aliases(config: PKMConfig, layers: int) -> dict[str, str]:
    """With ``config.share_values``: the name of every layer's value table after the first
    -> layer 0's (the one table they all are); else empty."""
    if not config.share_values or layers < 2:
        return {}
    return {f"layers.{i}.values.weight": "layers.0.values.weight" for i in range(1, layers)}


def make_weights(config: PKMConfig, seed: int, *, layers: int = 1) -> Weights:
    """All float32 weights of ``layers`` PKM layers, keyed by ``state_dict`` name.

    With ``layers == 1`` the names are those of a single ``HashingMemory``; with more,
    those of a ``PKMStack`` (``layers.<i>.<name>``).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out: Weights = {}
    for i in range(layers):
        prefix = "" if layers == 1 else f"layers.{i}."
        if config.share_values and i > 0:  # one table, drawn once: layer 0's
            layer = _layer_weights(config, seed, prefix, skip="values.weight")
            layer[f"{prefix}values.weight"] = out["layers.0.values.weight"]
        else:
            layer = _layer_weights(config, seed, prefix)
        out.update(layer)
    return out


def _layer_weights(config: PKMConfig, seed: int, prefix: str, skip: str = "") -> Weights:
    shapes = weight_shapes(config)
    return {
        prefix + name: next(_draw(config, seed, prefix, name, shape)) for name, shape in shapes.items() if name != skip
    }


# the tensors drawn from a uniform distribution (in float64, then cast), as _draw does
UNIFORM = (
    "query_proj.0.weight",
    "query_proj.0.bias",
    "query_proj.1.weight",
    "query_proj.1.running_var",
    "keys",
    "value_proj.bias",
    "swilu_projection.bias",
    "gating.bias",
)


def _draw(config: PKMConfig, seed: int, prefix: str, name: str, shape: tuple[int, ...], rows: int | None = None):
    """The tensor ``prefix + name`` in blocks of ``rows`` along its first axis (one block if
    None). A generator's draws are sequential, so the blocks concatenated are exactly the
    tensor drawn at once."""
    c, key = config, prefix + name
    rows = rows or shape[0]
    std = 0.2
    if name in ("query_proj.0.weight", "query_proj.0.bias"):
        bound = 1.0 / math.sqrt(c.input_dim)
        low, high = -bound, bound
    elif name == "query_proj.1.weight":
        low, high = 0.5, 1.5
    elif name == "query_proj.1.running_var":
        low, high = 0.25, 2.0
    elif name == "keys":
        bound = 1.0 / math.sqrt(c.half)
        low, high = -bound, bound
    elif name in ("query_proj.1.bias", "query_proj.1.running_mean"):
        low = high = None
    elif name == "values.weight":
        low = high = None
        std = c.v_dim**-0.5
    elif name in ("value_proj.weight", "swilu_projection.weight"):
        low = high = None
        std = c.output_dim**-0.5
    elif name == "gating.weight":
        low = high = None
        std = c.input_dim**-0.5
    elif name in ("value_proj.bias", "swilu_projection.bias", "gating.bias"):
        bound = 1.0 / math.sqrt(c.v_dim if name == "value_proj.bias" else c.input_dim)
        low, high = -bound, bound
    else:  # pragma: no cover - weight_shapes and this table are edited together
        raise AssertionError(f"no initialiser for {name}")
    rng = _rng(seed, key)
    for start in range(0, shape[0], rows):
        block = (min(rows, shape[0] - start), *shape[1:])
        if low is not None:
            yield rng.uniform(low, high, size=block).astype(np.float32)
        else:
            # Drawn directly in float32: the value table is hundreds of MB at the XLM size.
            out = rng.standard_normal(size=block, dtype=np.float32)
            out *= np.float32(std)
            if name == "values.weight" and c.value_dtype == "bfloat16":
                round_to_bfloat16(out)
            yield out


def weight_blocks(config: PKMConfig, seed: int, *, layers: int = 1, rows: int = 1 << 16):
    """``(name, shape, blocks)`` for every tensor of :func:`make_weights`, each tensor drawn
    in blocks of at most ``rows`` rows, so that a model of any size can be written to disk
    holding one block in memory. A shared value table (``share_values``) is drawn as layer
    0's for every layer."""
    for i in range(layers):
        prefix = "" if layers == 1 else f"layers.{i}."
        for name, shape in weight_shapes(config).items():
            source = "layers.0." if (config.share_values and name == "values.weight" and layers > 1) else prefix
            yield prefix + name, shape, _draw(config, seed, source, name, shape, rows)


def generation_bytes(config: PKMConfig, rows: int | None = 1 << 16) -> int:
    """The most memory drawing one block of :func:`weight_blocks` (``rows`` rows; None:
    whole tensors, as :func:`make_weights`) holds at once besides what was drawn before:
    a uniform draw is made in float64 and cast (12 bytes an element), a normal one in
    float32 (4). A wide query projection is one block whatever ``rows``: input_dim
    100,000,000 draws 12.8 GB of float64 at once."""
    peak = 0
    for name, shape in weight_shapes(config).items():
        block = min(rows or shape[0], shape[0]) * math.prod(shape[1:])
        uniform = name in UNIFORM
        peak = max(peak, block * (12 if uniform else 4))
    return peak


def make_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A standard-normal float32 input of ``shape``, deterministic in ``seed``."""
    return _normal(seed, "input", tuple(shape), std=1.0)
