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


# -- fast paths: bit-parallel programmes, all layer pairs at once, the float32 certificate ------


def test_bit_parallel_lcs_and_edit_distance_match_dynamic_programming():
    from prh_lightning.functional.knn import edit_from_matches, lcs_from_matches

    rng = np.random.default_rng(0)
    for k in (1, 2, 5, 10, 33, 62):
        pairs = []
        for _ in range(40):  # lists of distinct ids drawn from a small pool: many partial overlaps
            pool = rng.permutation(k + 3)
            pairs.append((list(pool[:k]), list(rng.permutation(pool[: k + 2])[:k])))
        matches = torch.tensor(
            [[sum(1 << p for p, x in enumerate(s) if x == y) for y in t] for s, t in pairs], dtype=torch.long
        )
        assert lcs_from_matches(matches, k).tolist() == [lcs_dp(s, t) for s, t in pairs]
        assert edit_from_matches(matches, k).tolist() == [levenshtein_dp(s, t) for s, t in pairs]


@pytest.mark.parametrize("dense", [True, False])
def test_layer_matrix_matches_brute_force_on_every_pair(dense, monkeypatch):
    # every cell against neighbour lists and programmes written here; dense=False takes the
    # large-n route (sorted lookups and per-pair DP) on the same data
    from prh_lightning import alignment_matrix
    from prh_lightning.functional import knn

    if not dense:
        monkeypatch.setattr(knn, "_DENSE_MAX", 0)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(60, 6, generator=g, dtype=torch.float64)
    xs = [base + s * torch.randn(60, 6, generator=g, dtype=torch.float64) for s in (0.2, 0.6, 1.0)]
    ys = [base @ torch.randn(6, 5, generator=g, dtype=torch.float64) + s * torch.randn(60, 5, generator=g, dtype=torch.float64) for s in (0.3, 2.0)]
    k = 6
    nx = [brute_neighbours(x.numpy(), k) for x in xs]
    ny = [brute_neighbours(y.numpy(), k) for y in ys]
    formulas = {
        "mutual_knn": lambda a, b: np.mean([len(set(s) & set(t)) / k for s, t in zip(a, b)]),
        "cycle_knn": lambda a, b: np.mean([any(i in a[j] for j in b[i]) for i in range(len(a))]),
        "lcs_knn": lambda a, b: np.mean([lcs_dp(s, t) for s, t in zip(a, b)]),
        "edit_distance_knn": lambda a, b: 1 - np.mean([levenshtein_dp(s, t) for s, t in zip(a, b)]) / k,
    }
    for name, formula in formulas.items():
        got = alignment_matrix(xs, ys, metric=name, k=k, normalize=False)
        want = np.array([[formula(a, b) for b in ny] for a in nx])
        np.testing.assert_allclose(got.numpy(), want, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("k", [14, 15, 30, 31])
def test_ordered_layer_matrix_matches_brute_force_at_each_mask_width(k):
    # the all-pairs LCS / edit-distance route keeps a list's bit mask in int16 up to k = 14,
    # int32 up to k = 30, then int64: the cells on either side of each switch against
    # neighbour lists and programmes written here
    from prh_lightning import alignment_matrix

    g = torch.Generator().manual_seed(11)
    base = torch.randn(48, 5, generator=g, dtype=torch.float64)
    xs = [base + s * torch.randn(48, 5, generator=g, dtype=torch.float64) for s in (0.3, 1.0)]
    ys = [base @ torch.randn(5, 4, generator=g, dtype=torch.float64) + s * torch.randn(48, 4, generator=g, dtype=torch.float64) for s in (0.2, 0.8)]
    nx = [brute_neighbours(x.numpy(), k) for x in xs]
    ny = [brute_neighbours(y.numpy(), k) for y in ys]
    lcs = np.array([[np.mean([lcs_dp(s, t) for s, t in zip(a, b)]) for b in ny] for a in nx])
    edit = np.array([[1 - np.mean([levenshtein_dp(s, t) for s, t in zip(a, b)]) / k for b in ny] for a in nx])
    got_lcs = alignment_matrix(xs, ys, metric="lcs_knn", k=k, normalize=False)
    got_edit = alignment_matrix(xs, ys, metric="edit_distance_knn", k=k, normalize=False)
    np.testing.assert_allclose(got_lcs.numpy(), lcs, atol=1e-12)
    np.testing.assert_allclose(got_edit.numpy(), edit, atol=1e-12)


def _float64_lists(x: torch.Tensor, k: int) -> list[list[int]]:
    """Neighbour lists of the float64 row-normalised features, sorted on (-similarity, index)."""
    u = x.double().numpy()
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    return brute_neighbours(u, k)


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_float32_lists_are_the_float64_ones_under_many_near_ties(offset):
    # rows = a few centres + tiny noise: cosines crowd within ~1e-6 of each other, far below
    # float32's resolution of the Gram, so most rows need the certificate's float64 fallback
    from prh_lightning.functional.knn import exact_neighbours
    from prh_lightning.functional._numerics import centre, condition

    g = torch.Generator().manual_seed(7)
    centres = torch.randn(4, 64, generator=g, dtype=torch.float64)
    x = (centres[torch.arange(200) % 4] + 1e-3 * torch.randn(200, 64, generator=g, dtype=torch.float64) + offset).float()
    x64 = condition(x, "x")
    c = centre(x64, float(torch.finfo(torch.float32).eps), torch.float32, "x", exact_mean=False)
    want = _float64_lists(x, 8)
    assert exact_neighbours(c, x64, 8, 64, ordered=True).tolist() == want
    assert exact_neighbours(c, x64, 8, 64, gram=torch.empty(200, 200), ordered=True).tolist() == want
    sets = exact_neighbours(c, x64, 8, 64, ordered=False).tolist()
    assert [sorted(s) for s in sets] == [sorted(w) for w in want]


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_rounding_bound_covers_the_float32_scores(offset):
    # the certificate's bound against scores computed in float64 here, on features whose
    # float32 Gram really does round (d = 512, an offset carried by the shift term)
    from prh_lightning.functional.knn import _shift, rounding_bound
    from prh_lightning.functional._numerics import centre, condition

    g = torch.Generator().manual_seed(9)
    x = (torch.randn(300, 512, generator=g, dtype=torch.float64) + offset).float()
    x64 = condition(x, "x", normalize=False)
    c = centre(x64, float(torch.finfo(torch.float32).eps), torch.float32, "x", exact_mean=False)
    shift = _shift(c, x64, 300)
    base, rel = rounding_bound(c.xc, shift)
    fl = (c.xc @ c.xc.T).double()
    xc64 = x64.numpy() * c.scale - c.mean.numpy()
    exact = xc64 @ xc64.T
    if shift is not None:
        fl = (c.xc @ c.xc.T + shift.float()[None, :]).double()
        exact = exact + shift.numpy()[None, :]
    err = (fl - torch.from_numpy(exact)).abs()
    assert bool((err <= base[:, None] + rel * fl.abs()).all())
    assert float(err.max()) > 0  # the float32 scores do differ from the float64 ones


def test_float32_route_without_a_float64_copy_gives_the_float64_lists_under_near_ties():
    # the same near-tie features with no common offset: the float32 route (normalised in float32,
    # float64 rows formed only for re-ranked rows) is taken and must give the float64 lists
    from prh_lightning.functional._numerics import ConditionedRows, pivot_free_float32
    from prh_lightning.functional.knn import exact_neighbours

    g = torch.Generator().manual_seed(7)
    centres = torch.randn(4, 64, generator=g, dtype=torch.float64)
    x = (centres[torch.arange(200) % 4] + 1e-3 * torch.randn(200, 64, generator=g, dtype=torch.float64)).float()
    conditioned = pivot_free_float32(x, True, float(torch.finfo(torch.float32).eps))
    assert conditioned is not None
    c, rows64 = conditioned
    assert isinstance(rows64, ConditionedRows) and c.roundings == 2
    want = _float64_lists(x, 8)
    assert exact_neighbours(c, rows64, 8, 64, ordered=True).tolist() == want
    assert exact_neighbours(c, rows64, 8, 64, gram=torch.empty(200, 200), ordered=True).tolist() == want
    sets = exact_neighbours(c, rows64, 8, 64, ordered=False).tolist()
    assert [sorted(s) for s in sets] == [sorted(w) for w in want]
    # every entry point on these features: the float64 brute-force scores
    other = x[torch.randperm(200, generator=g)]
    want_other = _float64_lists(other, 8)
    mutual = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(want, want_other)])
    from prh_lightning import alignment_matrix
    from prh_lightning.functional import mutual_knn as mutual_knn_normalised

    assert float(mutual_knn_normalised(x, other, k=8)) == pytest.approx(mutual, abs=1e-7)  # a float32 result
    assert float(alignment_matrix([x], [other], metric="mutual_knn", k=8)[0, 0]) == pytest.approx(mutual, abs=1e-7)


def test_rounding_bound_covers_the_float32_route_scores():
    # normalised in float32 (two roundings per entry): the bound with Centred.roundings = 2 holds
    # against float64 scores of the float64 route's rows, formed here independently
    from prh_lightning.functional._numerics import pivot_free_float32
    from prh_lightning.functional.knn import rounding_bound

    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, 512, generator=g)
    c, _ = pivot_free_float32(x, True, float(torch.finfo(torch.float32).eps))
    base, rel = rounding_bound(c.xc, None, c.roundings)
    u = x.double().numpy()
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    fl = (c.xc @ c.xc.T).double()
    err = (fl - torch.from_numpy(u @ u.T)).abs()
    assert bool((err <= base[:, None] + rel * fl.abs()).all())
    assert float(err.max()) > 0
