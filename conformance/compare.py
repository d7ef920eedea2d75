"""Comparing a path's taps with the golden ones.

Float taps compare under their tolerance. ``indices`` compare exactly, except in
*ambiguous* rows: rows whose product-key selection has a top-k margin (see
:func:`pkm_models.selection.selection_margins`) within the ``scores`` atol, where either
choice is right. A different selection in such a row is reported, not failed, provided it
is still *a* correct top-k: distinct slots, each slot's score (float64, from the golden
query and the keys) within the ``scores`` atol of the k-th best, and the path's
``scores`` equal to the scores of the slots it selected. The ``output`` of a token whose
selection differs is compared with the weighted sum of the value rows the path itself
selected (in float64), so a wrong value row or weight still fails. NaN or Inf anywhere
fails; so does a shape or dtype mismatch.

A network of several layers is compared layer by layer (taps ``<i>/<tap>``), each layer
with its own keys and values. A legitimate (ambiguous) flip in layer ``i`` changes the
input of every later layer for that token: those tokens' taps in later layers are not
compared with the golden; they are counted (``Comparison.downstream_tokens``), the
token's own layer-``i`` output is still checked against its own selection, and the
runner then judges every later layer alone on its golden input
(:func:`conformance.runner.judge_layerwise`).

Before anything runs, :func:`check_checkable` refuses tolerances that would switch a
check off (see docs/conformance.md, "Tolerances that check nothing").
"""

from __future__ import annotations

import numpy as np

from conformance.precision import precision_of, reduced_precision_rules, type_problem
from conformance.results import FAIL, PASS, Comparison, TensorResult
from conformance.tolerances import Tolerance, ToleranceError, TolerancePolicy
from pkm_models.config import TAPS, PKMConfig, tap_names
from pkm_models.convert import split_layers
from pkm_models.selection import selection_margins

WORST_ELEMENTS = 5


def _worst_elements(got: np.ndarray, expected: np.ndarray, err: np.ndarray, bad: np.ndarray) -> list[dict]:
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
                "expected": expected[idx].item(),
                "difference": float(err[idx]),
            }
        )
    return out


def _compare_float(
    name: str, got: np.ndarray, expected: np.ndarray, tol: Tolerance, skip_rows: np.ndarray | None = None
) -> tuple[TensorResult, np.ndarray]:
    g, e = got.astype(np.float64), expected.astype(np.float64)
    abs_err = np.abs(g - e)
    rel_err = abs_err / np.maximum(np.abs(e), np.finfo(np.float32).tiny)
    considered = np.ones(abs_err.shape, bool)
    if skip_rows is not None:
        considered[skip_rows] = False
    if tol.statistic == "mean":
        value = float(abs_err[considered].mean()) if considered.any() else 0.0
        bad = np.zeros_like(considered) if value <= tol.atol else considered & (abs_err > tol.atol)
    else:
        bad = considered & ~(abs_err <= tol.atol + tol.rtol * np.abs(e))  # NaN compares false: fails
    mismatches = int(bad.sum())
    result = TensorResult(
        name=name,
        status=FAIL if mismatches else PASS,
        max_abs=float(abs_err[considered].max(initial=0.0)),
        max_rel=float(rel_err[considered].max(initial=0.0)),
        atol=tol.atol,
        rtol=tol.rtol,
        mismatches=mismatches,
    )
    if mismatches:
        share = 100.0 * mismatches / max(1, int(considered.sum()))
        result.message = (
            f"{mismatches} of {int(considered.sum())} elements ({share:.2g}%) differ beyond atol {tol.atol:g} + "
            f"rtol {tol.rtol:g}; max abs {result.max_abs:.3g}, mean abs {float(abs_err[considered].mean()):.3g}, "
            f"median abs {float(np.median(abs_err[considered])):.3g}"
        )
        result.worst_elements = _worst_elements(got, expected, abs_err, bad)
    return result, abs_err[considered]


def _slot_scores(query: np.ndarray, head: np.ndarray, keys: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """float64 score of each slot: q1 . keys[h, 0, slot // n] + q2 . keys[h, 1, slot % n].

    query (rows, k_dim) with the head of each row in ``head`` (rows,), keys
    (heads, 2, n_keys, half), slots (rows, knn) -> (rows, knn)."""
    _, _, n_keys, half = keys.shape
    q = np.asarray(query, np.float64).reshape(-1, 2, half)  # (rows,2,half)
    k = np.asarray(keys, np.float64)
    s = np.clip(np.asarray(slots), 0, n_keys * n_keys - 1)
    h = head[:, None]
    k1 = k[h, 0, s // n_keys]  # (rows,knn,half)
    k2 = k[h, 1, s % n_keys]
    return np.einsum("rd,rnd->rn", q[:, 0], k1) + np.einsum("rd,rnd->rn", q[:, 1], k2)


def _kth_best(query: np.ndarray, head: np.ndarray, keys: np.ndarray, knn: int) -> np.ndarray:
    """float64 k-th best product score of each row (the product set of each half's top
    ``knn`` sub-keys holds the global top ``knn``)."""
    half = keys.shape[-1]
    q = np.asarray(query, np.float64).reshape(-1, 2, half)  # (rows,2,half)
    sub = np.einsum("rtd,rtnd->rtn", q, np.asarray(keys, np.float64)[head])  # (rows,2,n_keys)
    best = -np.sort(-sub, axis=-1)[..., :knn]  # (rows,2,knn)
    product = (best[:, 0, :, None] + best[:, 1, None, :]).reshape(len(q), -1)
    return (-np.sort(-product, axis=-1))[:, knn - 1]


def _invalid_selections(
    got: dict[str, np.ndarray], query: np.ndarray, keys: np.ndarray, knn: int, rows: np.ndarray, tol: float
) -> tuple[np.ndarray, str]:
    """Rows (a mask over ``rows``) whose selection is not *a* correct top-k, and why the first is not."""
    idx = np.asarray(got["indices"])[rows]
    heads, n_slots = keys.shape[0], keys.shape[2] ** 2
    head = rows % heads  # rows are (token, head) in token-major order
    slot_ok = (idx >= 0) & (idx < n_slots)
    scores = _slot_scores(query[rows], head, keys, idx)  # (rows,knn)
    kth = _kth_best(query[rows], head, keys, knn)  # (rows,)
    sorted_idx = np.sort(idx, axis=1)
    distinct = np.all(sorted_idx[:, 1:] != sorted_idx[:, :-1], axis=1) if knn > 1 else np.ones(len(idx), bool)
    good_enough = np.all(scores >= kth[:, None] - tol, axis=1)
    got_scores = np.asarray(got["scores"], np.float64)[rows]
    own = np.all(np.abs(got_scores - scores) <= tol, axis=1)
    valid = slot_ok.all(axis=1) & distinct & good_enough & own
    why = ""
    if not valid.all():
        r = int(np.flatnonzero(~valid)[0])
        if not slot_ok[r].all():
            why = f"slot outside the memory (0..{n_slots - 1})"
        elif not distinct[r]:
            why = "a slot selected twice"
        elif not good_enough[r]:
            worst = int(np.argmin(scores[r]))
            why = (
                f"slot {int(idx[r, worst])} scores {scores[r, worst]:.6g}, below the k-th best {kth[r]:.6g} "
                f"by more than the scores atol {tol:g}"
            )
        else:
            why = "its scores are not the scores of the slots it selected"
    return ~valid, why


def _structure_problems(got: dict, expected: dict, prefix: str, precision: str) -> dict[str, TensorResult]:
    """The taps of one layer that are missing, of the wrong shape or dtype, not finite, or
    (reduced precision) not of the declared type: tap -> failing result."""
    results: dict[str, TensorResult] = {}
    for name in TAPS:
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
        elif why := type_problem(precision, name, g):
            results[name] = TensorResult(full, FAIL, message=why)
    return results


def _compare_layer(
    got: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    *,
    config: PKMConfig,
    keys: np.ndarray,
    values: np.ndarray,
    tolerance,
    prefix: str,
    skip_tokens: np.ndarray | None,
    path: str,
    layer_input: np.ndarray | None = None,
    layer_weights: dict[str, np.ndarray] | None = None,
) -> tuple[list[TensorResult], dict[str, np.ndarray], np.ndarray]:
    """One layer's five taps (names ``prefix + tap``); returns the results, the errors of
    failing float taps, and the tokens whose selection legitimately differs here.

    A reduced-precision path (``...@fp16``) is judged by :mod:`conformance.precision`'s
    rules where they differ from float32's: the type of ``query``, the near-tie margin,
    and the ``indices``, ``scores``, ``weights`` and ``output`` taps, with figures."""
    rules = reduced_precision_rules(
        path, got, expected, keys, values, config, tolerance("query"), layer_input, layer_weights
    )
    results: dict[str, TensorResult] = {}
    errors: dict[str, np.ndarray] = {}
    heads = config.heads
    skip_rows = None if skip_tokens is None else np.repeat(skip_tokens, heads)  # (bs*heads,)

    # shape, dtype and finiteness first: nothing else is meaningful without them
    results.update(_structure_problems(got, expected, prefix, precision_of(path)))

    # which rows may legitimately select differently
    score_tol = tolerance("scores")
    margins = selection_margins(expected["query"], keys, config.knn)  # (bs*heads,)
    threshold = score_tol.atol
    if rules is not None:
        margins = rules.margins(expected["query"], margins)
        threshold = rules.tie_threshold(score_tol.atol)
    ambiguous = margins <= threshold
    differs = np.zeros_like(ambiguous)
    if "indices" not in results:
        differs = (
            np.any(np.asarray(got["indices"]) != expected["indices"], axis=1)
            if rules is None
            else rules.differs(got["indices"], expected["indices"])
        )
    if skip_rows is not None:
        differs &= ~skip_rows
    invalid = np.zeros_like(differs)
    invalid_why = ""
    check_rows = differs & ambiguous
    if rules is None and check_rows.any() and "scores" not in results and "indices" not in results:
        bad, invalid_why = _invalid_selections(
            got, expected["query"], keys, config.knn, np.flatnonzero(check_rows), score_tol.atol
        )
        invalid[np.flatnonzero(check_rows)[bad]] = True

    for name in TAPS:
        if name in results:
            continue
        full = prefix + name
        g, e = np.asarray(got[name]), expected[name]
        tol = tolerance(name)
        if rules is not None and (judged := rules.judge(name, g, e, tol, got)) is not None:
            judged.name = full
            results[name] = judged
            continue
        if name == "indices":
            wrong = differs & (~ambiguous | invalid)
            result = TensorResult(
                full,
                FAIL if wrong.any() else PASS,
                max_abs=float(np.abs(g - e).max(initial=0)),
                mismatches=int(wrong.sum()),
                ambiguous_rows=int(ambiguous.sum()),
                atol=0.0,
                rtol=0.0,
            )
            unambiguous = differs & ~ambiguous
            if unambiguous.any():
                rows = np.flatnonzero(unambiguous)
                result.message = (
                    f"{len(rows)} row(s) select other memory slots without a near-tie "
                    f"(margin > near-tie threshold {float(np.broadcast_to(threshold, margins.shape)[rows[0]]):g}); "
                    f"first: row {rows[0]}, "
                    f"expected {e[rows[0]].tolist()}, got {g[rows[0]].tolist()}"
                )
            elif invalid.any():
                rows = np.flatnonzero(invalid)
                result.message = (
                    f"{len(rows)} ambiguous row(s) select slots that are not a correct top-{config.knn}; "
                    f"first: row {rows[0]}: {invalid_why}; got {g[rows[0]].tolist()}"
                )
            elif differs.any():
                result.message = f"{int(differs.sum())} ambiguous row(s) selected differently"
            if skip_rows is not None and skip_rows.any():
                result.message = _join(
                    result.message, f"{int(skip_tokens.sum())} token(s) downstream of an ambiguous flip not compared"
                )
            results[name] = result
        elif name == "output":
            tokens_differ = differs.reshape(-1, heads).any(axis=1)  # (bs,)
            skip = tokens_differ if skip_tokens is None else tokens_differ | skip_tokens
            g2, e2 = g.reshape(-1, config.v_dim), e.reshape(-1, config.v_dim)
            result, err = _compare_float(full, g2, e2, tol, skip_rows=skip)
            if tokens_differ.any() and "indices" in got and "weights" in got:
                n = heads * config.knn
                idx = np.clip(np.asarray(got["indices"]).reshape(-1, n)[tokens_differ], 0, len(values) - 1)
                w = np.asarray(got["weights"], np.float64).reshape(-1, n)[tokens_differ]
                own = np.einsum("bn,bnd->bd", w, values[idx].astype(np.float64))
                check, _ = _compare_float(full, g2[tokens_differ], own, tol)
                if not check:
                    result.status, result.mismatches = FAIL, result.mismatches + check.mismatches
                    result.message = _join(
                        result.message,
                        "tokens with a different (ambiguous) selection do not equal the weighted sum of the "
                        f"rows they selected: {check.message}",
                    )
                    result.worst_elements = result.worst_elements or check.worst_elements
            for element in result.worst_elements:  # in the tap's own shape, not the (tokens, v_dim) view
                flat = np.ravel_multi_index(tuple(element["index"]), g2.shape)
                element["index"] = [int(i) for i in np.unravel_index(flat, g.shape)]
            result.ambiguous_rows = int(tokens_differ.sum())
            results[name] = result
            if not result:
                errors[full] = err
        else:
            result, err = _compare_float(full, g, e, tol, skip_rows=skip_rows)
            results[name] = result
            if not result:
                errors[full] = err
    if rules is not None:
        for name, figures in rules.figures(got, expected, ambiguous).items():
            results[name].figures = figures
    flipped = differs.reshape(-1, heads).any(axis=1)
    return [results[name] for name in TAPS], errors, flipped


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


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
    """Compare every tap, layer by layer, in pipeline order; see the module docstring.
    ``layer_input``: the golden input of the first layer (a reduced-precision path's
    ``query`` is judged by a bound derived from it). ``judged_layers``: judge only that
    many layers against the golden; later layers' taps are only checked to be present,
    of the golden's shape and dtype, finite and of the path's type, and appear only when
    they are not (their judgement is made elsewhere: on their golden inputs)."""
    tensors: list[TensorResult] = []
    errors: dict[str, np.ndarray] = {}
    downstream = None  # tokens whose input to this layer legitimately differs
    set_aside = 0

    def tolerance(tap: str) -> Tolerance:
        return policy.resolve(case, path, tap)

    per_layer = split_layers(weights)  # torch names without the layers.<i>. prefix
    for i in range(layers):
        prefix = "" if layers == 1 else f"{i}/"
        if judged_layers is not None and i >= judged_layers:
            layer_got = {t: got[prefix + t] for t in TAPS if prefix + t in got}
            layer_expected = {t: expected[prefix + t] for t in TAPS}
            tensors += list(_structure_problems(layer_got, layer_expected, prefix, precision_of(path)).values())
            continue
        results, errs, flipped = _compare_layer(
            {t: got[prefix + t] for t in TAPS if prefix + t in got},
            {t: expected[prefix + t] for t in TAPS},
            config=config,
            keys=per_layer[i]["keys"],
            values=per_layer[i]["values.weight"],
            tolerance=tolerance,
            prefix=prefix,
            skip_tokens=downstream,
            path=path,
            layer_input=layer_input if i == 0 else None,
            layer_weights=per_layer[i],
        )
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
    """Refuse (ToleranceError) a tolerance that makes a tap uncheckable for this golden:

    * a float tap where an all-zero answer would pass for most elements
      (``|expected| <= atol + rtol * |expected|`` for over half of them, so ``rtol >= 1``
      always), and
    * a ``scores`` atol larger than the median selection margin of the rows that are not
      exact ties: then the tolerance alone makes most selections ambiguous, and the
      ``indices`` check is switched off for them.
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
        for name in tap_names(layers):
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
