"""Facts about the product-key selection that every implementation, and the verdict,
can use. This is the one place of the selection's math.

:func:`product_candidates`: which pairs of the two halves' best sub-keys can be among the
final top-k at all (119 of 32 x 32 at knn 32), so that the product stage ranks those only.

The exact (float64) facts a verdict needs about a selection someone else made:
:func:`valid_slots` (every slot exists and appears once), :func:`slot_scores` (the exact
score of each selected slot), :func:`kth_best` (the exact k-th best score),
:func:`selection_agreement` (the same set) and :func:`own_weighted_sum` (the weighted sum
of the rows a selection names, with its own weights). None of them ever indexes outside
a table: a slot that does not exist is reported by :func:`valid_slots`, and the others
compute on a clipped copy of it.

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


def set_margins(query: np.ndarray, keys: np.ndarray, knn: int) -> np.ndarray:
    """(bs*heads,) float64: the gaps across which the selected *set* can change: the k-th
    boundary of each half's sub-key selection and of the final product selection. Not the
    order gaps inside the set, which :func:`selection_margins` adds: a reordering within
    the set changes neither the sorted scores, nor the weights, nor the output."""
    heads, _, _, half = keys.shape
    q = np.asarray(query, np.float64).reshape(-1, heads, 2, half)  # (bs,heads,2,half)
    sub = -np.sort(-np.einsum("bhtd,htnd->bhtn", q, np.asarray(keys, np.float64)), axis=-1)  # (bs,heads,2,n_keys)
    margin = np.minimum(_boundary_gap(sub[:, :, 0], knn), _boundary_gap(sub[:, :, 1], knn))
    best1, best2 = sub[:, :, 0, :knn], sub[:, :, 1, :knn]
    product = -np.sort(-(best1[..., :, None] + best2[..., None, :]).reshape(*best1.shape[:2], -1), axis=-1)
    return np.minimum(margin, _boundary_gap(product, knn)).reshape(-1)


def kth_best(query: np.ndarray, keys: np.ndarray, knn: int) -> np.ndarray:
    """(bs*heads,) float64: the exact k-th best product score of each row (the product of
    each half's ``knn`` best sub-keys holds the global top ``knn``)."""
    heads, _, _, half = keys.shape
    q = np.asarray(query, np.float64).reshape(-1, heads, 2, half)  # (bs,heads,2,half)
    sub = -np.sort(-np.einsum("bhtd,htnd->bhtn", q, np.asarray(keys, np.float64)), axis=-1)[..., :knn]
    product = (sub[:, :, 0, :, None] + sub[:, :, 1, None, :]).reshape(*sub.shape[:2], -1)  # (bs,heads,knn*knn)
    return (-np.sort(-product, axis=-1))[..., knn - 1].reshape(-1)


def valid_slots(indices: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``indices`` (rows, knn): (every slot lies in ``0..size-1``, no slot
    appears twice), two (rows,) bool arrays."""
    idx = np.asarray(indices)
    in_range = np.all((idx >= 0) & (idx < size), axis=1)
    ordered = np.sort(idx, axis=1)
    distinct = np.all(ordered[:, 1:] != ordered[:, :-1], axis=1)
    return in_range, distinct


def slot_scores(query: np.ndarray, keys: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(bs*heads, knn) float64: the exact score (the given query, float32 keys) of each
    selected slot: slot ``i`` pairs sub-key ``i // n_keys`` of the first half with
    ``i % n_keys`` of the second. Slots outside the table are clipped to it (their rows
    fail :func:`valid_slots`)."""
    heads, _, n_keys, half = keys.shape
    q = np.asarray(query, np.float64).reshape(-1, heads, 2, half)  # (bs,heads,2,half)
    idx = np.clip(np.asarray(indices), 0, n_keys * n_keys - 1).reshape(q.shape[0], heads, -1)  # (bs,heads,knn)
    k = np.asarray(keys, np.float64)
    h = np.arange(heads)[None, :, None]
    first = np.einsum("bhd,bhkd->bhk", q[:, :, 0], k[h, 0, idx // n_keys])
    second = np.einsum("bhd,bhkd->bhk", q[:, :, 1], k[h, 1, idx % n_keys])
    return (first + second).reshape(-1, idx.shape[-1])


def selection_agreement(got_indices: np.ndarray, expected_indices: np.ndarray) -> np.ndarray:
    """(rows,) bool: the selected *set* equals the expected one (order within a row ignored)."""
    return np.all(np.sort(np.asarray(got_indices), axis=1) == np.sort(np.asarray(expected_indices), axis=1), axis=1)


def own_weighted_sum(indices: np.ndarray, weights: np.ndarray, values: np.ndarray, per_token: int) -> np.ndarray:
    """(bs, v_dim) float64: per token, the sum of weight * float32 value row over its
    ``per_token`` (heads * knn) slots, with the selection's own ``indices`` and
    ``weights``. Slots outside the table are clipped to it (their rows fail
    :func:`valid_slots`)."""
    idx = np.clip(np.asarray(indices), 0, len(values) - 1).reshape(-1, per_token)  # (bs,heads*knn)
    w = np.asarray(weights, np.float64).reshape(-1, per_token)
    return np.einsum("bn,bnd->bd", w, np.asarray(values)[idx].astype(np.float64))
