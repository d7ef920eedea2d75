"""The verdict: every tap of every path, at every precision, judged against the golden.

This module is the one owner of a verdict. The rules for judging a tap are chosen once per
path, from the precision its name declares (:func:`rules_for`): :class:`Float32Rules`,
and the reduced-precision rules :class:`HalfRules` (``@fp16``, ``@bf16``) and
:class:`Int8Rules` (``@int8``), which override only what they must. Every rule judges
with the same pieces: one structure check, one definition of an ambiguous row, one
top-k validity check, one float comparison, one weighted sum of a path's own rows. The
selection's math is :mod:`pkm_models.selection`'s; the number formats' rounding bounds
are :mod:`conformance.precision`'s.

A layer's taps are judged in pipeline order:

* **Structure.** A missing tap, a wrong shape or dtype, NaN or Inf, and (fp16 / bf16) a
  ``query`` whose values are not numbers of the declared type, fail that tap; nothing
  that needs the tap is computed from it.
* **Slots.** Every selected slot must exist and appear once in its row, at every
  precision and in every row, compared with the golden or not.
* **Ambiguity.** A row is *ambiguous* when its selection margin (the float64 gaps across
  which the selection can change, :func:`pkm_models.selection.selection_margins`; at
  fp16 / bf16 those of the selected *set*, :func:`~pkm_models.selection.set_margins`) is
  within the row's *near-tie margin*: ``max(scores atol, 2 * score bound)``, where the
  score bound is the derived rounding bound of the row's dot products at the path's
  precision (:func:`conformance.precision.score_error_bound`; float32 for fp32 and
  int8). The hand-set ``scores`` atol is a floor. A row that selects differently from
  the golden fails unless it is ambiguous *and* its selection is a correct top-k: each
  slot's exact score within the near-tie margin of the exact k-th best, and the path's
  ``scores`` the scores of the slots it selected.
* **Floats.** ``query``, ``scores`` and ``weights`` against the golden: the resolved
  tolerance, plus the derived bound of the precision where there is one.
* **Output.** Against the golden, except for a token whose selection legitimately
  differs (and every token at reduced precision): there against the float64 weighted sum
  of the value rows the path itself selected, with the weights it itself returned, within
  the rounding bound of that sum at the path's precision (int8: its half-step bound). A
  wrong value row or weight fails either way.

A network is judged layer by layer (taps ``<i>/<tap>``), each layer with its own keys
and values. A legitimate flip in layer ``i`` changes the input of later layers for that
token: its later taps are set aside (``Comparison.downstream_tokens``), and the runner
judges every later layer alone on its golden input.

Judging never raises for a path's answer: :func:`judge` turns any exception into that
path's ``error``. Before anything runs, :func:`check_checkable` refuses hand-set
tolerances that would switch a check off (docs/conformance.md, "Tolerances that check
nothing").
"""

from __future__ import annotations

import collections
import hashlib
import math
import threading
from collections.abc import Callable

import numpy as np

from conformance.deploy import file_of
from conformance.precision import (
    FP32,
    abs_score_sums,
    int8_output_bound,
    precision_of,
    query_error_bound,
    representable,
    score_error_bound,
    weighted_sum_bound,
    weights_rtol,
)
from conformance.results import ERROR, FAIL, PASS, Comparison, PathResult, TensorResult
from conformance.tolerances import Tolerance, ToleranceError, TolerancePolicy
from pkm_models.config import LAYER_OUTPUT, PKMConfig, layer_taps, tap_names
from pkm_models.convert import split_layers
from pkm_models.selection import (
    kth_best,
    own_weighted_sum,
    selection_agreement,
    selection_margins,
    set_margins,
    slot_scores,
    valid_slots,
)

WORST_ELEMENTS = 5
TINY = float(np.finfo(np.float32).tiny)


class _GoldenDerived:
    """What judging derives from a layer's golden taps and weights alone (the selection's
    margins, the golden's part of the score bound), kept by content for the next path
    judged on the same taps: every batch of a stream is judged once per path, and a run
    judges every path of a case on one golden. Thread-safe; the most recent results while
    they take at most :attr:`KEPT_BYTES` (a whole stream's, for the streams shipped: about
    50 bytes a token and layer)."""

    KEPT_BYTES = 256 << 20

    def __init__(self):
        self._kept: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __call__(self, fn: Callable, *arrays: np.ndarray, **scalars):
        digest = hashlib.blake2b(digest_size=16)
        for a in arrays:
            a = np.ascontiguousarray(a)
            digest.update(f"{a.dtype}{a.shape}".encode())
            digest.update(memoryview(a).cast("B"))
        key = (fn.__qualname__, digest.hexdigest(), tuple(sorted(scalars.items())))
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        value = fn(*arrays, **scalars)
        if isinstance(value, np.ndarray):
            value.flags.writeable = False  # shared by every path judged on these taps
        size = getattr(value, "nbytes", 0)
        with self._lock:
            if key not in self._kept:
                self._kept[key] = value
                self._bytes += size
            while self._bytes > self.KEPT_BYTES and len(self._kept) > 1:
                _, old = self._kept.popitem(last=False)
                self._bytes -= getattr(old, "nbytes", 0)
        return value


golden_derived = _GoldenDerived()


# --- one layer's facts -------------------------------------------------------------------------
class Layer:
    """What judging one layer needs: its config, its torch-named weights (no layer
    prefix), its golden taps, its tolerances and, where known, its golden input."""

    def __init__(
        self,
        config: PKMConfig,
        weights: dict[str, np.ndarray],
        expected: dict[str, np.ndarray],
        tolerance: Callable[[str], Tolerance],
        layer_input: np.ndarray | None = None,
    ):
        self.config, self.weights, self.expected = config, weights, expected
        self.tolerance, self.layer_input = tolerance, layer_input
        self.keys = weights["keys"]  # (heads,2,n_keys,half)
        self.values = weights["values.weight"]  # (size,v_dim)


# --- the rules, chosen once per path ---------------------------------------------------------
class Float32Rules:
    """How a float32 path is judged; the reduced-precision rules override only what differs.

    Built per layer with the path's taps (``got``): the score bound uses the path's own
    ``query`` error, or its tolerance where that tap is unusable."""

    precision = FP32
    score_precision = FP32  # the type the scores are computed in
    own_output_everywhere = False  # judge every token's output against its own rows

    def __init__(self, layer: Layer, got: dict[str, np.ndarray], usable: set[str]):
        self.layer = layer
        e = np.asarray(layer.expected["query"], np.float64)
        if "query" in usable:
            query_error = np.abs(np.asarray(got["query"], np.float64) - e)
        else:  # the tolerance, or the precision's derived bound where larger (a file exposing no query)
            tol = layer.tolerance("query")
            query_error = np.maximum(tol.atol + tol.rtol * np.abs(e), self.query_bound(got, usable))
        sums = golden_derived(abs_score_sums, layer.expected["query"], layer.keys)
        self.score_bound = score_error_bound(e, layer.keys, self.score_precision, query_error, sums)  # (rows,)
        self.tie_margin = np.maximum(layer.tolerance("scores").atol, 2 * self.score_bound)  # (rows,)

    # the selection
    def margins(self) -> np.ndarray:
        """(rows,) the gaps across which this precision's selection may legitimately differ."""
        return golden_derived(
            selection_margins, self.layer.expected["query"], self.layer.keys, knn=self.layer.config.knn
        )

    def differs(self, got: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """(rows,) the selection differs from the golden's (order included: scores are sorted)."""
        return np.any(got != expected, axis=1)

    # the taps
    def type_problem(self, name: str, array: np.ndarray) -> str | None:
        """Why a tap shows that the path did not compute at its declared precision."""
        return None

    def query_bound(self, got: dict, usable: set[str]):
        """(rows, k_dim) derived bound on the query error, or 0 (the tolerance alone)."""
        return 0.0

    def weights_rtol(self) -> np.ndarray | float:
        """Derived relative error of ``weights``, added to the tolerance's rtol."""
        return 0.0

    def output_bound(self, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(bs,) the rounding bound of a token's weighted sum of its own rows."""
        c = self.layer.config
        return weighted_sum_bound(indices, weights, self.layer.values, c.heads * c.knn, self.precision)

    def output_bound_name(self) -> str:
        return f"the {self.precision} rounding bound of its weighted sum"

    def output_rtol(self) -> float:
        """A bfloat16 value table's read is rounded once to bfloat16: two correct sums in
        another order may land one bfloat16 step (2^-7 relative) apart."""
        return 2.0**-7 if self.layer.config.value_dtype == "bfloat16" else 0.0

    def figures(self, got: dict, usable: set[str], ambiguous: np.ndarray) -> dict[str, dict]:
        return {}


class HalfRules(Float32Rules):
    """fp16 / bf16: the model computes in the type (float32 accumulation assumed). The
    selected *set* is judged (a reordering within it changes nothing downstream), the
    query by the projection's bound where the layer's input is known, scores and weights
    with their derived bounds, and every token's output against its own rows."""

    own_output_everywhere = True

    def __init__(self, layer, got, usable, precision):
        self.precision = self.score_precision = precision
        super().__init__(layer, got, usable)

    def margins(self):
        return golden_derived(set_margins, self.layer.expected["query"], self.layer.keys, knn=self.layer.config.knn)

    def differs(self, got, expected):
        return ~selection_agreement(got, expected)

    def type_problem(self, name, array):
        """The ``query`` tap (the first op's output, which every runtime stores) must hold
        numbers of the type. Later taps are not checked: a fused kernel may keep an
        intermediate in float32 (torch.compile does), which is more precise, not
        mislabelled."""
        if name != "query" or array.dtype.kind != "f":
            return None
        bad = ~representable(array, self.precision)
        if not bad.any():
            return None
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        return (
            f"declared {self.precision}, but {int(bad.sum())} of {bad.size} values are not {self.precision} "
            f"numbers (first at {first}: {array[first]!r}): the path did not compute in {self.precision}"
        )

    def query_bound(self, got, usable):
        layer = self.layer
        if layer.layer_input is None:
            return 0.0
        e = np.abs(np.asarray(layer.expected["query"], np.float64))
        size = np.maximum(np.abs(np.asarray(got["query"], np.float64)), e) if "query" in usable else e
        return query_error_bound(layer.layer_input, layer.weights, layer.config, self.precision, size)

    def weights_rtol(self):
        return weights_rtol(self.score_bound, self.layer.config, self.precision)[:, None]

    def figures(self, got, usable, ambiguous):
        return _precision_figures(self, got, usable, ambiguous)


class Int8Rules(Float32Rules):
    """int8, weight-only: queries, scores, weights and the weighted sum stay float32; the
    value table is stored as 8-bit codes, so every token's output is judged against its
    own rows within the half-step bound."""

    precision = "int8"
    own_output_everywhere = True

    def output_bound(self, indices, weights):
        c = self.layer.config
        return int8_output_bound(indices, weights, self.layer.values, c.heads * c.knn)

    def output_bound_name(self):
        return "the int8 half-step bound of its weighted sum"

    def figures(self, got, usable, ambiguous):
        return _precision_figures(self, got, usable, ambiguous)


def rules_for(path: str) -> Callable[[Layer, dict, set], Float32Rules]:
    """The rules of ``path``'s precision (from its name), chosen once per path."""
    precision = precision_of(path)
    if precision in ("fp16", "bf16"):
        return lambda layer, got, usable: HalfRules(layer, got, usable, precision)
    if precision == "int8":
        return Int8Rules
    return Float32Rules


def _precision_figures(rules: Float32Rules, got: dict, usable: set[str], ambiguous: np.ndarray) -> dict[str, dict]:
    """Reduced-precision figures: ``indices`` gets the selection agreement and the
    ambiguous rows, ``output`` its error relative to the golden RMS (and the int8 bound)."""
    layer, out = rules.layer, {}
    if "indices" in usable:
        agree = selection_agreement(got["indices"], layer.expected["indices"])
        out["indices"] = {
            "precision": rules.precision,
            "selection_agreement": float(agree.mean()) if agree.size else 1.0,
            "ambiguous_rows": int(np.sum(ambiguous)),
        }
    if "output" in usable:
        g = np.asarray(got["output"], np.float64).reshape(-1)
        e = np.asarray(layer.expected["output"], np.float64).reshape(-1)
        rms = math.sqrt(float(np.mean(e * e))) or 1.0
        err = np.abs(g - e)
        figures = {
            "precision": rules.precision,
            "output_rel_rms": math.sqrt(float(np.mean(err * err))) / rms,
            "output_max_rel_rms": float(err.max(initial=0.0)) / rms,
        }
        if rules.precision == "int8" and {"indices", "weights"} <= usable:
            figures["int8_bound_max"] = float(rules.output_bound(got["indices"], got["weights"]).max(initial=0.0))
        out["output"] = figures
    return out


# --- the pieces every rule judges with ---------------------------------------------------------
def _worst_elements(got: np.ndarray, reference: np.ndarray, err: np.ndarray, bad: np.ndarray) -> list[dict]:
    """The failing elements with the largest absolute difference, largest first."""
    flat = np.flatnonzero(bad)
    if flat.size == 0:
        return []
    order = flat[np.argsort(-err.reshape(-1)[flat], kind="stable")][:WORST_ELEMENTS]
    out = []
    for i in order:
        idx = tuple(int(j) for j in np.unravel_index(i, got.shape))
        out.append(
            {
                "index": list(idx),
                "obtained": got[idx].item(),
                "expected": reference[idx].item(),
                "difference": float(err[idx]),
            }
        )
    return out


def _judge_float(
    name: str,
    got: np.ndarray,
    reference: np.ndarray,
    tol: Tolerance,
    *,
    bound=0.0,
    extra_rtol=0.0,
    considered: np.ndarray | None = None,
    bound_name: str = "",
) -> tuple[TensorResult, np.ndarray]:
    """``|got - reference| <= bound + atol + (rtol + extra_rtol) |reference|`` elementwise
    (``statistic = "mean"``: on the means) over the ``considered`` elements; ``bound`` and
    ``extra_rtol`` are a precision's derived parts (broadcast). Returns the result (with the
    smallest atol that would have passed, when it fails) and the considered errors."""
    g, e = np.asarray(got, np.float64), np.asarray(reference, np.float64)
    err = np.abs(g - e)
    derived = np.broadcast_to(bound + extra_rtol * np.abs(e), err.shape)
    limit = derived + tol.atol + tol.rtol * np.abs(e)
    if considered is None:
        considered = np.ones(err.shape, bool)
    considered = np.broadcast_to(considered, err.shape)
    if tol.statistic == "mean":
        fails = considered.any() and not float(err[considered].mean()) <= float(limit[considered].mean())
        bad = considered & ~(err <= limit) if fails else np.zeros(err.shape, bool)
    else:
        bad = considered & ~(err <= limit)  # NaN compares false: fails
    mismatches = int(bad.sum())
    rel = err / np.maximum(np.abs(e), TINY)
    result = TensorResult(
        name=name,
        status=FAIL if mismatches else PASS,
        max_abs=float(err[considered].max(initial=0.0)),
        max_rel=float(rel[considered].max(initial=0.0)),
        atol=tol.atol + float(np.max(np.broadcast_to(bound, err.shape), initial=0.0)),
        rtol=tol.rtol + float(np.max(extra_rtol, initial=0.0)),
        mismatches=mismatches,
    )
    if mismatches:
        n = int(considered.sum())
        what = f"atol {tol.atol:g} + rtol {tol.rtol:g}" + (f" + {bound_name}" if bound_name else "")
        result.required_atol = float(np.max((err - (limit - tol.atol))[bad]))
        result.message = (
            f"{mismatches} of {n} elements ({100.0 * mismatches / max(1, n):.2g}%) differ beyond {what}; "
            f"max abs {result.max_abs:.3g}, mean abs {float(err[considered].mean()):.3g}, "
            f"median abs {float(np.median(err[considered])):.3g}; an atol of {result.required_atol:.3g} would pass"
        )
        result.worst_elements = _worst_elements(g, e, err, bad)
    return result, err[considered]


def _structure(got: dict, expected: dict, prefix: str) -> dict[str, TensorResult]:
    """The taps of one layer that are missing, of the wrong shape or dtype, or not finite:
    tap -> failing result."""
    results: dict[str, TensorResult] = {}
    for name in expected:
        full = prefix + name
        if name not in got:
            results[name] = TensorResult(full, FAIL, message=f"the path returned no {full!r} tap")
            continue
        g, e = np.asarray(got[name]), expected[name]
        if g.shape != e.shape or g.dtype != e.dtype:
            results[name] = TensorResult(
                full, FAIL, message=f"expected {e.dtype}{list(e.shape)}, got {g.dtype}{list(g.shape)}"
            )
        elif g.dtype.kind == "f" and not np.all(np.isfinite(g)):
            results[name] = TensorResult(
                full,
                FAIL,
                mismatches=int((~np.isfinite(g)).sum()),
                message=f"{int(np.isnan(g).sum())} NaN and {int(np.isinf(g).sum())} Inf values",
            )
    return results


def _type_problems(got: dict, usable: set[str], prefix: str, rules: Float32Rules) -> dict[str, TensorResult]:
    """The usable taps that show the path did not compute at its declared precision."""
    return {
        name: TensorResult(prefix + name, FAIL, message=why)
        for name in usable
        if (why := rules.type_problem(name, np.asarray(got[name])))
    }


def _judge_indices(
    full: str,
    got: dict,
    usable: set[str],
    rules: Float32Rules,
    tol: Tolerance,
    margins: np.ndarray,
    skip_rows: np.ndarray | None,
) -> tuple[TensorResult, np.ndarray, np.ndarray]:
    """The one indices verdict, at every precision (``margins``: the rules' selection
    margins). Returns the result and two (rows,) masks: rows that legitimately differ,
    rows whose slots all exist and appear once."""
    layer = rules.layer
    c, expected = layer.config, layer.expected["indices"]
    g = np.asarray(got["indices"])
    in_range, distinct = valid_slots(g, c.size)
    differs = rules.differs(g, expected)
    if skip_rows is not None:
        differs &= ~skip_rows
    ambiguous = margins <= rules.tie_margin
    check = differs & ambiguous & in_range & distinct  # must be a correct top-k
    top_k = np.ones_like(check)
    own_scores = np.ones_like(check)
    own = kth = None
    if check.any():
        own = slot_scores(layer.expected["query"], layer.keys, g)  # (rows,knn) exact
        kth = kth_best(layer.expected["query"], layer.keys, c.knn)  # (rows,)
        top_k = np.all(own >= (kth - rules.tie_margin)[:, None], axis=1)
        if "scores" in usable:
            limit = (rules.score_bound + tol.atol)[:, None]
            own_scores = np.all(np.abs(np.asarray(got["scores"], np.float64) - own) <= limit, axis=1)
    slots_bad = ~(in_range & distinct)
    unexplained = differs & ~ambiguous & ~slots_bad
    not_top_k = check & ~(top_k & own_scores)
    wrong = slots_bad | unexplained | not_top_k
    result = TensorResult(
        full,
        FAIL if wrong.any() else PASS,
        max_abs=float(np.abs(g - expected).max(initial=0)),
        mismatches=int(wrong.sum()),
        ambiguous_rows=int(ambiguous.sum()),
        atol=0.0,
        rtol=0.0,
    )
    precision = "" if rules.precision == FP32 else f"{rules.precision} "
    if wrong.any():
        row = int(np.flatnonzero(wrong)[0])
        if not in_range[row]:
            why = f"a slot outside the memory (0..{c.size - 1})"
        elif not distinct[row]:
            why = "a slot selected twice"
        elif unexplained[row]:
            why = (
                f"another selection without a near-tie (margin {margins[row]:.3g} > the {precision}near-tie "
                f"margin {rules.tie_margin[row]:.3g})"
            )
        elif not top_k[row]:
            worst = int(np.argmin(own[row]))
            why = (
                f"slots that are not a correct top-{c.knn}: slot {int(g[row, worst])} scores {own[row, worst]:.6g}, "
                f"below the k-th best {kth[row]:.6g} by more than the {precision}near-tie margin "
                f"{rules.tie_margin[row]:.3g}"
            )
        else:
            why = f"slots of a correct top-{c.knn}, but its scores are not the scores of the slots it selected"
        kinds = [
            (int(slots_bad.sum()), "with a slot that does not exist or repeats"),
            (int(unexplained.sum()), f"that select other slots without a near-tie (no {precision}rounding explains)"),
            (int(not_top_k.sum()), f"ambiguous, but not a correct top-{c.knn} (no {precision}rounding explains it)"),
        ]
        counts = ", ".join(f"{n} {what}" for n, what in kinds if n)
        result.message = (
            f"{int(wrong.sum())} row(s) select wrongly ({counts}); first: row {row} selects {why} "
            f"(expected {expected[row].tolist()}, got {g[row].tolist()})"
        )
    elif differs.any():
        result.message = f"{int(differs.sum())} ambiguous row(s) selected differently (a correct top-{c.knn})"
    if skip_rows is not None and skip_rows.any():
        tokens = int(skip_rows.sum()) // c.heads
        result.message = _join(result.message, f"{tokens} token(s) downstream of an ambiguous flip not compared")
    return result, differs & ~wrong, in_range & distinct


def _judge_output(
    full: str,
    got: dict,
    usable: set[str],
    rules: Float32Rules,
    tol: Tolerance,
    flipped_rows: np.ndarray,
    valid_rows: np.ndarray,
    skip_tokens: np.ndarray | None,
) -> tuple[TensorResult, np.ndarray]:
    """``output`` against the golden, and, for tokens whose selection legitimately differs
    (every token at reduced precision), against the weighted sum of the path's own rows."""
    layer = rules.layer
    c = layer.config
    g = np.asarray(got["output"])
    g2 = g.reshape(-1, c.v_dim)  # (bs,v_dim)
    e2 = np.asarray(layer.expected["output"]).reshape(-1, c.v_dim)
    tokens = g2.shape[0]
    skip = np.zeros(tokens, bool) if skip_tokens is None else skip_tokens.copy()
    tokens_flipped = flipped_rows.reshape(tokens, c.heads).any(axis=1)
    if {"indices", "weights"} <= usable:  # a token set aside is still its own rows' weighted sum
        own_tokens = np.ones(tokens, bool) if rules.own_output_everywhere else tokens_flipped | skip
        own_tokens &= valid_rows.reshape(tokens, c.heads).all(axis=1)  # other tokens fail at indices
    else:  # the indices or weights tap failed on its own: the golden is what is left to compare with
        own_tokens = np.zeros(tokens, bool)
    reference = e2.astype(np.float64)
    bound = np.zeros((tokens, 1))
    if rules.own_output_everywhere and "indices" not in got:
        # reduced precision, and the path exposes no selection: against the golden's rows and
        # weights, within the rounding of their sum and the weights' own derived error
        idx, w = layer.expected["indices"], layer.expected["weights"]
        rows = np.abs(np.asarray(layer.values, np.float64)[np.asarray(idx)]).max(axis=-1)  # (bs*heads,knn)
        carried = (np.asarray(w, np.float64) * rows * rules.weights_rtol()).reshape(tokens, -1).sum(axis=1)
        bound[:, 0] = rules.output_bound(idx, w) + carried
    if own_tokens.any():
        own = own_weighted_sum(got["indices"], got["weights"], layer.values, c.heads * c.knn)  # (bs,v_dim)
        reference[own_tokens] = own[own_tokens]
        bound[own_tokens, 0] = rules.output_bound(got["indices"], got["weights"])[own_tokens]
    golden_tokens = ~own_tokens & ~skip
    if not rules.own_output_everywhere:  # a flipped token whose rows cannot be summed: its indices fail
        golden_tokens &= ~tokens_flipped
    considered = (own_tokens | golden_tokens)[:, None]
    bound_name = rules.output_bound_name() + (" (against its own rows)" if own_tokens.any() else "")
    result, err = _judge_float(
        full,
        g2,
        reference,
        tol,
        bound=bound,
        extra_rtol=rules.output_rtol(),
        considered=considered,
        bound_name=bound_name if bound.any() else "",
    )
    if not result and own_tokens.any():
        bad_own = np.flatnonzero(own_tokens)
        result.message = _join(
            result.message,
            f"{len(bad_own)} token(s) judged against the weighted sum of the rows they selected"
            if rules.own_output_everywhere
            else "tokens with a different (ambiguous) selection judged against the weighted sum of the rows they "
            "selected",
        )
    for element in result.worst_elements:  # in the tap's own shape, not the (tokens, v_dim) view
        flat = np.ravel_multi_index(tuple(element["index"]), g2.shape)
        element["index"] = [int(i) for i in np.unravel_index(flat, g.shape)]
    result.ambiguous_rows = int(tokens_flipped.sum())
    return result, err


def _judge_layer(
    got: dict[str, np.ndarray],
    layer: Layer,
    make_rules: Callable[[Layer, dict, set], Float32Rules],
    prefix: str,
    skip_tokens: np.ndarray | None,
    taps: tuple[str, ...] | None = None,
) -> tuple[list[TensorResult], dict[str, np.ndarray], np.ndarray]:
    """One layer's five taps (names ``prefix + tap``): the results, the errors of failing
    float taps, and the tokens whose selection legitimately differs here. ``taps``: judge
    only these (what a user's file exposes); without ``indices``, the tokens whose golden
    selection is within the tie margin are set aside, as if their selection had flipped."""
    c = layer.config
    taps = tuple(layer.expected) if taps is None else taps
    results = _structure(got, {t: layer.expected[t] for t in taps}, prefix)
    usable = {t for t in taps if t not in results}
    rules = make_rules(layer, got, usable)
    results.update(_type_problems(got, usable, prefix, rules))
    usable = {t for t in taps if t not in results}
    errors: dict[str, np.ndarray] = {}
    skip_rows = None if skip_tokens is None else np.repeat(skip_tokens, c.heads)  # (bs*heads,)
    rows = len(layer.expected["indices"])
    flipped = np.zeros(rows, bool)
    valid = np.ones(rows, bool)
    margins = rules.margins()  # (rows,)
    ambiguous = margins <= rules.tie_margin
    unseen = np.zeros(rows // c.heads, bool)  # tokens whose selection cannot be seen, near a tie
    if "indices" not in taps:
        unseen = ambiguous.reshape(-1, c.heads).any(axis=1)
        skip_tokens = unseen if skip_tokens is None else skip_tokens | unseen
        skip_rows = np.repeat(skip_tokens, c.heads)
    if "indices" in usable:
        results["indices"], flipped, valid = _judge_indices(
            prefix + "indices", got, usable, rules, layer.tolerance("scores"), margins, skip_rows
        )
    considered = None if skip_rows is None else ~skip_rows[:, None]
    for name in ("query", "scores", "weights"):
        if name not in usable:
            continue
        tol = layer.tolerance(name)
        if name == "query":
            bound, extra, bound_name = rules.query_bound(got, usable), 0.0, f"the {rules.precision} projection bound"
        elif name == "scores":
            bound, extra = rules.score_bound[:, None], 0.0
            bound_name = f"the {rules.score_precision} score bound"
        else:
            bound, extra, bound_name = 0.0, rules.weights_rtol(), f"the {rules.precision} softmax bound"
        derived = np.any(np.asarray(bound) > 0) or np.any(np.asarray(extra) > 0)
        result, err = _judge_float(
            prefix + name,
            got[name],
            layer.expected[name],
            tol,
            bound=bound,
            extra_rtol=extra,
            considered=considered,
            bound_name=bound_name if derived else "",
        )
        if name == "query" and derived and not result:
            result.message += " (on the layer's golden input)"
        results[name] = result
        if not result:
            errors[prefix + name] = err
    if "output" in usable:
        result, err = _judge_output(
            prefix + "output", got, usable, rules, layer.tolerance("output"), flipped, valid, skip_tokens
        )
        if unseen.any():
            result.ambiguous_rows = int(unseen.sum())
            result.message = _join(
                result.message, f"{int(unseen.sum())} token(s) near a tie set aside (the path exposes no indices)"
            )
        results["output"] = result
        if not result:
            errors[prefix + "output"] = err
    flipped_tokens = flipped.reshape(-1, c.heads).any(axis=1) | unseen
    if LAYER_OUTPUT in usable:  # projected / gated: against the golden, except where the read legitimately differs
        g = np.asarray(got[LAYER_OUTPUT]).reshape(len(flipped_tokens), -1)
        e = np.asarray(layer.expected[LAYER_OUTPUT]).reshape(g.shape)
        judged = ~flipped_tokens if skip_tokens is None else ~(flipped_tokens | skip_tokens)
        result, err = _judge_float(
            prefix + LAYER_OUTPUT,
            g,
            e,
            layer.tolerance(LAYER_OUTPUT),
            extra_rtol=rules.output_rtol(),
            considered=judged[:, None],
        )
        result.ambiguous_rows = int((~judged).sum())
        results[LAYER_OUTPUT] = result
        if not result:
            errors[prefix + LAYER_OUTPUT] = err
    for name, figures in rules.figures(got, usable, ambiguous).items():
        results[name].figures = figures
    return [results[name] for name in taps], errors, flipped_tokens


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


# --- a path's verdict ----------------------------------------------------------------------
def compare_taps(
    got: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    *,
    config: PKMConfig,
    weights: dict[str, np.ndarray],
    policy: TolerancePolicy,
    case: str,
    path: str,
    layers: int = 1,
    layer_input: np.ndarray | None = None,
    judged_layers: int | None = None,
) -> Comparison:
    """Judge every tap, layer by layer, in pipeline order; see the module docstring.
    ``layer_input``: the golden input of the first layer (a reduced-precision path's
    ``query`` is judged by a bound derived from it). ``judged_layers``: judge only that
    many layers against the golden; later layers' taps are only checked to be present,
    of the golden's shape and dtype, finite and of the path's type, and appear only when
    they are not (their judgement is made elsewhere: on their golden inputs)."""
    make_rules = rules_for(path)
    exposed = set(got) if file_of(path) is not None else None  # a user's file: the taps it exposes
    tensors: list[TensorResult] = []
    errors: dict[str, np.ndarray] = {}
    downstream = None  # tokens whose input to this layer legitimately differs
    set_aside = 0

    def tolerance(tap: str) -> Tolerance:
        return policy.resolve(case, path, tap)

    per_layer = split_layers(weights)  # torch names without the layers.<i>. prefix
    for i in range(layers):
        prefix = "" if layers == 1 else f"{i}/"
        names = layer_taps(config)
        taps = None if exposed is None else tuple(t for t in names if prefix + t in exposed)
        if taps == ():  # the file exposes nothing of this layer
            continue
        layer_got = {t: got[prefix + t] for t in names if prefix + t in got}
        layer_expected = {t: expected[prefix + t] for t in names}
        layer = Layer(config, per_layer[i], layer_expected, tolerance, layer_input if i == 0 else None)
        if judged_layers is not None and i >= judged_layers:
            structure = _structure(layer_got, layer_expected, prefix)
            usable = {t for t in layer_expected if t not in structure}
            rules = make_rules(layer, layer_got, usable)
            tensors += [*structure.values(), *_type_problems(layer_got, usable, prefix, rules).values()]
            continue
        results, errs, flipped = _judge_layer(layer_got, layer, make_rules, prefix, downstream, taps)
        tensors += results
        errors.update(errs)
        if downstream is not None:
            set_aside += int(downstream.sum())
        downstream = flipped if downstream is None else downstream | flipped
    return Comparison(tensors, errors, downstream_tokens=set_aside)


def compare_case(
    case,
    got: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    *,
    weights,
    policy,
    path: str,
    layer_input: np.ndarray | None = None,
    judged_layers: int | None = None,
):
    """:func:`compare_taps` with a case's config, layer count and name (``case`` is a
    :class:`conformance.cases.Case`)."""
    return compare_taps(
        got,
        expected,
        config=case.config,
        weights=weights,
        layers=case.spec.layers,
        policy=policy,
        case=case.name,
        path=path,
        layer_input=layer_input,
        judged_layers=judged_layers,
    )


def judge(
    path_name: str,
    case,
    got: dict,
    golden,
    weights,
    policy,
    seconds: float | None,
    judged_layers: int | None = None,
) -> PathResult:
    """The verdict on one path's taps (``golden`` is a :class:`conformance.golden.Golden`):
    ``pass`` or ``fail`` with every tap's result, or ``error`` when judging itself raised
    (a defect of the toolkit, reported with its message; the run goes on)."""
    try:
        comparison = compare_case(
            case,
            got,
            golden.taps,
            weights=weights,
            policy=policy,
            path=path_name,
            layer_input=golden.input,
            judged_layers=judged_layers,
        )
    except Exception as exc:
        return PathResult(
            path_name,
            ERROR,
            reason=f"judging its taps raised {type(exc).__name__}: {exc}".strip(),
            seconds=seconds,
            obtained={k: np.asarray(v) for k, v in got.items()},
        )
    reason = ""
    if not comparison.ok:
        bad = next(t for t in comparison.tensors if not t)
        reason = f"{bad.name}: {bad.message}"
    return PathResult(
        path_name,
        PASS if comparison.ok else FAIL,
        reason=reason,
        first_divergence=comparison.first_divergence,
        tensors=comparison.tensors,
        seconds=seconds,
        errors=comparison.errors,
        obtained={} if comparison.ok else {k: np.asarray(v) for k, v in got.items()},
        downstream_tokens=comparison.downstream_tokens,
    )


# --- before a run ------------------------------------------------------------------------------
def check_checkable(
    expected: dict[str, np.ndarray],
    *,
    config: PKMConfig,
    weights: dict[str, np.ndarray],
    policy: TolerancePolicy,
    case: str,
    paths: list[str],
    layers: int = 1,
) -> None:
    """Refuse (ToleranceError) a hand-set tolerance that makes a tap uncheckable for this
    golden:

    * a float tap where an all-zero answer would pass for most elements
      (``|expected| <= atol + rtol * |expected|`` for over half of them, so ``rtol >= 1``
      always), and
    * a ``scores`` atol larger than the median selection margin of the rows that are not
      exact ties: then the tolerance alone makes most selections ambiguous, and the
      ``indices`` check is reduced to top-k validity for them. (The derived near-tie
      margin follows the scale of each row by itself; the atol is only its floor.)
    """
    margins = []
    per_layer = split_layers(weights)
    for i in range(layers):
        prefix = "" if layers == 1 else f"{i}/"
        m = selection_margins(expected[prefix + "query"], per_layer[i]["keys"], config.knn)
        margins.append(m[m > 0])
    nonzero = np.concatenate(margins) if margins else np.zeros(0)
    median_margin = float(np.median(nonzero)) if nonzero.size else np.inf
    for path in paths:
        for name in tap_names(layers, config):
            tap = name.rpartition("/")[2]
            tol = policy.resolve(case, path, tap)
            e = np.abs(np.asarray(expected[name], np.float64))
            where = f"{policy.source}: tolerance of {tap!r} for case {case!r}, path {path!r}"
            with np.errstate(over="ignore"):
                zeros_pass = e.size and np.mean(e <= tol.atol + tol.rtol * e) > 0.5
            if tap != "indices" and zeros_pass:
                raise ToleranceError(
                    f"{where} (atol {tol.atol:g}, rtol {tol.rtol:g}) would accept zeros for most elements of "
                    f"{name} (its mean magnitude is {float(e.mean()):.3g}): it checks nothing. Limits: rtol < 1 "
                    "and atol well below the tap's typical magnitude"
                )
            if tap == "scores" and tol.atol > median_margin:
                raise ToleranceError(
                    f"{where}: scores atol {tol.atol:g} exceeds the median top-k margin {median_margin:.3g} of "
                    "this case's selections, so most rows would count as ties and their indices go unchecked. "
                    "Limit: the scores atol must stay below the typical margin"
                )
