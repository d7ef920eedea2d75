"""How close a product-key selection is to a tie, computed independently in float64.

Two correct implementations may pick different memory slots when candidate scores at a
top-k boundary (of either sub-key half, or of the final selection) are closer than their
float32 rounding: either choice is right. :func:`selection_margins` measures, for each
(token, head) row, the smallest such gap, so that callers can tell an ambiguous row from
a wrong one.
"""

from __future__ import annotations

import numpy as np


def _boundary_gap(sorted_desc: np.ndarray, k: int) -> np.ndarray:
    """Smallest gap between adjacent scores among the top k+1 (inf when there is no k+1-th).

    A gap inside the top k can reorder the selection; the gap at k can swap a slot in or out.
    """
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
        (bs*heads,) float64: the smallest gap between adjacent candidate scores at or above
        the k-th boundary of the three selections (each half's sub-keys, then the product).
    """
    heads, _, n_keys, half = keys.shape
    q = np.asarray(query, np.float64).reshape(-1, heads, 2, half)  # (bs,heads,2,half)
    sub = np.einsum("bhtd,htnd->bhtn", q, np.asarray(keys, np.float64))  # (bs,heads,2,n_keys)
    sub_sorted = -np.sort(-sub, axis=-1)  # descending
    margin = np.minimum(_boundary_gap(sub_sorted[:, :, 0], knn), _boundary_gap(sub_sorted[:, :, 1], knn))
    best1, best2 = sub_sorted[:, :, 0, :knn], sub_sorted[:, :, 1, :knn]  # (bs,heads,knn)
    product = (best1[..., :, None] + best2[..., None, :]).reshape(*best1.shape[:2], -1)  # (bs,heads,knn*knn)
    product_sorted = -np.sort(-product, axis=-1)
    margin = np.minimum(margin, _boundary_gap(product_sorted, knn))
    return margin.reshape(-1)
