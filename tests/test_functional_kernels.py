"""HSIC / CKA / CKNNA against re-derived formulas (numpy, centring matrix, U-statistics)."""

from __future__ import annotations

import functools

import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform

from prh_lightning.functional import center_gram, cka, cknna, hsic, median_distance, rbf_kernel, u_center, unbiased_cka
from prh_lightning import alignment_matrix


# These tests check each formula on the features as given; the default row normalisation
# (normalize=True in every entry point) is tested in test_numerics.py.
cka = functools.partial(cka, normalize=False)
cknna = functools.partial(cknna, normalize=False)
unbiased_cka = functools.partial(unbiased_cka, normalize=False)


def _rand(n, d, seed, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture
def pair():
    a = _rand(30, 6, 0)
    b = a @ _rand(6, 4, 1) + 0.7 * _rand(30, 4, 2)
    return a, b


def np_hsic_biased(K, L):
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H)


def np_hsic_unbiased(K, L):
    """Song et al. (2012), eq. (5), written out with numpy."""
    n = len(K)
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    one = np.ones(n)
    return (np.trace(Kt @ Lt) + one @ Kt @ one * (one @ Lt @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ Kt @ Lt @ one) / (n * (n - 3))


def test_biased_hsic_matches_centring_matrix(pair):
    a, b = pair
    K, L = a @ a.T, b @ b.T
    assert float(hsic(K, L)) == pytest.approx(np_hsic_biased(K.numpy(), L.numpy()), rel=1e-10)


def test_unbiased_hsic_matches_u_statistic_over_distinct_quadruples():
    # Brute force over all ordered distinct (i, j, q, r): E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq].
    a, b = _rand(7, 3, 4), _rand(7, 2, 5)
    K, L = (a @ a.T).numpy(), (b @ b.T).numpy()
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(7), 4):
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
        count += 1
    assert float(hsic(torch.tensor(K), torch.tensor(L), unbiased=True)) == pytest.approx(total / count, rel=1e-10)


def test_unbiased_hsic_matches_song_formula_for_asymmetric_kernels(pair):
    a, b = pair
    K, L = (a @ a.T).numpy(), (b @ b.T).numpy()
    mask = np.random.default_rng(0).random(K.shape) < 0.3  # CKNNA-style asymmetric masking
    got = float(hsic(torch.tensor(K * mask), torch.tensor(L * mask), unbiased=True))
    assert got == pytest.approx(np_hsic_unbiased(K * mask, L * mask), rel=1e-10)


def test_centring_helpers_reproduce_hsic(pair):
    a, b = pair
    K, L = a @ a.T, b @ b.T
    n = K.shape[0]
    assert float((center_gram(K) * center_gram(L)).sum()) == pytest.approx(np_hsic_biased(K.numpy(), L.numpy()), rel=1e-10)
    u = float((u_center(K) * u_center(L)).sum()) / (n * (n - 3))
    assert u == pytest.approx(np_hsic_unbiased(K.numpy(), L.numpy()), rel=1e-10)


def test_linear_cka_matches_feature_space_formula(pair):
    # Kornblith et al. (2019): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features.
    a, b = pair
    x, y = a.numpy() - a.numpy().mean(0), b.numpy() - b.numpy().mean(0)
    expected = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert float(cka(a, b)) == pytest.approx(expected, rel=1e-10)


def test_unbiased_cka_matches_numpy(pair):
    a, b = pair
    K, L = (a @ a.T).numpy(), (b @ b.T).numpy()
    expected = np_hsic_unbiased(K, L) / np.sqrt(np_hsic_unbiased(K, K) * np_hsic_unbiased(L, L))
    assert float(unbiased_cka(a, b)) == pytest.approx(expected, rel=1e-10)
    assert float(cka(a, b, unbiased=True)) == float(unbiased_cka(a, b))


def test_eps_reproduces_platonic_rep_denominator(pair):
    a, b = pair
    K, L = (a @ a.T).numpy(), (b @ b.T).numpy()
    expected = np_hsic_biased(K, L) / (np.sqrt(np_hsic_biased(K, K) * np_hsic_biased(L, L)) + 1e-6)
    assert float(cka(a, b, eps=1e-6)) == pytest.approx(expected, rel=1e-12)


def test_rbf_kernel_and_median_heuristic_match_scipy(pair):
    a, _ = pair
    dist = pdist(a.numpy())
    assert float(median_distance(a)) == pytest.approx(np.median(dist), rel=1e-10)
    expected = np.exp(-squareform(dist) ** 2 / (2 * np.median(dist) ** 2))
    np.testing.assert_allclose(rbf_kernel(a).numpy(), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rbf_kernel(a, sigma=0.5).numpy(), np.exp(-squareform(dist) ** 2 / 0.5), rtol=1e-9, atol=1e-12)


def test_rbf_cka_matches_numpy(pair):
    a, b = pair

    def kern(x, s):
        return np.exp(-squareform(pdist(x)) ** 2 / (2 * s**2))

    K, L = kern(a.numpy(), 2.0), kern(b.numpy(), 2.0)
    expected = np_hsic_biased(K, L) / np.sqrt(np_hsic_biased(K, K) * np_hsic_biased(L, L))
    assert float(cka(a, b, kernel="rbf", sigma=2.0)) == pytest.approx(expected, rel=1e-9)


def test_rbf_cka_of_float32_features_gives_the_float64_answer_when_distances_concentrate():
    # in 256 dimensions the pairwise distances concentrate, so the RBF kernel at the median
    # bandwidth varies little around its mean and centring cancels most of its digits (float32
    # kernel blocks left CKA 3.5e-5 off at n = 4,000, 1e-5 at n = 1,500)
    g = torch.Generator().manual_seed(0)
    n, d = 1500, 256
    signal = torch.randn(n, 16, generator=g)
    a = signal @ torch.randn(16, d, generator=g) + torch.randn(n, d, generator=g)
    b = torch.tanh(signal @ torch.randn(16, d, generator=g)) + torch.randn(n, d, generator=g)
    x, y = a.double().numpy(), b.double().numpy()  # the float32 values, exactly, in float64
    dx, dy = pdist(x), pdist(y)
    K = np.exp(-squareform(dx) ** 2 / (2 * np.median(dx) ** 2))
    L = np.exp(-squareform(dy) ** 2 / (2 * np.median(dy) ** 2))
    expected = np_hsic_biased(K, L) / np.sqrt(np_hsic_biased(K, K) * np_hsic_biased(L, L))
    assert float(cka(a, b, kernel="rbf")) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("offset", [0.0, 0.4, 3.0, 3.8, 4.2, 6.0])
def test_linear_cka_of_normalised_float32_rows_gives_the_float64_answer(unbiased, offset):
    # Normalised, well-spread float32 rows are centred in float32 (mean squared norm of the centred
    # rows >= 1/16); rows dominated by a common direction go the float64 route. The offsets
    # straddle that switch (||mean||^2 about 0.01, 0.3, 0.7, 0.87 and 0.99 of the row length).
    g = torch.Generator().manual_seed(3)
    n, d = 400, 64
    a = torch.randn(n, d, generator=g) + offset
    b = torch.tanh(a @ torch.randn(d, d, generator=g) / 8) + 0.5 * torch.randn(n, d, generator=g) + offset
    x, y = (v.double().numpy() for v in (a, b))  # the float32 values, exactly, in float64
    x, y = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (x, y))
    K, L = x @ x.T, y @ y.T
    est = np_hsic_unbiased if unbiased else (lambda P, Q: np_hsic_biased(P, Q))
    expected = est(K, L) / np.sqrt(est(K, K) * est(L, L))
    got = cka_normalised(a, b, unbiased=unbiased)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (3.0, 1.0), (3.8, 1.0), (4.2, 1.0), (6.0, 1.0),
                                          (0.5, 2.0**35), (0.5, 1e-9), (0.5, 1e20), (0.5, 1e-20)])
def test_linear_cka_of_raw_float32_rows_gives_the_float64_answer(unbiased, offset, scale):
    # normalize=False: well-spread float32 rows of moderate magnitude are centred in float32
    # (centred mean square >= 1/16 of the raw one: offsets up to about 3.87 std here); large
    # offsets and magnitudes outside 2^-40 .. 2^40 go the float64 route.
    from prh_lightning.functional import cka as plain_cka

    g = torch.Generator().manual_seed(4)
    n, d = 400, 64
    a = (torch.randn(n, d, generator=g) + offset) * scale
    b = (torch.tanh(a / scale @ torch.randn(d, d, generator=g) / 8) + 0.5 * torch.randn(n, d, generator=g) + offset) * scale
    x, y = (v.double().numpy() / scale for v in (a, b))  # the float32 values in float64 (rescaled: 1e20^2 ...)
    x, y = (v - v.mean(axis=0) for v in (x, y))
    K, L = x @ x.T, y @ y.T
    est = np_hsic_unbiased if unbiased else (lambda P, Q: np_hsic_biased(P, Q))
    expected = est(K, L) / np.sqrt(est(K, K) * est(L, L))
    got = plain_cka(a, b, unbiased=unbiased, normalize=False)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=2e-6)
    # and the layer x layer entry point gives the same number
    assert float(alignment_matrix({"a": a}, {"b": b}, metric="unbiased_cka" if unbiased else "cka", normalize=False)) == pytest.approx(expected, rel=2e-6)


def cka_normalised(a, b, unbiased):
    from prh_lightning.functional import cka as plain_cka

    return plain_cka(a, b, unbiased=unbiased)  # normalize=True: the PRH protocol


@pytest.mark.parametrize("kw", [{}, {"unbiased": True}, {"kernel": "rbf"}])
def test_cka_properties(pair, kw):
    a, b = pair
    q, _ = torch.linalg.qr(_rand(6, 6, 9))
    assert float(cka(a, a, **kw)) == pytest.approx(1.0, abs=1e-12)
    assert float(cka(a @ q, b, **kw)) == pytest.approx(float(cka(a, b, **kw)), rel=1e-9)
    assert float(cka(a, b, **kw)) == pytest.approx(float(cka(b, a, **kw)), rel=1e-12)
    if kw.get("kernel") != "rbf" or "sigma" not in kw:  # median-heuristic RBF is scale free too
        assert float(cka(7.5 * a, b, **kw)) == pytest.approx(float(cka(a, b, **kw)), rel=1e-9)


def np_cknna(a, b, k, unbiased=True):
    """CKNNA re-derived: explicit top-k sets per row, masks, Song's HSIC."""
    K, L = a @ a.T, b @ b.T
    n = len(K)

    def top(P):
        m = np.zeros_like(P, dtype=bool)
        for i in range(n):
            cand = [j for j in range(n) if not (unbiased and j == i)]
            for j in sorted(cand, key=lambda j: (-P[i, j], j))[:k]:
                m[i, j] = True
        return m

    f = np_hsic_unbiased if unbiased else np_hsic_biased

    def sim(P, Q):
        m = top(P) & top(Q)
        return f(P * m, Q * m)

    return sim(K, L) / np.sqrt(sim(K, K) * sim(L, L))


@pytest.mark.parametrize("unbiased", [True, False])
def test_cknna_matches_brute_force(pair, unbiased):
    a, b = pair
    expected = np_cknna(a.numpy(), b.numpy(), 5, unbiased)
    assert float(cknna(a, b, k=5, unbiased=unbiased)) == pytest.approx(expected, rel=1e-9)


def test_cknna_identical_inputs_is_one(pair):
    a, _ = pair
    assert float(cknna(a, a, k=5)) == pytest.approx(1.0, abs=1e-12)


def test_kernel_bad_inputs():
    a = _rand(3, 2, 0)
    with pytest.raises(ValueError, match="at least 4 samples"):
        unbiased_cka(a, a)
    with pytest.raises(ValueError, match="at least 4 samples"):
        hsic(a @ a.T, a @ a.T, unbiased=True)
    const = torch.ones(10, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="constant features"):
        cka(const, _rand(10, 3, 1))
    with pytest.raises(ValueError, match="constant features"):
        unbiased_cka(_rand(10, 3, 1), const)
    with pytest.raises(ValueError, match="constant features"):
        cka(const, _rand(10, 3, 1), kernel="rbf")
    half = torch.cat([torch.zeros(8, 3, dtype=torch.float64), _rand(2, 3, 2)])  # most samples identical
    with pytest.raises(ValueError, match="median"):
        cka(half, _rand(10, 3, 1), kernel="rbf", normalize=False)
    with pytest.raises(ValueError, match="sigma"):
        cka(_rand(10, 3, 1), _rand(10, 3, 2), kernel="rbf", sigma=0.0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        cka(_rand(10, 3, 1), _rand(10, 3, 2), kernel="poly")
    with pytest.raises(ValueError, match="2 <= k"):
        cknna(_rand(10, 3, 1), _rand(10, 3, 2), k=1)
    with pytest.raises(ValueError, match="same samples"):
        cka(_rand(10, 3, 1), _rand(9, 3, 2))
    with pytest.raises(ValueError, match="square"):
        hsic(_rand(4, 3, 1), _rand(4, 3, 1))
    nan = _rand(10, 3, 1)
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cknna(nan, _rand(10, 3, 2), k=3)
