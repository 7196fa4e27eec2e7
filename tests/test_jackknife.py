"""functional.jackknife: the delete-a-group jackknife against closed forms and brute force."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from scipy import stats

import prh_lightning.functional.jackknife as jk
from prh_lightning.functional.jackknife import jackknife_ci, jackknife_groups, jackknife_interval, metric_range


def _first_column_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[:, 0].double().mean()


def test_delete_one_jackknife_of_the_mean_is_the_textbook_standard_error():
    """Jackknife se of a mean = s / sqrt(n) exactly (s: sample std, ddof 1)."""
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = jackknife_ci(x, x, metric=_first_column_mean, n_groups=30, confidence=0.9)
    v = x[:, 0].numpy()
    se = v.std(ddof=1) / np.sqrt(len(v))
    assert res.se == pytest.approx(se, rel=1e-10)
    half = stats.t.ppf(0.95, 29) * se
    assert (res.low, res.high) == pytest.approx((v.mean() - half, v.mean() + half), rel=1e-10)
    assert res.bounds == (-np.inf, np.inf)


def test_grouped_jackknife_of_the_mean_is_the_batch_means_standard_error():
    """With G equal groups: se^2 = var(group means, ddof 1) / G."""
    x = torch.randn(40, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = jackknife_ci(x, x, metric=_first_column_mean, n_groups=8, seed=3)
    groups = jackknife_groups(40, 8, seed=3)
    means = np.array([x[g, 0].mean().item() for g in groups])
    assert res.se == pytest.approx(np.sqrt(means.var(ddof=1) / 8), rel=1e-10)


def test_replicates_equal_the_metric_recomputed_without_each_group():
    from prh_lightning.functional import cka

    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(24, 5, generator=gen, dtype=torch.float64), torch.randn(24, 3, generator=gen, dtype=torch.float64)
    res = jackknife_ci(a, b, metric="cka", n_groups=6, seed=4, normalize=False)
    for group, value in zip(jackknife_groups(24, 6, seed=4), res.replicates):
        keep = np.setdiff1d(np.arange(24), group.numpy())
        x, y = a[keep].numpy(), b[keep].numpy()  # biased linear CKA, from its formula in numpy
        x, y = x - x.mean(0), y - y.mean(0)
        ref = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
        assert float(value) == pytest.approx(ref, rel=1e-8)
    assert res.estimate == pytest.approx(float(cka(a, b, normalize=False)))


def test_groups_partition_the_samples():
    groups = jackknife_groups(23, 5, seed=0)
    joined = torch.cat(groups).sort().values
    assert torch.equal(joined, torch.arange(23))
    assert sorted(len(g) for g in groups) == [4, 4, 5, 5, 5]


@pytest.mark.parametrize("metric, kw", [("cycle_knn", {"k": 3}), ("mutual_knn", {"k": 3}), ("cka", {})])
def test_intervals_never_leave_the_metric_range(metric, kw):
    """Nearly identical features score close to 1: the raw interval would pass 1, the clamped one stops there."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(30, 6, generator=gen)
    b = a + 0.05 * torch.randn(30, 6, generator=gen)
    res = jackknife_ci(a, b, metric=metric, n_groups=6, **kw)
    assert 0.0 <= res.low <= res.estimate <= res.high <= 1.0
    raw_low, raw_high, _ = jackknife_interval(res.estimate, res.replicates.numpy(), 0.95)
    assert res.high == pytest.approx(min(1.0, float(raw_high)))


def test_clamping_only_cuts_at_the_bounds():
    low, high, se = jackknife_interval(np.array([0.5, 0.95]), np.array([[0.4, 0.9], [0.5, 1.0], [0.6, 0.95]]),
                                       bounds=(0.0, 1.0))
    raw_low, raw_high, _ = jackknife_interval(np.array([0.5, 0.95]), np.array([[0.4, 0.9], [0.5, 1.0], [0.6, 0.95]]))
    assert low.tolist() == pytest.approx(raw_low.tolist())
    assert high[1] == 1.0 and raw_high[1] > 1.0 and high[0] == pytest.approx(raw_high[0])


def test_metric_ranges():
    assert metric_range("rsa") == (-1.0, 1.0) and metric_range("unbiased_cka") == (-1.0, 1.0)
    assert metric_range("lcs_knn", k=7) == (0.0, 7.0)
    assert metric_range("cknna") == (-np.inf, np.inf)


@pytest.mark.parametrize("bad", [1, 31, 2.5, True])
def test_bad_group_counts_are_refused(bad):
    x = torch.randn(30, 2)
    with pytest.raises(ValueError, match="n_groups"):
        jackknife_ci(x, x, n_groups=bad, k=2)


def test_doctests():
    assert doctest.testmod(jk).failed == 0
