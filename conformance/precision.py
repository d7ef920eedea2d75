"""Precision as a conformance axis: names, number formats and the bounds that judge a
reduced-precision path against the float32 goldens.

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

Bounds (all per row or per token, computed from the data the run already has):

* int8, derived (:func:`int8_output_bound`): a stored value is off by at most half a step
  of its row, ``scale / 2``, so a token's output element moves by at most
  ``sum_j |w_j| * scale[idx_j] / 2`` over the slots j it reads, plus float32 rounding of
  the dequantisation and of the weighted sum. The output is checked against the float64
  weighted sum of the rows the path itself selected, with the weights it itself returned,
  so the bound is about the value table alone.
* fp16 / bf16 scores, derived (:func:`score_error_bound`) under one stated assumption:
  the runtime accumulates dot products in float32 or wider (PyTorch's and ONNX Runtime's
  CPU kernels convert half-precision operands to float32 for ``MatMul``). With unit
  roundoff ``u`` (2^-11 for fp16, 2^-8 for bf16) and keys rounded to the type, a sub-key
  score moves by at most ``E + (3u + h * 2^-24) (A + E)`` where
  ``A = max_n sum_d |q_d| |k_nd|`` is the row's bound on the |q|.|k| sums,
  ``E = max_n sum_d |dq_d| |k_nd|`` the path's own query error (its ``query`` tap against
  the golden's, judged at that tap) carried through, and ``h`` the half size; a product score by the sum of
  both halves' bounds plus ``u`` of its size. A row whose selected set's boundary gap is
  within twice that (two candidates moving in opposite directions) is ambiguous at this
  precision. A row that selects another set than the golden is a legitimate flip only if
  every slot it selected exists, appears once, and has an exact score within that margin
  of the golden k-th score (:meth:`ReducedPrecisionRules._judge_indices`): any other
  differing selection fails, ambiguous row or not. On the ``xlm`` case this worst-case
  bound makes nearly every row ambiguous at fp16 (the score spacing of fp16 near 1.8 is
  about 1e-3, the median boundary gap about 1e-3): fp16 cannot resolve those selections,
  which is why the slot check, not the ambiguity count, carries the judgement.
  The ``scores`` tap (a sorted top-k is 1-Lipschitz in the largest score error) is judged
  with that bound per row; the ``weights`` tap (softmax) with a relative error of
  ``exp(2 * bound) - 1`` plus ``(knn + 3) u`` for the softmax's own rounding.
* fp16 / bf16 output, derived under the same assumption (:func:`weighted_sum_bound`):
  against the float64 weighted sum of the path's own rows and weights, each term carries
  the rounding of the value (``u``) and of the product (``u``), and the result its own
  rounding (``u |o|``), plus float32 accumulation of ``n`` terms.
* fp16 / bf16 query, derived under the same assumption (:func:`query_error_bound`), from
  the layer's golden input ``x`` and its float32 weights: the input, the weight and the
  bias are rounded to the type (``u`` each), the products accumulate in float32 (two such
  sums, the path's and the golden's: ``2 n 2^-24``), and the projection and the bias
  addition each round their result, so an element of the projection is off by at most
  ``(3u + 2 n 2^-24) S + 2u |b| + u |q|`` with ``S = sum_j |x_j| |W_j|``, up to second-order
  terms (a factor ``1 + 16u`` covers them). With query batchnorm (inference: running
  statistics) that error is scaled by ``|gamma| / sqrt(var + eps)``, and the six roundings
  of its ops and of its rounded statistics add ``8u`` of ``|z - mean| |gamma| /
  sqrt(var + eps)`` plus ``2u |beta|``. A network at reduced precision is judged layer by
  layer, each layer alone on its golden input (the runner's ``judged_layer_by_layer``),
  so every layer's bound is taken on the input it was meant for.

Figures (:func:`precision_figures`): selection agreement (the fraction of (token, head)
rows whose selected set equals the golden's), ambiguous rows at that precision, the
output error relative to the golden output's RMS, and the largest per-token int8 bound.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pkm_models.config import PKMConfig
from pkm_models.errors import PKMError
from pkm_models.selection import selection_margins

FP32 = "fp32"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
REDUCED = ("fp16", "bf16", "int8")
# unit roundoff of the type the model computes in (int8 computes in float32)
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8, "int8": 2.0**-24}
U32 = 2.0**-24  # float32 accumulation, assumed for every reduced-precision runtime
# an int8 deployment must shrink the model at least this much against float32
INT8_MAX_SIZE_RATIO = 0.3


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


def dequantize_rows(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale[:, None] + offset[:, None]


def half_steps(values: np.ndarray) -> np.ndarray:
    """(N,) float64: the largest error of a stored int8 value, per row, including the
    float32 rounding of the quantisation and dequantisation arithmetic (a few ulps of the
    row's largest magnitude)."""
    v = np.asarray(values, np.float32)
    lo, hi = v.min(axis=1).astype(np.float64), v.max(axis=1).astype(np.float64)
    magnitude = np.maximum(np.abs(lo), np.abs(hi))
    return (hi - lo) / 255 / 2 + 4 * U32 * (magnitude + (hi - lo))


def own_weighted_sum(indices: np.ndarray, weights: np.ndarray, values: np.ndarray, config: PKMConfig) -> np.ndarray:
    """(bs, v_dim) float64: sum over the slots of a token of weight * float32 value row,
    with the path's own ``indices`` and ``weights`` taps."""
    n = config.heads * config.knn
    idx = np.asarray(indices).reshape(-1, n)
    w = np.asarray(weights, np.float64).reshape(-1, n)
    return np.einsum("bn,bnd->bd", w, np.asarray(values)[idx].astype(np.float64))


def int8_output_bound(indices: np.ndarray, weights: np.ndarray, values: np.ndarray, config: PKMConfig) -> np.ndarray:
    """(bs,) float64, derived: the largest distance between an int8 path's output element
    and the float64 weighted sum of the float32 rows it selected, per token:
    ``sum_j |w_j| * half_step[idx_j]`` plus float32 rounding of the ``n``-term sum."""
    n = config.heads * config.knn
    idx = np.asarray(indices).reshape(-1, n)
    w = np.abs(np.asarray(weights, np.float64).reshape(-1, n))
    steps = half_steps(values)  # (N,)
    row_max = np.abs(np.asarray(values, np.float32)).max(axis=1).astype(np.float64)  # (N,)
    quantisation = np.sum(w * steps[idx], axis=1)
    rounding = (n + 2) * U32 * np.sum(w * (row_max[idx] + steps[idx]), axis=1)
    return quantisation + rounding


def weighted_sum_bound(
    indices: np.ndarray, weights: np.ndarray, values: np.ndarray, config: PKMConfig, precision: str
) -> np.ndarray:
    """(bs,) float64, derived for fp16 / bf16 (float32 accumulation assumed): the largest
    distance between the path's output element and the float64 weighted sum of its own
    rows and weights: each term rounds the value and the product (2u), the sum of n terms
    accumulates in float32, the result rounds once more (u of its size)."""
    u = UNIT_ROUNDOFF[precision]
    n = config.heads * config.knn
    idx = np.asarray(indices).reshape(-1, n)
    w = np.abs(np.asarray(weights, np.float64).reshape(-1, n))
    row_max = np.abs(np.asarray(values, np.float32)).max(axis=1).astype(np.float64)
    terms = np.sum(w * row_max[idx], axis=1)  # bound on sum_j |w_j| |v_j| for any element
    return (2 * u + u * u + n * U32) * terms * (1 + u) + u * terms


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
def score_error_bound(query: np.ndarray, keys: np.ndarray, precision: str, query_error):
    """(bs*heads,) float64: how far a reduced-precision path's product-key score can be
    from the float32 one, per row (see the module docstring for the derivation).

    ``query_error``: |path query - golden query|, elementwise (bs*heads, k_dim), or a
    scalar bound on it."""
    u = UNIT_ROUNDOFF[precision]
    heads, _, _, half = keys.shape
    q = np.abs(np.asarray(query, np.float64)).reshape(-1, heads, 2, half)  # (bs,heads,2,half)
    dq = np.broadcast_to(np.abs(np.asarray(query_error, np.float64)), np.shape(query)).reshape(q.shape)
    k = np.abs(np.asarray(keys, np.float64))  # (heads,2,n_keys,half)
    a = np.einsum("bhtd,htnd->bhtn", q, k).max(axis=-1)  # (bs,heads,2): the |q|.|k| sums
    e = np.einsum("bhtd,htnd->bhtn", dq, k).max(axis=-1)  # (bs,heads,2): the query's own error carried
    per_half = e * (1 + u) + (3 * u + half * U32) * (a + e)  # (bs,heads,2)
    product = per_half.sum(axis=-1) + u * (a + e).sum(axis=-1)  # (bs,heads)
    return product.reshape(-1)


def set_margins(query: np.ndarray, keys: np.ndarray, knn: int) -> np.ndarray:
    """(bs*heads,) float64: the gaps across which the selected *set* can change: the k-th
    boundary of each half's sub-key selection and of the final product selection (not the
    order gaps inside the set, which :func:`pkm_models.selection.selection_margins` adds:
    at fp16 / bf16, whose score spacing is about u |s|, almost every row has an order gap
    that small, and a reordering within the set changes neither the sorted scores, nor
    the weights, nor the output)."""
    heads, _, _, half = keys.shape
    q = np.asarray(query, np.float64).reshape(-1, heads, 2, half)
    sub = -np.sort(-np.einsum("bhtd,htnd->bhtn", q, np.asarray(keys, np.float64)), axis=-1)  # (bs,heads,2,n_keys)
    margin = np.full(sub.shape[:2], np.inf)
    if sub.shape[-1] > knn:
        margin = np.minimum(sub[:, :, 0, knn - 1] - sub[:, :, 0, knn], sub[:, :, 1, knn - 1] - sub[:, :, 1, knn])
    best1, best2 = sub[:, :, 0, :knn], sub[:, :, 1, :knn]
    product = -np.sort(-(best1[..., :, None] + best2[..., None, :]).reshape(*best1.shape[:2], -1), axis=-1)
    if product.shape[-1] > knn:
        margin = np.minimum(margin, product[..., knn - 1] - product[..., knn])
    return margin.reshape(-1)


def slot_scores(query: np.ndarray, keys: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(bs*heads, knn) float64: the exact score (golden query, float32 keys) of each slot a
    path selected: slot ``i`` pairs sub-key ``i // n_keys`` of the first half with
    ``i % n_keys`` of the second."""
    heads, _, n_keys, half = keys.shape
    q = np.asarray(query, np.float64).reshape(-1, heads, 2, half)  # (bs,heads,2,half)
    idx = np.asarray(indices).reshape(q.shape[0], heads, -1)  # (bs,heads,knn)
    k = np.asarray(keys, np.float64)
    h = np.arange(heads)[None, :, None]
    first = np.einsum("bhd,bhkd->bhk", q[:, :, 0], k[h, 0, np.clip(idx // n_keys, 0, n_keys - 1)])
    second = np.einsum("bhd,bhkd->bhk", q[:, :, 1], k[h, 1, np.clip(idx % n_keys, 0, n_keys - 1)])
    return (first + second).reshape(-1, idx.shape[-1])


def tie_threshold(query: np.ndarray, keys: np.ndarray, precision: str, query_error):
    """(bs*heads,): a row whose top-k margin is at most this is ambiguous at ``precision``."""
    return 2 * score_error_bound(query, keys, precision, query_error)


def weights_rtol(score_bound: np.ndarray, config: PKMConfig, precision: str) -> np.ndarray:
    """(bs*heads,) relative error of a softmax whose inputs moved by at most ``score_bound``."""
    u = UNIT_ROUNDOFF[precision]
    return np.expm1(2 * score_bound) + (config.knn + 3) * u


# --- figures ---------------------------------------------------------------------------------
@dataclasses.dataclass
class PrecisionFigures:
    precision: str
    rows: int
    agreement: float  # share of (token, head) rows whose selected set equals the golden's
    ambiguous_rows: int  # rows within this precision's near-tie margin
    output_rel_rms: float  # RMS(output - golden) / RMS(golden)
    output_max_rel_rms: float  # max |output - golden| / RMS(golden)
    int8_bound_max: float | None = None  # largest per-token int8 bound (int8 only)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def selection_agreement(got_indices: np.ndarray, expected_indices: np.ndarray) -> np.ndarray:
    """(rows,) bool: the selected *set* equals the golden's (order within a row ignored)."""
    return np.all(np.sort(np.asarray(got_indices), axis=1) == np.sort(np.asarray(expected_indices), axis=1), axis=1)


def precision_figures(
    got: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    weights: dict[str, np.ndarray],
    config: PKMConfig,
    precision: str,
    score_atol: float = 0.0,
    layer: str = "",
) -> PrecisionFigures:
    """The figures of one path's taps against the golden ones at ``precision``.

    ``weights`` are the case's float32 weights by state_dict name (``layer`` is the prefix
    of the last layer's, ``"layers.<i>."`` in a stack); ``score_atol`` is the float32
    near-tie margin (the ``scores`` atol), the floor of every precision's."""
    check_precision(precision)
    keys, values = weights[layer + "keys"], weights[layer + "values.weight"]
    agree = selection_agreement(got["indices"], expected["indices"])
    margins = selection_margins(expected["query"], keys, config.knn)
    threshold = score_atol
    if precision in ("fp16", "bf16"):
        margins = set_margins(expected["query"], keys, config.knn)
    if precision in ("fp16", "bf16"):
        query_error = np.abs(np.asarray(got["query"], np.float64) - np.asarray(expected["query"], np.float64))
        threshold = np.maximum(score_atol, tie_threshold(expected["query"], keys, precision, query_error))
    ambiguous = margins <= threshold
    g = np.asarray(got["output"], np.float64).reshape(-1, config.v_dim)
    e = np.asarray(expected["output"], np.float64).reshape(-1, config.v_dim)
    rms = math.sqrt(float(np.mean(e * e))) or 1.0
    err = np.abs(g - e)
    bound = None
    if precision == "int8":
        bound = float(int8_output_bound(got["indices"], got["weights"], values, config).max(initial=0.0))
    return PrecisionFigures(
        precision=precision,
        rows=int(agree.size),
        agreement=float(agree.mean()) if agree.size else 1.0,
        ambiguous_rows=int(ambiguous.sum()),
        output_rel_rms=math.sqrt(float(np.mean(err * err))) / rms,
        output_max_rel_rms=float(err.max(initial=0.0)) / rms,
        int8_bound_max=bound,
    )


def check_model_bytes(precision: str, model_bytes: int, fp32_bytes: int) -> str | None:
    """Why a path declared at ``precision`` does not have that precision's size, or None.

    int8 must be at most :data:`INT8_MAX_SIZE_RATIO` of float32; fp16 / bf16 at most
    half of it plus the float32 interface (10% slack). A float32 model labelled reduced
    is caught here even when its taps would pass."""
    check_precision(precision)
    if precision == FP32 or fp32_bytes <= 0:
        return None
    limit = INT8_MAX_SIZE_RATIO if precision == "int8" else 0.55
    ratio = model_bytes / fp32_bytes
    if ratio > limit:
        return (
            f"declared {precision} but its model holds {model_bytes:,} bytes, {ratio:.2f}x the float32 "
            f"{fp32_bytes:,} (at most {limit}x expected)"
        )
    return None


# --- judging: the rules compare_taps applies to a reduced-precision path ---------------------
def type_problem(precision: str, name: str, array: np.ndarray) -> str | None:
    """Why the ``query`` tap (the first op's output, which every runtime stores) shows
    that an fp16 / bf16 path did not compute in its type, or None. Later taps are not
    checked: a fused kernel may keep an intermediate in float32 (torch.compile does),
    which is more precise, not mislabelled."""
    if precision not in ("fp16", "bf16") or name != "query" or array.dtype.kind != "f":
        return None
    bad = ~representable(array, precision)
    if not bad.any():
        return None
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return (
        f"declared {precision}, but {int(bad.sum())} of {bad.size} values are not {precision} numbers "
        f"(first at {first}: {array[first]!r}): the path did not compute in {precision}"
    )


class ReducedPrecisionRules:
    """How :func:`conformance.compare.compare_taps` judges a path at ``precision``
    (fp16, bf16 or int8) against the float32 goldens.

    (:func:`type_problem`, the check that an fp16 / bf16 path's query holds values of
    its type, needs no rules: it is a function of the precision alone.)

    * :meth:`tie_threshold`: the near-tie margin under which a row is ambiguous;
    * :meth:`judge`: the ``query`` (where the layer's input is known), ``scores``,
      ``weights`` and ``output`` taps with derived bounds (None: the float32 rule with the
      resolved tolerance applies);
    * :meth:`figures`: agreement, ambiguous rows, output error relative to its RMS.
    """

    def __init__(self, precision, got, expected, keys, values, config, query_tol, layer_input=None, layer_weights=None):
        self.precision = check_precision(precision)
        self.config, self.keys, self.values = config, keys, values
        self.half = precision in ("fp16", "bf16")
        self.score_bound = None
        self.query_bound = None  # derived where the layer's input is known
        self.expected_query = expected["query"]
        if self.half:
            q = np.asarray(got.get("query", np.empty(0)), np.float64)
            e = np.asarray(expected["query"], np.float64)
            usable = q.shape == e.shape and bool(np.all(np.isfinite(q)))  # else the query tap fails by itself
            if layer_input is not None and layer_weights is not None:
                size = np.maximum(np.abs(q), np.abs(e)) if usable else np.abs(e)
                self.query_bound = query_error_bound(layer_input, layer_weights, config, precision, size)
            # the query's own error as the path returned it; its tolerance where that tap is unusable
            error = np.abs(q - e) if usable else query_tol.atol + query_tol.rtol * np.abs(e)
            self.score_bound = score_error_bound(e, keys, precision, error)

    def margins(self, expected_query: np.ndarray, margins: np.ndarray) -> np.ndarray:
        """The margins that decide ambiguity: at fp16 / bf16 those of the selected set."""
        return set_margins(expected_query, self.keys, self.config.knn) if self.half else margins

    def differs(self, got_indices: np.ndarray, expected_indices: np.ndarray) -> np.ndarray:
        """(rows,) bool: at fp16 / bf16 the selected set differs; else any slot differs."""
        if self.half:
            return ~selection_agreement(got_indices, expected_indices)
        return np.any(np.asarray(got_indices) != expected_indices, axis=1)

    def tie_threshold(self, score_atol: float):
        return score_atol if self.score_bound is None else np.maximum(score_atol, 2 * self.score_bound)

    def judge(self, name: str, got: np.ndarray, expected: np.ndarray, tol, got_taps: dict):
        """A TensorResult for ``scores`` / ``weights`` / ``output``, else None."""
        from conformance.results import TensorResult

        c = self.config
        if name == "indices" and self.half:
            return self._judge_indices(np.asarray(got), np.asarray(expected))
        if name == "query" and self.query_bound is not None:
            e = np.asarray(expected, np.float64)
            err = np.abs(np.asarray(got, np.float64) - e)
            limit = self.query_bound + tol.atol + tol.rtol * np.abs(e)
            what = f"the {self.precision} projection bound"
        elif name == "output":
            if "indices" not in got_taps or "weights" not in got_taps:
                return None
            own = own_weighted_sum(got_taps["indices"], got_taps["weights"], self.values, c)  # (bs,v_dim)
            if self.precision == "int8":
                bound = int8_output_bound(got_taps["indices"], got_taps["weights"], self.values, c)
                what = "the int8 half-step bound"
            else:
                bound = weighted_sum_bound(got_taps["indices"], got_taps["weights"], self.values, c, self.precision)
                what = f"the {self.precision} rounding bound"
            limit = (bound + tol.atol)[:, None] + tol.rtol * np.abs(own)  # (bs,v_dim)
            err = np.abs(np.asarray(got, np.float64).reshape(own.shape) - own)
        elif name in ("scores", "weights") and self.score_bound is not None:
            g = np.asarray(got, np.float64)
            e = np.asarray(expected, np.float64)
            err = np.abs(g - e)
            if name == "scores":
                limit = (self.score_bound + tol.atol)[:, None] + tol.rtol * np.abs(e)
                what = f"the {self.precision} score bound"
            else:
                limit = tol.atol + (tol.rtol + weights_rtol(self.score_bound, c, self.precision))[:, None] * np.abs(e)
                what = f"the {self.precision} softmax bound"
        else:
            return None
        bad = err > limit
        result = TensorResult(
            name,
            "fail" if bad.any() else "pass",
            max_abs=float(err.max(initial=0.0)),
            max_rel=float((err / np.maximum(limit, np.finfo(np.float32).tiny)).max(initial=0.0)),
            atol=float(limit.max(initial=0.0)),
            rtol=tol.rtol,
            mismatches=int(bad.sum()),
        )
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            against = "its own rows and weights" if name == "output" else "the golden"
            if name == "query":
                against += " (on the layer's golden input)"
            result.message = (
                f"{int(bad.sum())} of {bad.size} elements exceed {what} against {against}; "
                f"first at {first}: error {err[first]:.3g} > bound {limit[first]:.3g}"
            )
        return result

    def _judge_indices(self, got: np.ndarray, expected: np.ndarray):
        """fp16 / bf16 selections: a row that selects another set is right only if every
        slot it selected is a real slot, selected once, whose exact score is within the
        precision's near-tie margin of the golden k-th score (the selection is then a
        top-k of scores each moved by at most the score bound)."""
        from conformance.results import TensorResult

        size = self.config.size
        differs = ~selection_agreement(got, expected)
        margin = 2 * self.score_bound  # (rows,)
        kth = slot_scores(self.expected_query, self.keys, expected).min(axis=1)  # golden k-th score per row
        own = slot_scores(self.expected_query, self.keys, got)  # (rows,knn)
        out_of_range = np.any((got < 0) | (got >= size), axis=1)
        repeated = np.any(np.diff(np.sort(got, axis=1), axis=1) == 0, axis=1)
        too_low = own.min(axis=1) < kth - margin
        wrong = differs & (out_of_range | repeated | too_low)
        ambiguous = set_margins(self.expected_query, self.keys, self.config.knn) <= margin
        result = TensorResult(
            "indices",
            "fail" if wrong.any() else "pass",
            max_abs=float(np.abs(got - expected).max(initial=0)),
            mismatches=int(wrong.sum()),
            ambiguous_rows=int(ambiguous.sum()),
            atol=0.0,
            rtol=0.0,
        )
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            why = (
                "a slot out of range"
                if out_of_range[row]
                else "a slot twice"
                if repeated[row]
                else f"a slot scoring {own[row].min():.6g}, below the golden k-th score {kth[row]:.6g} by more "
                f"than the {self.precision} near-tie margin {margin[row]:.3g}"
            )
            result.message = (
                f"{int(wrong.sum())} row(s) select slots that no {self.precision} rounding explains; first: row "
                f"{row} selects {why} (expected {expected[row].tolist()}, got {got[row].tolist()})"
            )
        elif differs.any():
            result.message = (
                f"{int(differs.sum())} row(s) selected a different set within the {self.precision} near-tie margin"
            )
        return result

    def figures(self, got: dict, expected: dict, ambiguous: np.ndarray) -> dict[str, dict]:
        """Per-tap figures: ``indices`` gets agreement and ambiguous rows, ``output`` its
        error relative to the golden RMS (and the int8 bound)."""
        out: dict[str, dict] = {}
        if "indices" in got and np.shape(got["indices"]) == np.shape(expected["indices"]):
            agree = selection_agreement(got["indices"], expected["indices"])
            out["indices"] = {
                "precision": self.precision,
                "selection_agreement": float(agree.mean()) if agree.size else 1.0,
                "ambiguous_rows": int(np.sum(ambiguous)),
            }
        if "output" in got and np.size(got["output"]) == np.size(expected["output"]):
            g = np.asarray(got["output"], np.float64).reshape(-1)
            e = np.asarray(expected["output"], np.float64).reshape(-1)
            rms = math.sqrt(float(np.mean(e * e))) or 1.0
            err = np.abs(g - e)
            figures = {
                "precision": self.precision,
                "output_rel_rms": math.sqrt(float(np.mean(err * err))) / rms,
                "output_max_rel_rms": float(err.max(initial=0.0)) / rms,
            }
            if self.precision == "int8" and "indices" in got and "weights" in got:
                bound = int8_output_bound(got["indices"], got["weights"], self.values, self.config)
                figures["int8_bound_max"] = float(bound.max(initial=0.0))
            out["output"] = figures
        return out


def reduced_precision_rules(
    path: str, got, expected, keys, values, config, query_tol, layer_input=None, layer_weights=None
) -> ReducedPrecisionRules | None:
    """The rules for ``path``'s precision (from its name), or None for float32.
    ``layer_input`` and ``layer_weights`` (the layer's golden input and its torch-named
    weights) let the ``query`` tap be judged by a derived bound; without them it is judged
    by its resolved tolerance."""
    precision = precision_of(path)
    if precision == FP32:
        return None
    return ReducedPrecisionRules(precision, got, expected, keys, values, config, query_tol, layer_input, layer_weights)
