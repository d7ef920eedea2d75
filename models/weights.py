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
==========================  =========================================================

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
    return shapes


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
        out.update(_layer_weights(config, seed, prefix))
    return out


def _layer_weights(config: PKMConfig, seed: int, prefix: str) -> Weights:
    shapes = weight_shapes(config)
    return {prefix + name: next(_draw(config, seed, prefix, name, shape)) for name, shape in shapes.items()}


def _draw(config: PKMConfig, seed: int, prefix: str, name: str, shape: tuple[int, ...], rows: int | None = None):
    """The tensor ``prefix + name`` in blocks of ``rows`` along its first axis (one block if
    None). A generator's draws are sequential, so the blocks concatenated are exactly the
    tensor drawn at once."""
    c, key = config, prefix + name
    rows = rows or shape[0]
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
    elif name in ("query_proj.1.bias", "query_proj.1.running_mean", "values.weight"):
        low = high = None
    else:  # pragma: no cover - weight_shapes and this table are edited together
        raise AssertionError(f"no initialiser for {name}")
    std = 0.2 if name != "values.weight" else c.v_dim**-0.5
    rng = _rng(seed, key)
    for start in range(0, shape[0], rows):
        block = (min(rows, shape[0] - start), *shape[1:])
        if low is not None:
            yield rng.uniform(low, high, size=block).astype(np.float32)
        else:
            # Drawn directly in float32: the value table is hundreds of MB at the XLM size.
            out = rng.standard_normal(size=block, dtype=np.float32)
            out *= np.float32(std)
            yield out


def weight_blocks(config: PKMConfig, seed: int, *, layers: int = 1, rows: int = 1 << 16):
    """``(name, shape, blocks)`` for every tensor of :func:`make_weights`, each tensor drawn
    in blocks of at most ``rows`` rows, so that a model of any size can be written to disk
    holding one block in memory."""
    for i in range(layers):
        prefix = "" if layers == 1 else f"layers.{i}."
        for name, shape in weight_shapes(config).items():
            yield prefix + name, shape, _draw(config, seed, prefix, name, shape, rows)


def make_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A standard-normal float32 input of ``shape``, deterministic in ``seed``."""
    return _normal(seed, "input", tuple(shape), std=1.0)
