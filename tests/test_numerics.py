"""Numbers that survive real features: every metric against float64 references written here
(numpy / scipy, no library code), under common offsets, extreme scales, low variance, half
precision and mixed dtypes; constant and all-zero features refused by every metric; one number
from every entry point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform
from scipy.stats import spearmanr
from test_functional_knn import lcs_dp, levenshtein_dp

from prh_lightning import alignment_matrix
from prh_lightning.functional import METRICS
from prh_lightning.metrics import CKA, CKNNA, LCSKNN, RSA, SVCCA, AlignmentMatrix, CycleKNN, EditDistanceKNN, MutualKNN, UnbiasedCKA

K = 5

# -- float64 references (independent of the library) -----------------------------------------


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _neighbours(x, k, exclude_self=True):
    sim = x @ x.T
    n = len(x)
    order = []
    for i in range(n):
        cand = [j for j in range(n) if j != i or not exclude_self]
        order.append(sorted(cand, key=lambda j: (-sim[i, j], j))[:k])
    return order


def _hsic(K_, L_, unbiased):
    n = len(K_)
    if not unbiased:
        H = np.eye(n) - 1.0 / n
        return np.trace(K_ @ H @ L_ @ H)
    Kt, Lt = K_.copy(), L_.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    return (np.trace(Kt @ Lt) + Kt.sum() * Lt.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (Kt.sum(0) @ Lt.sum(1))) / (n * (n - 3))


def _cka(K_, L_, unbiased=False):
    return _hsic(K_, L_, unbiased) / np.sqrt(_hsic(K_, K_, unbiased) * _hsic(L_, L_, unbiased))


def _rbf(x):
    d = squareform(pdist(x))
    sigma = np.median(pdist(x))
    return np.exp(-(d**2) / (2 * sigma**2))


def _cknna(a, b, k):
    Ka, Kb = a @ a.T, b @ b.T

    def mask(K_):
        m = np.zeros_like(K_, dtype=bool)
        for i, row in enumerate(_neighbours_from_sim(K_, k)):
            m[i, row] = True
        return m

    def sim(P, Q):
        M = mask(P) & mask(Q)
        return _hsic(P * M, Q * M, True)

    return sim(Ka, Kb) / np.sqrt(sim(Ka, Ka) * sim(Kb, Kb))


def _neighbours_from_sim(sim, k):
    n = len(sim)
    return [sorted((j for j in range(n) if j != i), key=lambda j: (-sim[i, j], j))[:k] for i in range(n)]


def _svcca(a, b, dim=4):
    def basis(x):
        z = x - x.mean(0)
        z = z / z.std(0, ddof=1)
        return np.linalg.svd(z, full_matrices=False)[0][:, :dim]

    qa, qb = np.linalg.qr(basis(a))[0], np.linalg.qr(basis(b))[0]
    return np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0, 1).mean()


def reference(metric, a, b, normalize=True):
    """Float64 reference of ``metric`` on the features exactly as given (float32 values cast)."""
    a, b = a.double().numpy(), b.double().numpy()
    if normalize:
        a, b = _unit(a), _unit(b)
    if metric in ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"):
        na, nb = _neighbours(a, K), _neighbours(b, K)
        n = len(a)
        if metric == "mutual_knn":
            return np.mean([len(set(x) & set(y)) / K for x, y in zip(na, nb)])
        if metric == "cycle_knn":
            return np.mean([any(i in na[j] for j in nb[i]) for i in range(n)])
        if metric == "lcs_knn":
            return np.mean([lcs_dp(x, y) for x, y in zip(na, nb)])
        return 1 - np.mean([levenshtein_dp(x, y) for x, y in zip(na, nb)]) / K
    # H K H = (Hx)(Hx)^T, and U-centring ignores additive row / column terms, so both CKAs are
    # computed from column-centred features (an uncentred float64 Gram loses digits at offset 1e4).
    ac, bc = a - a.mean(0), b - b.mean(0)
    if metric == "cka":
        return _cka(ac @ ac.T, bc @ bc.T)
    if metric == "unbiased_cka":
        return _cka(ac @ ac.T, bc @ bc.T, unbiased=True)
    if metric == "rbf_cka":
        return _cka(_rbf(a), _rbf(b))
    if metric == "cknna":
        return _cknna(a, b, K)
    if metric == "svcca":
        return _svcca(a, b)
    if metric == "rsa":
        ra = lambda x: pdist(x, "correlation")  # noqa: E731
        return spearmanr(ra(a), ra(b)).statistic
    raise AssertionError(metric)


OPTIONS = {
    "mutual_knn": ("mutual_knn", {"k": K}),
    "cycle_knn": ("cycle_knn", {"k": K}),
    "lcs_knn": ("lcs_knn", {"k": K}),
    "edit_distance_knn": ("edit_distance_knn", {"k": K}),
    "cka": ("cka", {}),
    "unbiased_cka": ("unbiased_cka", {}),
    "rbf_cka": ("cka", {"kernel": "rbf"}),
    "cknna": ("cknna", {"k": K}),
    "svcca": ("svcca", {"dim": 4}),
    "rsa": ("rsa", {}),
}


def ours(case, a, b, **kw):
    name, opts = OPTIONS[case]
    return float(METRICS[name](a, b, **opts, **kw))


def _pair(n=120, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = a[:, :8] @ torch.randn(8, 10, generator=g, dtype=torch.float64) + 0.7 * torch.randn(n, 10, generator=g, dtype=torch.float64)
    return a, b


# -- offsets, scales, low variance -----------------------------------------------------------------


@pytest.mark.parametrize("case", list(OPTIONS))
@pytest.mark.parametrize("offset", [0.0, 10.0, 1e2, 1e4])  # 0: the float32 routes without a float64 copy
def test_float32_with_a_common_offset_gives_the_float64_value(case, offset):
    a, b = _pair()
    a32, b32 = (a + offset).float(), (b - offset).float()
    for normalize in (False, True):
        want = reference(case, a32, b32, normalize)
        assert ours(case, a32, b32, normalize=normalize) == pytest.approx(want, rel=1e-5, abs=1e-6), normalize


@pytest.mark.parametrize("case", list(OPTIONS))
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_every_metric_is_unchanged_by_extreme_scales(case, scale):
    a, b = _pair(seed=1)
    a32, b32 = a.float(), b.float()
    for normalize in (False, True):
        want = reference(case, a32, b32, normalize)
        assert ours(case, a32 * scale, b32, normalize=normalize) == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("case", list(OPTIONS))
@pytest.mark.parametrize("ratio", [4e-3, 1e-4])
def test_low_variance_around_a_large_mean_is_not_refused(case, ratio):
    # std / |mean| = ratio, as a post-ReLU fully connected layer late in training
    a, b = _pair(seed=2)
    a32 = (5.0 + ratio * 5.0 * a).float()
    want = reference(case, a32, b.float(), normalize=False)
    assert ours(case, a32, b.float(), normalize=False) == pytest.approx(want, rel=1e-5, abs=1e-6)


# -- degenerate inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(OPTIONS))
def test_constant_and_all_zero_features_are_refused_by_every_metric(case):
    a, b = _pair(n=40)
    const = torch.full((40, 12), 3.0)
    zero = torch.zeros(40, 12)
    for normalize in (False, True):
        # RSA's correlation distance centres each row first: a constant row has no correlation
        with pytest.raises(ValueError, match="constant|zero-norm centred row"):
            ours(case, const, b.float(), normalize=normalize)
    with pytest.raises(ValueError, match="all-zero"):
        ours(case, zero, b.float(), normalize=True)
    with pytest.raises(ValueError, match="constant|zero-norm centred row"):
        ours(case, b.float(), zero, normalize=False)
    with pytest.raises(ValueError, match="constant|zero-norm centred row"):
        alignment_matrix([a.float(), const], [b.float()], metric=OPTIONS[case][0], **OPTIONS[case][1])


# -- dtypes and autograd ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(OPTIONS))
def test_half_precision_computes_in_float32_and_mixed_dtypes_promote(case):
    a, b = _pair(seed=3)
    name, opts = OPTIONS[case]
    for half in (torch.float16, torch.bfloat16):
        ah = a.to(half)
        got = METRICS[name](ah, b.float(), **opts)
        assert got.dtype == torch.float32
        assert float(got) == float(METRICS[name](ah.float(), b.float(), **opts))
    mixed = METRICS[name](a.float(), b, **opts)
    assert mixed.dtype == torch.float64
    assert float(mixed) == pytest.approx(float(METRICS[name](a.float().double(), b, **opts)), rel=1e-12)


def test_requires_grad_inputs_are_detached_everywhere():
    a, b = _pair(n=60)
    a = a.float().requires_grad_()
    for name, opts in OPTIONS.values():
        out = METRICS[name](a, b.float(), **opts)
        assert out.grad_fn is None and not out.requires_grad
    m = alignment_matrix([a], [b.float()], metric="cka")
    assert m.grad_fn is None


# -- one number from every entry point -------------------------------------------------------------

CLASSES = {
    "mutual_knn": lambda: MutualKNN(k=K),
    "cycle_knn": lambda: CycleKNN(k=K),
    "lcs_knn": lambda: LCSKNN(k=K),
    "edit_distance_knn": lambda: EditDistanceKNN(k=K),
    "cka": lambda: CKA(),
    "unbiased_cka": lambda: UnbiasedCKA(),
    "rbf_cka": lambda: CKA(kernel="rbf"),
    "cknna": lambda: CKNNA(k=K),
    "svcca": lambda: SVCCA(dim=4),
    "rsa": lambda: RSA(),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_the_same_data_gives_one_number_from_every_entry_point(case):
    a, b = (t.float() for t in _pair(seed=4))
    name, opts = OPTIONS[case]
    functional = float(METRICS[name](a, b, **opts))
    matrix = float(alignment_matrix([a], [b], metric=name, **opts)[0, 0])
    acc = AlignmentMatrix(metric=name, **opts)
    acc.update({"a": a[:50]}, {"b": b[:50]})
    acc.update({"a": a[50:]}, {"b": b[50:]})
    accumulated = float(acc.compute()[0, 0])
    metric = CLASSES[case]()
    metric.update(a[:70], b[:70])
    metric.update(a[70:], b[70:])
    cls = float(metric.compute())
    assert matrix == functional and accumulated == functional
    assert cls == pytest.approx(functional, rel=1e-6, abs=1e-7)  # streaming CKA sums moments instead
    assert functional == pytest.approx(reference(case, a, b), rel=1e-5, abs=1e-6)


def test_streaming_cka_is_exact_under_large_offsets():
    # float64 moments lose (offset / std)^2 * eps64 to cancellation: 1e-5 at 1e4, not refused at 1e5
    a, b = _pair(n=200, seed=5)
    for offset, rel in ((1e4, 1e-5), (1e5, 1e-4)):
        a32, b32 = (a + offset).float(), (b + offset).float()
        metric = CKA(normalize=False)
        metric.update(a32[:90], b32[:90])
        metric.update(a32[90:], b32[90:])
        assert float(metric.compute()) == pytest.approx(reference("cka", a32, b32, False), rel=rel)


@pytest.mark.parametrize("case", list(OPTIONS))
def test_alignment_matrix_cells_equal_independent_references(case):
    a, b = _pair(n=90, seed=6)
    c, d = _pair(n=90, seed=7)
    xs, ys = [a.float(), (c + 50).float()], [b.float(), 1e-3 * d.float()]
    name, opts = OPTIONS[case]
    got = alignment_matrix(xs, ys, metric=name, **opts)
    want = np.array([[reference(case, x, y) for y in ys] for x in xs])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_neighbour_sets_cut_through_identical_rows_are_refused():
    # 120 probe samples against 6 distinct "class name" embeddings, 20 copies each: which copies
    # are a sample's 5 neighbours is decided by row order alone.
    g = torch.Generator().manual_seed(8)
    names = torch.randn(6, 8, generator=g)
    labels = torch.arange(120) % 6
    probe = names[labels] + 0.3 * torch.randn(120, 8, generator=g)
    for metric in ("mutual_knn", "cycle_knn", "cknna"):
        with pytest.raises(ValueError, match="identical copies"):
            METRICS[metric](probe, names[labels], k=5)
    # one duplicated sample among 400 (two identical captions) is tolerated with a warning
    x = torch.randn(400, 8, generator=g)
    dup = torch.cat([x[:399], x[:1]])
    with pytest.warns(UserWarning, match="identical copies"):
        mutual = METRICS["mutual_knn"](dup, dup.flip(1), k=5)
    assert float(mutual) == 1.0
    assert float(METRICS["cka"](probe, names[labels])) > 0  # no neighbour lists, no ambiguity


def test_float32_neighbour_lists_equal_float64_ones_on_wide_features():
    # d = 512: many near-ties among the top-k of 400 rows; the float32 ranking plus float64
    # re-ranking of close calls must give exactly the float64 neighbour lists.
    g = torch.Generator().manual_seed(12)
    a = torch.randn(400, 512, generator=g)
    b = a[:, :256] + torch.randn(400, 256, generator=g)
    for case in ("mutual_knn", "lcs_knn"):
        assert ours(case, a, b) == pytest.approx(reference(case, a, b), rel=1e-7)  # float32 result
