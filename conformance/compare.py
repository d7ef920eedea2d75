"""Comparing a path's taps with the golden ones.

Float taps compare under their tolerance. ``indices`` compare exactly, except in
*ambiguous* rows: rows whose product-key selection has a top-k margin (see
:func:`pkm_models.selection.selection_margins`) within the ``scores`` atol, where either
choice is right. In such rows a different selection is reported, not failed; the
``output`` of a token whose selection differs is compared with the weighted sum of the
value rows the path itself selected (in float64), so a wrong value row or weight still
fails. NaN or Inf anywhere fails; so does a shape or dtype mismatch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from conformance.precision import reduced_precision_rules
from conformance.tolerances import Tolerance, TolerancePolicy
from pkm_models.config import TAPS, PKMConfig
from pkm_models.selection import selection_margins


@dataclasses.dataclass
class TensorResult:
    name: str
    status: str  # "pass" | "fail"
    max_abs: float | None = None
    max_rel: float | None = None
    atol: float | None = None
    rtol: float | None = None
    mismatches: int = 0
    ambiguous_rows: int = 0
    message: str = ""
    first_mismatches: list[dict] = dataclasses.field(default_factory=list)
    figures: dict = dataclasses.field(default_factory=dict)  # reduced precision: conformance.precision

    def __bool__(self) -> bool:
        return self.status == "pass"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "atol": self.atol,
            "rtol": self.rtol,
            "mismatches": self.mismatches,
            "ambiguous_rows": self.ambiguous_rows,
            "message": self.message,
            **({"figures": self.figures} if self.figures else {}),
        }


@dataclasses.dataclass
class Comparison:
    tensors: list[TensorResult]
    errors: dict[str, np.ndarray]  # tap -> absolute errors of failing float taps (for histograms)

    @property
    def ok(self) -> bool:
        return all(self.tensors)

    @property
    def first_divergence(self) -> str | None:
        return next((t.name for t in self.tensors if not t), None)

    def __bool__(self) -> bool:
        return self.ok


def _first_mismatches(got: np.ndarray, expected: np.ndarray, bad: np.ndarray, limit: int = 5) -> list[dict]:
    out = []
    for index in np.argwhere(bad)[:limit]:
        idx = tuple(int(i) for i in index)
        out.append({"index": idx, "obtained": got[idx].item(), "expected": expected[idx].item()})
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
        bad = considered & (abs_err > tol.atol + tol.rtol * np.abs(e))
    mismatches = int(bad.sum())
    result = TensorResult(
        name=name,
        status="fail" if mismatches else "pass",
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
        result.first_mismatches = _first_mismatches(got, expected, bad)
    return result, abs_err[considered]


def compare_taps(
    got: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    *,
    config: PKMConfig,
    keys: np.ndarray,
    values: np.ndarray,
    policy: TolerancePolicy,
    case: str,
    path: str,
) -> Comparison:
    """Compare every tap in pipeline order; see the module docstring for the rules."""
    results: dict[str, TensorResult] = {}
    errors: dict[str, np.ndarray] = {}
    # precision hook: a path named "...@fp16|bf16|int8" is judged by conformance.precision's rules
    rules = reduced_precision_rules(path, got, expected, keys, values, config, policy.resolve(case, path, "query"))

    # shape, dtype and finiteness first: nothing else is meaningful without them
    for name in TAPS:
        if name not in got:
            results[name] = TensorResult(name, "fail", message=f"the path returned no {name!r} tap")
            continue
        g, e = np.asarray(got[name]), expected[name]
        if g.shape != e.shape or g.dtype != e.dtype:
            results[name] = TensorResult(
                name, "fail", message=f"expected {e.dtype}{list(e.shape)}, got {g.dtype}{list(g.shape)}"
            )
        elif g.dtype.kind == "f" and not np.all(np.isfinite(g)):
            results[name] = TensorResult(
                name,
                "fail",
                mismatches=int((~np.isfinite(g)).sum()),
                message=f"{int(np.isnan(g).sum())} NaN and {int(np.isinf(g).sum())} Inf values",
            )
        elif rules is not None and (why := rules.type_problem(name, g)):
            results[name] = TensorResult(name, "fail", message=why)

    # which rows may legitimately select differently
    score_tol = policy.resolve(case, path, "scores")
    margins = selection_margins(expected["query"], keys, config.knn)  # (bs*heads,)
    if rules is not None:
        margins = rules.margins(expected["query"], margins)
    threshold = np.broadcast_to(score_tol.atol if rules is None else rules.tie_threshold(score_tol.atol), margins.shape)
    ambiguous = margins <= threshold
    differs = np.zeros_like(ambiguous)
    if "indices" not in results:
        differs = (
            np.any(np.asarray(got["indices"]) != expected["indices"], axis=1)
            if rules is None
            else rules.differs(got["indices"], expected["indices"])
        )

    for name in TAPS:
        if name in results:
            continue
        g, e = np.asarray(got[name]), expected[name]
        tol = policy.resolve(case, path, name)
        if rules is not None and (judged := rules.judge(name, g, e, tol, got)) is not None:
            results[name] = judged
            continue
        if name == "indices":
            wrong = differs & ~ambiguous
            result = TensorResult(
                name,
                "fail" if wrong.any() else "pass",
                max_abs=float(np.abs(g - e).max(initial=0)),
                mismatches=int(wrong.sum()),
                ambiguous_rows=int(ambiguous.sum()),
                atol=0.0,
                rtol=0.0,
            )
            if wrong.any():
                rows = np.flatnonzero(wrong)
                result.message = (
                    f"{len(rows)} row(s) select other memory slots without a near-tie "
                    f"(margin > {'scores atol' if rules is None else rules.precision + ' near-tie margin'} "
                    f"{float(threshold[rows[0]]):g}); first: row {rows[0]}, "
                    f"expected {e[rows[0]].tolist()}, got {g[rows[0]].tolist()}"
                )
            elif (differs & ambiguous).any():
                result.message = f"{int((differs & ambiguous).sum())} ambiguous row(s) selected differently"
            results[name] = result
        elif name == "output":
            tokens_differ = differs.reshape(-1, config.heads).any(axis=1)  # (bs,)
            g2, e2 = g.reshape(-1, config.v_dim), e.reshape(-1, config.v_dim)
            result, err = _compare_float(name, g2, e2, tol, skip_rows=tokens_differ)
            if tokens_differ.any() and "indices" in got and "weights" in got:
                n = config.heads * config.knn
                idx = np.asarray(got["indices"]).reshape(-1, n)[tokens_differ]
                w = np.asarray(got["weights"], np.float64).reshape(-1, n)[tokens_differ]
                own = np.einsum("bn,bnd->bd", w, values[idx].astype(np.float64))
                check, _ = _compare_float(name, g2[tokens_differ], own, tol)
                if not check:
                    result.status, result.mismatches = "fail", result.mismatches + check.mismatches
                    result.message = (result.message + "; " if result.message else "") + (
                        "tokens with a different (ambiguous) selection do not equal the weighted sum of the "
                        f"rows they selected: {check.message}"
                    )
            result.ambiguous_rows = int(tokens_differ.sum())
            results[name] = result
            if not result:
                errors[name] = err
        else:
            result, err = _compare_float(name, g, e, tol)
            results[name] = result
            if not result:
                errors[name] = err
    if rules is not None:
        for name, figures in rules.figures(got, expected, ambiguous).items():
            results[name].figures = figures
    return Comparison([results[name] for name in TAPS], errors)
