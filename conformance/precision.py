"""Precision as a conformance axis: names, number formats, and the rounding bounds the
verdict (:mod:`conformance.compare`) judges a path with. Nothing here judges.

Names. A path name may carry a precision suffix: ``torch-eager-cpu@bf16``,
``ort-cpu[torch-fast]@int8``. No suffix means ``fp32``, so every float32 name and golden
stays valid. :func:`split_name` and :func:`join_name` convert.

Precisions:

* ``fp16`` / ``bf16``: the model computes in that type, weights and activations; the
  taps come back as float32 (``indices`` int64), each value exactly representable in the
  type (:func:`representable`: a path whose taps are not did not compute in its type).
* ``int8``: weight-only; the value table is stored as 8-bit codes with a float32 scale
  and offset per row (:func:`quantize_rows`); queries, keys, scores, weights and the
  weighted sum stay float32.

Bounds (all per row or per token, computed from the data the run already has; every one
assumes that a runtime accumulates dot products in float32 or wider, as PyTorch's and
ONNX Runtime's CPU kernels do for half-precision ``MatMul``):

* scores, at every precision (:func:`score_error_bound`): with unit roundoff ``u`` of
  the type (2^-24 for fp32 and int8, 2^-11 for fp16, 2^-8 for bf16) and keys rounded to
  it, a path's sub-key score moves by at most ``E + (3u + h 2^-24)(A + E)`` and the
  golden's own float32 score by ``(h + 2) 2^-24 A``, where ``A = max_n sum_d |q_d| |k_nd|``
  is the row's bound on the |q|.|k| sums, ``E = max_n sum_d |dq_d| |k_nd|`` the path's own
  query error (its ``query`` tap against the golden's) carried through, and ``h`` the
  half size; a product score by the sum of both halves' bounds plus ``u`` of its size.
  Twice that (two candidates moving in opposite directions) is the row's near-tie
  margin: the margin follows the scale of each row's scores, so a deep layer with small
  scores needs no hand-set tolerance. A sorted top-k is 1-Lipschitz in the largest score
  error, so the ``scores`` tap is judged with the same bound; the ``weights`` tap
  (softmax) with a relative error of ``exp(2 * bound) - 1`` plus ``(knn + 3) u``
  (:func:`weights_rtol`).
* the weighted sum (:func:`weighted_sum_bound`): against the float64 weighted sum of the
  path's own rows and weights, each term carries the rounding of the value (``u``) and of
  the product (``u``), the result its own rounding (``u |o|``), plus float32 accumulation
  of ``n`` terms.
* int8 (:func:`int8_output_bound`): a stored value is off by at most half a step of its
  row, ``scale / 2``, so a token's output element moves by at most
  ``sum_j |w_j| * scale[idx_j] / 2`` over the slots j it reads, plus float32 rounding of
  the dequantisation and of the weighted sum.
* fp16 / bf16 query (:func:`query_error_bound`), from the layer's golden input ``x`` and
  its float32 weights: the input, the weight and the bias are rounded to the type (``u``
  each), the products accumulate in float32 (two such sums, the path's and the golden's:
  ``2 n 2^-24``), and the projection and the bias addition each round their result, so an
  element of the projection is off by at most ``(3u + 2 n 2^-24) S + 2u |b| + u |q|``
  with ``S = sum_j |x_j| |W_j|``, up to second-order terms (a factor ``1 + 16u`` covers
  them). With query batchnorm (inference: running statistics) that error is scaled by
  ``|gamma| / sqrt(var + eps)``, and the six roundings of its ops and of its rounded
  statistics add ``8u`` of ``|z - mean| |gamma| / sqrt(var + eps)`` plus ``2u |beta|``.
  The bound holds for a layer on its golden input: a network at reduced precision is
  judged layer by layer.

Sizes (:func:`check_model_bytes`): a model declared at a reduced precision must be of
that precision's size, so that a float32 model labelled int8 is refused.
"""

from __future__ import annotations

import numpy as np

from pkm_models.config import PKMConfig
from pkm_models.errors import PKMError

FP32 = "fp32"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
REDUCED = ("fp16", "bf16", "int8")
# unit roundoff of the type the model computes in (int8 computes in float32)
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8, "int8": 2.0**-24}
U32 = 2.0**-24  # float32 accumulation, assumed for every reduced-precision runtime


class PrecisionError(PKMError):
    """An unknown precision, a malformed path name, or a declared precision that the path
    does not have."""


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; known: {list(PRECISIONS)} (no suffix means fp32)")
    return precision


def split_name(name: str) -> tuple[str, str]:
    """``"ort-cpu[torch-fast]@int8"`` -> ``("ort-cpu[torch-fast]", "int8")``; no suffix -> fp32."""
    base, at, precision = name.rpartition("@")
    if not at:
        return name, FP32
    if not base or "@" in base:
        raise PrecisionError(f"malformed path name {name!r}: expected NAME or NAME@PRECISION")
    if precision == FP32:
        raise PrecisionError(f"{name!r}: float32 is written without a suffix ({base!r})")
    return base, check_precision(precision)


def join_name(base: str, precision: str) -> str:
    """The inverse of :func:`split_name`: fp32 adds no suffix."""
    check_precision(precision)
    if "@" in base:
        raise PrecisionError(f"{base!r} already carries a precision suffix")
    return base if precision == FP32 else f"{base}@{precision}"


def precision_of(name: str) -> str:
    return split_name(name)[1]


# --- number formats ------------------------------------------------------------------------
def representable(array: np.ndarray, precision: str) -> np.ndarray:
    """Elementwise: is each float32 value exactly a value of ``precision``'s type?"""
    a = np.asarray(array, np.float32)
    if precision == "fp16":
        with np.errstate(over="ignore"):
            return a.astype(np.float16).astype(np.float32) == a
    if precision == "bf16":
        bits = a.view(np.uint32)
        return (bits & np.uint32(0xFFFF)) == 0
    return np.ones(a.shape, bool)


def quantize_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The int8 value-table format: per row, offset = min, scale = (max - min) / 255,
    code = round((v - offset) / scale) as uint8. Returns codes (N, D) uint8, scale (N,)
    and offset (N,) float32. The same as PyTorch's ``embedding_bag_byte_prepack``
    (tested); a constant row has scale 0 and is exact."""
    v = np.asarray(values, np.float32)
    lo, hi = v.min(axis=1), v.max(axis=1)
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    inverse = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    codes = np.clip(np.rint((v - lo[:, None]) * inverse[:, None]), 0, 255).astype(np.uint8)
    return codes, scale, lo.astype(np.float32)


def _selected_rows(indices: np.ndarray, weights: np.ndarray, values: np.ndarray, per_token: int):
    """(|w| (bs, n) float64, the selected rows (bs, n, v_dim) float64) for ``per_token``
    slots a token; slots outside the table are clipped to it (those rows fail the
    ``indices`` tap on their own)."""
    idx = np.clip(np.asarray(indices), 0, len(values) - 1).reshape(-1, per_token)
    w = np.abs(np.asarray(weights, np.float64).reshape(-1, per_token))
    return w, np.asarray(values)[idx].astype(np.float64)


def half_steps(rows: np.ndarray) -> np.ndarray:
    """(..., ) float64 for rows (..., v_dim): the largest error of a stored int8 value, per
    row, including the float32 rounding of the quantisation and dequantisation arithmetic
    (a few ulps of the row's largest magnitude)."""
    v = np.asarray(rows, np.float32)
    lo, hi = v.min(axis=-1).astype(np.float64), v.max(axis=-1).astype(np.float64)
    magnitude = np.maximum(np.abs(lo), np.abs(hi))
    return (hi - lo) / 255 / 2 + 4 * U32 * (magnitude + (hi - lo))


def int8_output_bound(indices: np.ndarray, weights: np.ndarray, values: np.ndarray, per_token: int) -> np.ndarray:
    """(bs,) float64, derived: the largest distance between an int8 path's output element
    and the float64 weighted sum of the float32 rows it selected, per token:
    ``sum_j |w_j| * half_step[idx_j]`` plus float32 rounding of the ``n``-term sum
    (``per_token`` = heads * knn slots)."""
    w, rows = _selected_rows(indices, weights, values, per_token)  # (bs,n), (bs,n,v_dim)
    steps = half_steps(rows)  # (bs,n)
    row_max = np.abs(rows).max(axis=-1)  # (bs,n)
    quantisation = np.sum(w * steps, axis=1)
    rounding = (per_token + 2) * U32 * np.sum(w * (row_max + steps), axis=1)
    return quantisation + rounding


def weighted_sum_bound(
    indices: np.ndarray, weights: np.ndarray, values: np.ndarray, per_token: int, precision: str
) -> np.ndarray:
    """(bs,) float64, derived (float32 accumulation assumed): the largest distance between
    the path's output element and the float64 weighted sum of its own rows and weights:
    each term rounds the value and the product (2u), the sum of n terms accumulates in
    float32, the result rounds once more (u of its size). At fp32 the value needs no
    rounding and the bound is float32 accumulation alone."""
    u = UNIT_ROUNDOFF[precision]
    w, rows = _selected_rows(indices, weights, values, per_token)
    terms = np.sum(w * np.abs(rows).max(axis=-1), axis=1)  # bound on sum_j |w_j| |v_j| for any element
    return (2 * u + u * u + per_token * U32) * terms * (1 + u) + u * terms


# --- the query --------------------------------------------------------------------------------
def query_error_bound(
    layer_input: np.ndarray, layer_weights: dict[str, np.ndarray], config: PKMConfig, precision: str, query
) -> np.ndarray:
    """(bs*heads, k_dim) float64, derived for fp16 / bf16 (float32 accumulation assumed;
    see the module docstring): how far the path's query element can be from the float32
    golden's, given the layer's golden input ``(..., input_dim)``, its torch-named weights
    (``query_proj.0.weight`` ..., without a layer prefix) and ``query``, the larger of the
    path's and the golden's |query| elementwise."""
    u = UNIT_ROUNDOFF[precision]
    x = np.abs(np.asarray(layer_input, np.float64)).reshape(-1, config.input_dim)  # (bs,input_dim)
    w = np.abs(np.asarray(layer_weights["query_proj.0.weight"], np.float64))  # (hk,input_dim)
    b = np.abs(np.asarray(layer_weights["query_proj.0.bias"], np.float64))  # (hk,)
    q = np.abs(np.asarray(query, np.float64)).reshape(x.shape[0], -1)  # (bs,hk)
    s = x @ w.T  # (bs,hk): sum_j |x_j| |W_j|
    n = config.input_dim
    linear = (3 * u + 2 * n * U32) * s + 2 * u * b  # the projection before its last rounding
    if config.query_batchnorm:
        mean = np.asarray(layer_weights["query_proj.1.running_mean"], np.float64)
        var = np.asarray(layer_weights["query_proj.1.running_var"], np.float64)
        gamma = np.abs(np.asarray(layer_weights["query_proj.1.weight"], np.float64))
        beta = np.abs(np.asarray(layer_weights["query_proj.1.bias"], np.float64))
        scale = gamma / np.sqrt(var + 1e-5)  # (hk,)
        z = s + b  # bounds |x W + b| for any element
        linear = scale * (linear + u * (z + np.abs(mean))) + 8 * u * (z + np.abs(mean)) * scale + 2 * u * beta
    bound = (linear + u * q) * (1 + 16 * u)
    return bound.reshape(-1, config.k_dim)


# --- scores and the near-tie margin --------------------------------------------------------
def abs_score_sums(query: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(bs, heads, 2) float64: the largest ``|q| . |k|`` over each half's sub-keys, the
    golden's part of :func:`score_error_bound` (the same for every path judged on it)."""
    heads, _, _, half = keys.shape
    q = np.abs(np.asarray(query, np.float64)).reshape(-1, heads, 2, half)  # (bs,heads,2,half)
    k = np.abs(np.asarray(keys, np.float64))  # (heads,2,n_keys,half)
    return np.einsum("bhtd,htnd->bhtn", q, k).max(axis=-1)


def score_error_bound(query: np.ndarray, keys: np.ndarray, precision: str, query_error, sums=None):
    """(bs*heads,) float64: how far a path's product-key score can be from the golden's,
    per row (see the module docstring for the derivation): the path's own rounding at
    ``precision`` (float32 accumulation) plus the golden's float32 rounding of the same
    dot products. At fp32 this is the near-tie margin of two correct float32 runs.

    ``query_error``: |path query - golden query|, elementwise (bs*heads, k_dim), or a
    scalar bound on it. ``sums``: :func:`abs_score_sums` of ``query`` and ``keys``, where
    already known."""
    u = UNIT_ROUNDOFF[precision]
    heads, _, _, half = keys.shape
    a = abs_score_sums(query, keys) if sums is None else sums  # (bs,heads,2): the |q|.|k| sums
    if not np.any(query_error):  # the query read exactly: nothing carried (the einsum's own answer)
        e = np.zeros_like(a)
    else:
        shape = (-1, heads, 2, half)
        dq = np.broadcast_to(np.abs(np.asarray(query_error, np.float64)), np.shape(query)).reshape(shape)
        k = np.abs(np.asarray(keys, np.float64))  # (heads,2,n_keys,half)
        e = np.einsum("bhtd,htnd->bhtn", dq, k).max(axis=-1)  # (bs,heads,2): the query's own error carried
    golden = (half + 2) * U32 * a  # (bs,heads,2): the golden's own float32 dot products
    per_half = e * (1 + u) + (3 * u + half * U32) * (a + e) + golden  # (bs,heads,2)
    product = per_half.sum(axis=-1) + u * (a + e).sum(axis=-1)  # (bs,heads)
    return product.reshape(-1)


def weights_rtol(score_bound: np.ndarray, config: PKMConfig, precision: str) -> np.ndarray:
    """(bs*heads,) relative error of a softmax whose inputs moved by at most ``score_bound``."""
    u = UNIT_ROUNDOFF[precision]
    return np.expm1(2 * score_bound) + (config.knn + 3) * u


def expected_model_bytes(precision: str, fp32_bytes: int, value_bytes: int, rows: int) -> int:
    """Bytes of the weights of a model at ``precision`` whose float32 weights take
    ``fp32_bytes``, of which the value tables (``rows`` rows) take ``value_bytes``: fp16 /
    bf16 halve everything; int8 stores a value table as one byte a value plus a float32
    scale and offset a row, and keeps the rest in float32."""
    check_precision(precision)
    if precision in ("fp16", "bf16"):
        return fp32_bytes // 2
    if precision == "int8":
        return fp32_bytes - value_bytes + value_bytes // 4 + 8 * rows
    return fp32_bytes


def check_model_bytes(precision: str, model_bytes: int, fp32_bytes: int, value_bytes: int, rows: int) -> str | None:
    """Why a model declared at ``precision`` does not have that precision's size, or None:
    its weights (``model_bytes``: an ONNX file's floating-point tensors, not its graph) may
    take at most 10% more than :func:`expected_model_bytes`. A float32 model labelled
    reduced is caught here even when its taps would pass."""
    expected = expected_model_bytes(precision, fp32_bytes, value_bytes, rows)
    if precision == FP32 or model_bytes <= 1.1 * expected:
        return None
    return (
        f"declared {precision} but its model holds {model_bytes:,} bytes, {model_bytes / fp32_bytes:.2f}x the "
        f"float32 {fp32_bytes:,}; a {precision} model of it holds about {expected:,}"
    )
