"""Honest intervals: on independent features, nominal 90 % intervals cover the population value
(the metric's expectation at that n, estimated in the test by Monte Carlo over many independent
draws, or its closed form where one exists) in at least 80 % of 50 seeds, for every metric:
the bootstrap where resampling is honest, the delete-a-group jackknife elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prh_lightning.functional import METRICS, bootstrap_ci, jackknife_ci

N, D, SEEDS = 48, 6, 50

CASES = {
    "mutual_knn": ("bootstrap", {"k": 4}),
    "cycle_knn": ("bootstrap", {"k": 4}),
    "lcs_knn": ("bootstrap", {"k": 4}),
    "edit_distance_knn": ("bootstrap", {"k": 4}),
    "svcca": ("bootstrap", {"dim": 2}),
    "cka": ("jackknife", {}),
    "unbiased_cka": ("jackknife", {}),
    "cknna": ("jackknife", {"k": 4}),
    "rsa": ("jackknife", {}),
}


def _independent(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)


def _population(metric, kw):
    if metric == "mutual_knn":
        return kw["k"] / (N - 1)  # closed form: chance overlap of two random k-sets
    if metric in ("unbiased_cka", "rsa"):
        return 0.0  # unbiased estimator / rank correlation of independent RDMs
    draws = [float(METRICS[metric](*_independent(10_000 + s), **kw)) for s in range(300)]
    return float(np.mean(draws))


@pytest.mark.parametrize("metric", list(CASES))
def test_nominal_90_percent_intervals_cover_the_population_value(metric):
    method, kw = CASES[metric]
    truth = _population(metric, kw)
    covered = 0
    for seed in range(SEEDS):
        a, b = _independent(seed)
        if method == "bootstrap":
            low, high = bootstrap_ci(a, b, metric, n_resamples=60, confidence=0.9, seed=seed, **kw)
        else:
            r = jackknife_ci(a, b, metric, n_groups=12, confidence=0.9, seed=seed, **kw)
            low, high = r.low, r.high
        covered += low <= truth <= high
    assert covered >= 0.8 * SEEDS, f"{metric}: {covered}/{SEEDS} intervals cover {truth:.4f}"
