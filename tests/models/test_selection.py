import numpy as np

from pkm_models.selection import product_candidates, selection_margins


def _keys(heads=1, n_keys=6, half=2, seed=0):
    return np.random.default_rng(seed).normal(size=(heads, 2, n_keys, half)).astype(np.float32)


def test_clear_selection_has_a_positive_margin():
    keys = _keys()
    query = np.random.default_rng(1).normal(size=(5, 4))
    margins = selection_margins(query, keys, knn=2)
    assert margins.shape == (5,)
    assert np.all(margins > 0)


def test_duplicate_sub_key_at_the_boundary_is_a_tie():
    keys = _keys()
    query = np.array([[1.0, 0.0, 1.0, 0.0]])
    first = keys[0, 0, :, 0]
    order = np.argsort(-first)
    keys[0, 0, order[2]] = keys[0, 0, order[1]]  # the 2nd and 3rd best sub-keys of half 0 tie
    assert selection_margins(query, keys, knn=2)[0] == 0.0  # a slot swaps in or out
    assert selection_margins(query, keys, knn=3)[0] == 0.0  # two selected slots swap places
    assert selection_margins(query, keys, knn=1)[0] > 0.0  # the tie is below the boundary


def test_tie_below_the_selection_is_not_ambiguous():
    keys = _keys(n_keys=8)
    query = np.array([[1.0, 0.0, 1.0, 0.0]])
    order = np.argsort(-keys[0, 0, :, 0])
    keys[0, 0, order[6]] = keys[0, 0, order[5]]
    assert selection_margins(query, keys, knn=2)[0] > 0.0


def test_margin_matches_a_brute_force_sort():
    keys = _keys(heads=2, n_keys=8, half=3, seed=4)
    query = np.random.default_rng(5).normal(size=(4 * 2, 6))
    knn = 3
    got = selection_margins(query, keys, knn)
    for row in range(query.shape[0]):
        h = row % 2
        q1, q2 = query[row, :3], query[row, 3:]
        s1, s2 = np.sort(keys[h, 0] @ q1)[::-1], np.sort(keys[h, 1] @ q2)[::-1]
        product = np.sort(np.add.outer(s1[:knn], s2[:knn]).ravel())[::-1][: knn + 1]
        expected = min(s1[knn - 1] - s1[knn], s2[knn - 1] - s2[knn], np.min(-np.diff(product)))
        assert got[row] == np.float64(expected) or abs(got[row] - expected) < 1e-12


def _stable_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest, the lower position first among equals (numpy's stable sort)."""
    return np.argsort(-scores, kind="stable")[:k]


def test_product_candidates_at_knn_32_are_the_119_pairs_whose_rank_product_fits():
    first, second = product_candidates(32)
    assert len(first) == 119  # sum over i of floor(32 / (i + 1))
    assert ((first + 1) * (second + 1) <= 32).all()
    flat = first * 32 + second
    assert (np.diff(flat) > 0).all()  # the flattened product's order
    pairs = set(zip(first.tolist(), second.tolist(), strict=True))
    assert {(0, 31), (31, 0), (4, 5)} <= pairs and (5, 5) not in pairs


def test_ranking_the_candidates_selects_what_ranking_the_whole_product_does():
    rng = np.random.default_rng(0)
    for knn in (1, 2, 3, 4, 7, 8, 32):
        first, second = product_candidates(knn)
        for trial in range(200):
            # sorted halves; every few trials coarsely rounded so that ties are everywhere
            s1, s2 = (-np.sort(-rng.normal(size=knn)) for _ in range(2))
            if trial % 3:
                s1, s2 = np.round(s1 * 2) / 2, np.round(s2 * 2) / 2
            product = (s1[:, None] + s2[None, :]).reshape(-1)
            expected = _stable_top_k(product, knn)  # flattened positions i * knn + j
            chosen = _stable_top_k(s1[first] + s2[second], knn)
            np.testing.assert_array_equal((first * knn + second)[chosen], expected)
