"""Facts about the product-key selection that every implementation can use.

:func:`product_candidates`: which pairs of the two halves' best sub-keys can be among the
final top-k at all (119 of 32 x 32 at knn 32), so that the product stage ranks those only.

:func:`selection_margins`: how close a selection is to a tie, computed independently in
float64. Two correct implementations may pick different memory slots when candidate scores at a
top-k boundary (of either sub-key half, or of the final selection) are closer than their
float32 rounding: either choice is right. :func:`selection_margins` measures, for each
(token, head) row, the smallest such gap, so that callers can tell an ambiguous row from
a wrong one.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def product_candidates(knn: int) -> tuple[np.ndarray, np.ndarray]:
    """The rank pairs ``(i, j)`` of the two halves' sorted sub-key selections that can be
    among the ``knn`` best of their cartesian product, in ascending ``i * knn + j`` (the
    order of the flattened product): two int32 arrays, ``i`` and ``j``.

    Each half's ``knn`` best scores are sorted in descending order, so every pair
    ``(i', j')`` with ``i' <= i`` and ``j' <= j`` scores at least as much as ``(i, j)``
    and comes before it in the flattened order (so it also wins a tie under a stable
    top-k, which prefers the lower index). There are ``(i + 1) * (j + 1) - 1`` such pairs
    besides ``(i, j)`` itself; when that is ``knn`` or more, ``(i, j)`` cannot be selected.
    The pairs with ``(i + 1) * (j + 1) <= knn`` are therefore the only candidates, and a
    stable top-k over them in this order selects exactly what a stable top-k over all
    ``knn ** 2`` does, ties included.
    """
    pairs = [(i, j) for i in range(knn) for j in range(knn) if (i + 1) * (j + 1) <= knn]
    i, j = np.array(pairs, dtype=np.int32).T
    i.flags.writeable = j.flags.writeable = False  # cached: every call gets the same arrays
    return i, j


def _boundary_gap(sorted_desc: np.ndarray, k: int) -> np.ndarray:
    """Gap between the k-th and (k+1)-th score (inf when there is no (k+1)-th): a slot can
    swap in or out across it."""
    if sorted_desc.shape[-1] <= k:
        return np.full(sorted_desc.shape[:-1], np.inf)
    return sorted_desc[..., k - 1] - sorted_desc[..., k]


def _order_gap(sorted_desc: np.ndarray, k: int) -> np.ndarray:
    """Smallest gap between adjacent scores among the top k+1: the selected slots can swap
    places (reordering the ``indices`` tap) or swap in and out across it."""
    top = sorted_desc[..., : k + 1]
    if top.shape[-1] < 2:
        return np.full(top.shape[:-1], np.inf)
    return np.min(top[..., :-1] - top[..., 1:], axis=-1)


def selection_margins(query: np.ndarray, keys: np.ndarray, knn: int) -> np.ndarray:
    """Per-row ambiguity margin of the product-key selection.

    Args:
        query: (bs*heads, k_dim) queries as the layer saw them (the ``query`` tap).
        keys: (heads, 2, n_keys, k_dim/2) sub-keys.
        knn: rows selected per head.

    Returns:
        (bs*heads,) float64: the smallest of the gaps at the k-th boundary of each half's
        sub-key selection and the gaps between adjacent scores among the top k+1 of the
        final (product) selection.
    """
    heads, _, _, half = keys.shape
    q = np.asarray(query, np.float64).reshape(-1, heads, 2, half)  # (bs,heads,2,half)
    sub = np.einsum("bhtd,htnd->bhtn", q, np.asarray(keys, np.float64))  # (bs,heads,2,n_keys)
    sub_sorted = -np.sort(-sub, axis=-1)  # descending
    margin = np.minimum(_boundary_gap(sub_sorted[:, :, 0], knn), _boundary_gap(sub_sorted[:, :, 1], knn))
    best1, best2 = sub_sorted[:, :, 0, :knn], sub_sorted[:, :, 1, :knn]  # (bs,heads,knn)
    product = (best1[..., :, None] + best2[..., None, :]).reshape(*best1.shape[:2], -1)  # (bs,heads,knn*knn)
    product_sorted = -np.sort(-product, axis=-1)
    margin = np.minimum(margin, _order_gap(product_sorted, knn))
    return margin.reshape(-1)
