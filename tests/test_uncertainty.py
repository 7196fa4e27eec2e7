"""Permutation null and bootstrap CI: fast paths against explicit loops, calibration, errors."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import kendalltau, pearsonr, spearmanr

from prh_lightning.functional import METRICS, bootstrap_ci, knn_indices, mutual_knn, permutation_test
from prh_lightning.functional.utils import mutual_knn_from_indices


# These tests check each formula on the features as given; the default row normalisation
# (normalize=True in every entry point) is tested in test_numerics.py.
mutual_knn = functools.partial(mutual_knn, normalize=False)


def _pair(n=120, noise=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 8, generator=g, dtype=torch.float64)
    return a, a + noise * torch.randn(n, 8, generator=g, dtype=torch.float64)


def _same_perms(n, count, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g) for _ in range(count)]


@pytest.mark.parametrize(
    ("metric", "kw"),
    [("mutual_knn", {"k": 5}), ("cycle_knn", {"k": 3}), ("lcs_knn", {"k": 4}), ("edit_distance_knn", {"k": 4}),
     ("cka", {}), ("cka", {"kernel": "rbf"}), ("unbiased_cka", {}), ("rsa", {"compare": "pearson"})],
)
def test_null_equals_rescoring_shuffled_pairs(metric, kw):
    a, b = _pair()
    result = permutation_test(a, b, metric, n_permutations=12, seed=3, **kw)
    explicit = [float(METRICS[metric](a, b[p], **kw)) for p in _same_perms(a.shape[0], 12, 3)]
    np.testing.assert_allclose(result.null.numpy(), explicit, rtol=1e-9, atol=1e-12)
    assert result.score == pytest.approx(float(METRICS[metric](a, b, **kw)))


def _brute_force_mantel(a, b, perms, distance, compare):
    """Score and null of RSA recomputed from scratch per permutation: scipy pdist + correlation."""
    corr = {"spearman": spearmanr, "pearson": pearsonr, "kendall": kendalltau}[compare]
    x, y = a.double().numpy(), b.double().numpy()
    da = pdist(x, distance)
    score = corr(da, pdist(y, distance)).statistic
    null = np.array([corr(da, pdist(y[p.numpy()], distance)).statistic for p in perms])
    return score, null


@pytest.mark.parametrize("compare", ["spearman", "pearson", "kendall"])
@pytest.mark.parametrize("distance", ["correlation", "cosine", "euclidean"])
def test_rsa_null_equals_a_brute_force_mantel_test(distance, compare):
    # Weakly related features, so the p-value lands well inside (1/201, 1) and the test has teeth.
    g = torch.Generator().manual_seed(4)
    a = torch.randn(14, 6, generator=g, dtype=torch.float64)
    b = 0.35 * a + torch.randn(14, 6, generator=g, dtype=torch.float64)
    r = permutation_test(a, b, "rsa", n_permutations=200, seed=9, distance=distance, compare=compare, normalize=False)
    score, null = _brute_force_mantel(a, b, _same_perms(14, 200, 9), distance, compare)
    assert r.score == pytest.approx(score, abs=1e-12)
    np.testing.assert_allclose(r.null.numpy(), null, rtol=0, atol=1e-12)
    assert r.p_value == (1 + np.sum(null >= score)) / 201
    assert 0.02 < r.p_value < 0.9
    assert r.z_score == pytest.approx((score - null.mean()) / null.std(ddof=1), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("compare", ["spearman", "pearson"])
def test_fast_rsa_p_value_equals_the_recomputing_loop_with_ties(compare, dtype):
    # n = 5 (120 orderings): 400 draws repeat the identity and tie with the score often, and
    # samples 3, 4 of b are identical, so swapping them leaves b's RDM unchanged. A callable
    # metric takes the library's slow path (recompute per permutation) with the same draws.
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 4, generator=g, dtype=dtype)
    b = a + torch.randn(5, 4, generator=g, dtype=dtype)
    b[4] = b[3]
    kw = {"distance": "euclidean", "compare": compare}
    fast = permutation_test(a, b, "rsa", n_permutations=400, seed=1, **kw)
    slow = permutation_test(a, b, lambda x, y: METRICS["rsa"](x, y, **kw), n_permutations=400, seed=1)
    assert fast.score == slow.score
    assert fast.p_value == slow.p_value
    ties = int((slow.null == slow.score).sum())
    unchanged = sum(p.tolist() in ([0, 1, 2, 3, 4], [0, 1, 2, 4, 3]) for p in _same_perms(5, 400, 1))
    assert unchanged >= 3 and ties >= unchanged  # Spearman also ties on other orderings
    assert int((fast.null == fast.score).sum()) == ties
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(fast.null, slow.null, rtol=0, atol=8 * eps)
    if compare == "spearman":  # ranks are small integers: every null value is bitwise equal
        assert torch.equal(fast.null, slow.null)


def test_fast_rsa_null_spans_several_chunks():
    # 200 samples: 19,900 pairs, so 1,000 permutations are gathered in several chunks.
    g = torch.Generator().manual_seed(5)
    a = torch.randn(200, 3, generator=g, dtype=torch.float64)
    b = a + 4 * torch.randn(200, 3, generator=g, dtype=torch.float64)
    r = permutation_test(a, b, "rsa", n_permutations=1000, seed=2, distance="euclidean", compare="spearman", normalize=False)
    assert r.null.shape == (1000,) and r.null.dtype == torch.float64
    perms = _same_perms(200, 1000, 2)
    for i in (0, 209, 210, 999):  # chunks of 2**22 // 19,900 = 210 permutations
        ref = spearmanr(pdist(a.numpy()), pdist(b[perms[i]].numpy())).statistic
        assert float(r.null[i]) == pytest.approx(ref, abs=1e-12)


def test_p_value_and_z_score_formulas():
    a, b = _pair()
    r = permutation_test(a, b, "mutual_knn", n_permutations=200, k=5)
    null = r.null.numpy()
    assert r.p_value == (1 + np.sum(null >= r.score)) / 201
    assert r.z_score == pytest.approx((r.score - null.mean()) / null.std(ddof=1))
    # strongly aligned: nothing in the null reaches the score
    assert r.p_value == pytest.approx(1 / 201)
    # the null of mutual k-NN sits at chance, k / (n - 1)
    assert null.mean() == pytest.approx(5 / 119, abs=0.006)


def test_null_is_calibrated_for_unrelated_features():
    # Under independence p-values are roughly uniform: few below 0.1 over several datasets.
    pvals = []
    for seed in range(10):
        g = torch.Generator().manual_seed(100 + seed)
        a, b = torch.randn(60, 4, generator=g), torch.randn(60, 4, generator=g)
        pvals.append(permutation_test(a, b, "mutual_knn", n_permutations=99, seed=seed, k=5).p_value)
    assert np.mean(pvals) == pytest.approx(0.5, abs=0.2)
    assert sum(p < 0.05 for p in pvals) <= 2


def test_callable_metric_is_accepted():
    a, b = _pair(n=40)

    def neg_cka(x, y):
        return -METRICS["cka"](x, y)

    r = permutation_test(a, b, neg_cka, n_permutations=20)
    assert r.score < 0 and r.p_value > 0.5  # the observed pairing is the *least* negative-aligned


def test_bootstrap_ci_brackets_the_score_and_shrinks_with_n():
    small, large = _pair(n=50, seed=1), _pair(n=200, seed=1)
    lo_s, hi_s = bootstrap_ci(*small, metric="svcca", n_resamples=60, dim=3)
    lo_l, hi_l = bootstrap_ci(*large, metric="svcca", n_resamples=60, dim=3)
    assert hi_l - lo_l < hi_s - lo_s


def test_bootstrap_matches_explicit_percentiles():
    a, b = _pair(n=50)
    g = torch.Generator().manual_seed(7)
    draws = [torch.randint(50, (50,), generator=g) for _ in range(40)]
    scores = [float(METRICS["svcca"](a[i], b[i], dim=3)) for i in draws]
    low, high = bootstrap_ci(a, b, "svcca", n_resamples=40, confidence=0.9, seed=7, dim=3)
    assert (low, high) == pytest.approx((np.quantile(scores, 0.05), np.quantile(scores, 0.95)), rel=1e-6)


@pytest.mark.parametrize("metric", ["cka", "unbiased_cka", "cknna", "rsa"])
def test_bootstrap_refuses_metrics_without_an_honest_resample(metric):
    a, b = _pair(n=40)
    with pytest.raises(ValueError, match="jackknife_ci"):
        bootstrap_ci(a, b, metric, n_resamples=10)


def test_bootstrap_knn_does_not_count_copies_as_neighbours():
    # Unrelated features: mutual k-NN is at chance. A naive bootstrap would make copies of a sample
    # mutual nearest neighbours in both spaces and push the interval far above chance.
    g = torch.Generator().manual_seed(11)
    n, k = 150, 5
    a, b = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
    low, high = bootstrap_ci(a, b, "mutual_knn", n_resamples=60, k=k)
    assert low <= k / (n - 1) <= high
    idx = torch.randint(n, (n,), generator=g)
    # the metric itself refuses resampled copies without groups; the naive protocol by hand:
    naive = float(mutual_knn_from_indices(knn_indices(a[idx], k), knn_indices(b[idx], k)))
    assert naive > high  # what the duplicate handling avoids
    # and the neighbour lists used really exclude copies
    lists = knn_indices(a[idx], k, groups=idx)
    assert not bool((idx[lists] == idx[:, None]).any())


def test_bad_input():
    a, b = _pair(n=30)
    with pytest.raises(ValueError, match="n_permutations"):
        permutation_test(a, b, n_permutations=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(a, b, confidence=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci(a, b, n_resamples=1)
    with pytest.raises(ValueError, match="unknown metric"):
        permutation_test(a, b, "cosine")
    with pytest.raises(ValueError, match="same samples"):
        bootstrap_ci(a, b[:-1])


# -- permutation_test(max_memory=...) ------------------------------------------------------------


def _budgets_seen(monkeypatch):
    """The budget of every LayerContext built while the test runs."""
    from prh_lightning.functional import _plan

    seen = []

    class Recording(_plan.LayerContext):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.budget)

    monkeypatch.setattr(_plan, "LayerContext", Recording)
    return seen


def test_permutation_test_max_memory_groups_or_streams_the_cka_null_with_the_same_numbers(monkeypatch):
    # the smallest budget that still builds the null's tables, and one byte less (streamed, no
    # table), give the null and p-value of the unbounded call and of numpy float64 CKA of b's
    # permuted rows; the CKA null sees the budget on both prepared layers
    from test_calibration import _np_cka, _smallest_grouped_budget

    from prh_lightning.functional import kernels

    n = 45
    a, b = _pair(n=n, noise=2.0, seed=7)
    smallest = _smallest_grouped_budget(n, 1, 1, 8)
    budgets, tables = [], []
    null_fn, inner = kernels._cka_null, kernels._permuted_inner
    monkeypatch.setattr(kernels, "_cka_null", lambda xs, ys, perms, **o: budgets.append({s.budget for s in xs + ys}) or null_fn(xs, ys, perms, **o))
    monkeypatch.setattr(kernels, "_permuted_inner", lambda tri, diag, table, *r: tables.append(table.shape[1]) or inner(tri, diag, table, *r))
    whole = permutation_test(a, b, "cka", n_permutations=15, seed=2)
    grouped = permutation_test(a, b, "cka", n_permutations=15, seed=2, max_memory=smallest)
    streamed = permutation_test(a, b, "cka", n_permutations=15, seed=2, max_memory=smallest - 1)
    assert budgets == [{None}, {smallest}, {smallest - 1}]
    assert tables == [1, 1]  # the streamed call built none
    score = _np_cka(a.numpy(), b.numpy(), False)  # rows L2-normalised, as permutation_test's default
    null = np.array([_np_cka(a.numpy(), b[p].numpy(), False) for p in _same_perms(n, 15, 2)])
    assert np.ptp(null) > 0.01
    for result in (whole, grouped, streamed):
        assert result.score == pytest.approx(score, rel=1e-9)
        np.testing.assert_allclose(result.null.numpy(), null, rtol=1e-9, atol=1e-12)
        assert result.p_value == (1 + int((null >= score).sum())) / 16


@pytest.mark.parametrize(("metric", "kw"), [("mutual_knn", {"k": 5}), ("cknna", {"k": 5})])
def test_permutation_test_max_memory_reaches_the_preparation_of_knn_metrics(metric, kw, monkeypatch):
    # a few kilobytes stream the neighbour search in blocks of a few rows; the null is unchanged
    a, b = _pair(n=120, seed=1)
    seen = _budgets_seen(monkeypatch)
    whole = permutation_test(a, b, metric, n_permutations=20, seed=1, **kw)
    small = permutation_test(a, b, metric, n_permutations=20, seed=1, max_memory="8KB", **kw)
    assert seen == [None, 8000]
    np.testing.assert_allclose(small.null.numpy(), whole.null.numpy(), rtol=1e-12, atol=1e-15)
    assert (small.score, small.p_value) == pytest.approx((whole.score, whole.p_value), rel=1e-12)


def test_permutation_test_refuses_max_memory_for_a_callable_or_a_bad_budget():
    a, b = _pair(n=30)
    with pytest.raises(ValueError, match="max_memory"):
        permutation_test(a, b, lambda x, y: METRICS["cka"](x, y), n_permutations=3, max_memory="1GB")
    with pytest.raises(ValueError, match="max_memory"):
        permutation_test(a, b, "cka", n_permutations=3, max_memory="1 parsec")
