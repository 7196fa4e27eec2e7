"""k-NN metrics against brute-force neighbour sets and textbook dynamic programmes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from prh_lightning.functional import (
    METRICS,
    cycle_knn,
    edit_distance_knn,
    knn_indices,
    lcs_knn,
    mutual_knn,
)


# These tests check each formula on the features as given; the default row normalisation
# (normalize=True in every entry point) is tested in test_numerics.py.
cycle_knn = functools.partial(cycle_knn, normalize=False)
edit_distance_knn = functools.partial(edit_distance_knn, normalize=False)
lcs_knn = functools.partial(lcs_knn, normalize=False)
mutual_knn = functools.partial(mutual_knn, normalize=False)


def brute_neighbours(x: np.ndarray, k: int) -> list[list[int]]:
    """Top-k by inner product, self excluded, ties by lower index (sorted on (-sim, j))."""
    sim = x @ x.T
    n = len(x)
    return [sorted((j for j in range(n) if j != i), key=lambda j: (-sim[i, j], j))[:k] for i in range(n)]


def lcs_dp(s: list[int], t: list[int]) -> int:
    table = [[0] * (len(t) + 1) for _ in range(len(s) + 1)]
    for i, si in enumerate(s):
        for j, tj in enumerate(t):
            table[i + 1][j + 1] = table[i][j] + 1 if si == tj else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def levenshtein_dp(s: list[int], t: list[int]) -> int:
    prev = list(range(len(t) + 1))
    for i, si in enumerate(s, 1):
        cur = [i]
        for j, tj in enumerate(t, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (si != tj)))
        prev = cur
    return prev[-1]


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=g, dtype=torch.float64)
    b = a @ torch.randn(6, 5, generator=g, dtype=torch.float64) + 0.8 * torch.randn(40, 5, generator=g, dtype=torch.float64)
    return a, b


def test_knn_indices_match_brute_force_order(pair):
    a, _ = pair
    assert knn_indices(a, 7).tolist() == brute_neighbours(a.numpy(), 7)


def test_knn_indices_break_ties_by_lower_index():
    # Integer features on a tiny grid: many exactly tied inner products.
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-1, 2, (30, 3), generator=g).double()
    expected = brute_neighbours(x.numpy(), 6)
    assert knn_indices(x, 6).tolist() == expected
    assert knn_indices(x, 6, batch_size=4).tolist() == expected


def test_mutual_knn_matches_explicit_set_intersection(pair):
    a, b = pair
    na, nb = brute_neighbours(a.numpy(), 5), brute_neighbours(b.numpy(), 5)
    expected = np.mean([len(set(x) & set(y)) / 5 for x, y in zip(na, nb)])
    assert float(mutual_knn(a, b, k=5)) == pytest.approx(expected, abs=1e-7)


def test_mutual_knn_matches_platonic_rep_mask_formula(pair):
    # Reference protocol: diagonal set to -1e8, argsort descending, 0/1 masks multiplied.
    a, b = pair
    k = 4

    def masks(x):
        sim = (x @ x.T).numpy().copy()
        np.fill_diagonal(sim, -1e8)
        idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        m = np.zeros_like(sim)
        np.put_along_axis(m, idx, 1.0, axis=1)
        return m

    expected = ((masks(a) * masks(b)).sum(axis=1) / k).mean()
    assert float(mutual_knn(a, b, k=k)) == pytest.approx(expected, abs=1e-7)


def test_cycle_knn_matches_explicit_loops(pair):
    a, b = pair
    k = 3
    na, nb = brute_neighbours(a.numpy(), k), brute_neighbours(b.numpy(), k)
    expected = np.mean([any(i in na[j] for j in nb[i]) for i in range(len(na))])
    assert float(cycle_knn(a, b, k=k)) == pytest.approx(expected, abs=1e-7)


def test_lcs_and_edit_distance_match_dynamic_programming(pair):
    a, b = pair
    k = 6
    na, nb = brute_neighbours(a.numpy(), k), brute_neighbours(b.numpy(), k)
    lcs = np.mean([lcs_dp(x, y) for x, y in zip(na, nb)])
    edit = 1 - np.mean([levenshtein_dp(x, y) for x, y in zip(na, nb)]) / k
    assert float(lcs_knn(a, b, k=k)) == pytest.approx(lcs, abs=1e-6)
    assert float(edit_distance_knn(a, b, k=k)) == pytest.approx(edit, abs=1e-6)


def test_dynamic_programmes_on_known_strings():
    from prh_lightning.functional import edit_distances, lcs_lengths

    flaw = torch.tensor([ord(c) for c in "flaw"])
    lawn = torch.tensor([ord(c) for c in "lawn"])
    assert int(edit_distances(flaw, lawn)) == levenshtein_dp(flaw.tolist(), lawn.tolist()) == 2
    # batched over a leading dimension
    batch = edit_distances(torch.stack([flaw, flaw]), torch.stack([lawn, flaw]))
    assert batch.tolist() == [2, 0]
    assert int(lcs_lengths(torch.tensor([1, 2, 3, 4]), torch.tensor([2, 4, 1, 3]))) == 2


@pytest.mark.parametrize("name", ["mutual_knn", "edit_distance_knn"])
def test_identical_inputs_score_one(pair, name):
    a, _ = pair
    assert float(METRICS[name](a, a, k=5)) == pytest.approx(1.0)


def test_lcs_identical_inputs_is_k(pair):
    a, _ = pair
    assert float(lcs_knn(a, a, k=5)) == pytest.approx(5.0)


def test_mutual_knn_of_unrelated_pairing_is_near_chance():
    g = torch.Generator().manual_seed(3)
    n, k = 300, 10
    x = torch.randn(n, 8, generator=g)
    scores = [float(mutual_knn(x, x[torch.randperm(n, generator=g)], k=k)) for _ in range(5)]
    assert np.mean(scores) == pytest.approx(k / (n - 1), abs=0.01)


def test_invariant_to_rotation_of_features(pair):
    a, b = pair
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
    assert float(mutual_knn(a @ q, b, k=5)) == float(mutual_knn(a, b, k=5))


@pytest.mark.parametrize("name", ["mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"])
def test_bad_input_raises_clear_errors(name, pair):
    f = METRICS[name]
    a, b = pair
    with pytest.raises(ValueError, match="same samples"):
        f(a, b[:-1])
    with pytest.raises(ValueError, match="k must satisfy"):
        f(a, b, k=40)
    with pytest.raises(ValueError, match="k must satisfy"):
        f(a, b, k=0)
    bad = a.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        f(bad, b)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        f(a, bad)
    with pytest.raises(ValueError, match="2-D"):
        f(a[:, 0], b[:, 0])
    with pytest.raises(TypeError, match="floating"):
        f(a.long(), b)
    with pytest.raises(ValueError, match="same device"):
        f(a, torch.empty(b.shape, device="meta", dtype=b.dtype))
