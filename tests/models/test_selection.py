import numpy as np

from pkm_models.selection import selection_margins


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
