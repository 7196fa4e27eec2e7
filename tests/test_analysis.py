"""analysis: best-layer-pair matrix, class-centroid RSA and run-to-run dynamics against brute
force written here (numpy / scipy), and their doctests."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import pearsonr, spearmanr

import prh_lightning.analysis.centroids as crsa_module
import prh_lightning.analysis.dynamics as dyn_module
import prh_lightning.analysis.model_matrix as mm_module
from prh_lightning.analysis import (
    best_layer_pair_matrix,
    between_runs,
    centroid_rsa,
    class_centroids,
    drift,
    step_difference_interval,
    stratified_bootstrap,
)


def _np_mutual_knn(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mutual k-NN on cosine similarity, from scratch."""
    def lists(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1, kind="stable")[:, :k]
    la, lb = lists(a), lists(b)
    return float(np.mean([len(set(la[i]) & set(lb[i])) / k for i in range(len(a))]))


# -- best-layer-pair matrix ----------------------------------------------------------------------
def test_best_layer_pair_matrix_is_the_blockwise_maximum_of_brute_force_scores():
    gen = torch.Generator().manual_seed(0)
    n, k = 40, 4
    shared = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    rows = {"lm1": {"h0": torch.randn(n, 5, generator=gen, dtype=torch.float64), "h1": shared @ torch.randn(6, 7, generator=gen, dtype=torch.float64)},
            "lm2": [torch.randn(n, 3, generator=gen, dtype=torch.float64)]}
    cols = {"v1": {"b0": shared + 0.1 * torch.randn(n, 6, generator=gen, dtype=torch.float64),
                   "b1": torch.randn(n, 4, generator=gen, dtype=torch.float64), "b2": torch.randn(n, 8, generator=gen, dtype=torch.float64)}}
    res = best_layer_pair_matrix(rows, cols, metric="mutual_knn", k=k)
    assert res.scores.shape == (2, 1) and res.indices.shape == (2, 1, 2) and tuple(res.full.shape) == (3, 3)
    for r, (rname, layers) in enumerate(rows.items()):
        layers = list(layers.values()) if isinstance(layers, dict) else layers
        brute = np.array([[_np_mutual_knn(x.numpy(), y.numpy(), k) for y in cols["v1"].values()] for x in layers])
        assert res.scores[r, 0] == pytest.approx(brute.max(), abs=1e-6)
        i, j = res.indices[r, 0]
        assert brute[i, j] == pytest.approx(brute.max(), abs=1e-6)
    assert res.best_layers("lm1", "v1") == ("h1", "b0")
    assert res.row_layers["lm2"] == ["0"]


def test_permutation_shuffles_the_row_models_only():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=gen)
    perm = torch.randperm(30, generator=gen)
    res = best_layer_pair_matrix({"a": {"l": x}}, {"b": {"l": x[perm]}}, metric="mutual_knn", permutation=perm, k=3)
    assert res.scores[0, 0] == pytest.approx(1.0)


def test_empty_model_sets_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        best_layer_pair_matrix({}, {"b": {"l": torch.randn(5, 2)}})


# -- class-centroid RSA ------------------------------------------------------------------------
def _brute_force_mantel_p(x: np.ndarray, y: np.ndarray, n_permutations: int, seed: int, correlation,
                          with_null: bool = False):
    """Relabel the items of ``y`` (orderings drawn as the library draws them), recompute its cosine
    pdist and correlate with ``x``'s each time; the p-value (and the null)."""
    gen = torch.Generator().manual_seed(seed)
    dx = pdist(x, "cosine")
    score = correlation(dx, pdist(y, "cosine")).statistic
    null = [correlation(dx, pdist(y[torch.randperm(len(y), generator=gen).numpy()], "cosine")).statistic
            for _ in range(n_permutations)]
    p_value = (1 + sum(v >= score for v in null)) / (1 + n_permutations)
    return (p_value, np.array(null)) if with_null else p_value


def test_centroid_rsa_scores_and_p_values_equal_brute_force():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 10
    text = torch.randn(10, 16, generator=gen, dtype=torch.float64)
    mix = torch.randn(16, 24, generator=gen, dtype=torch.float64)
    x = 0.01 * text[labels] @ mix + torch.randn(60, 24, generator=gen, dtype=torch.float64)  # weakly text-like
    result = centroid_rsa(x, labels, text, n_permutations=200, n_bootstrap=20, seed=5)
    centroids = np.stack([x[labels == c].mean(0).numpy() for c in range(10)])
    for compare, correlation in (("spearman", spearmanr), ("pearson", pearsonr)):
        score = correlation(pdist(centroids, "cosine"), pdist(text.numpy(), "cosine")).statistic
        assert result[compare] == pytest.approx(score)
        expected, null = _brute_force_mantel_p(centroids, text.numpy(), 200, 5, correlation, with_null=True)
        assert result[f"{compare}_p"] == expected
        assert 1 / 201 < expected < 0.9
        assert np.isfinite(result[f"{compare}_z"])
        # calibrated (Gröger et al.): tau = the ceil(0.95 * 201)-th smallest of {score} and the null
        tau = np.sort(np.concatenate([[score], null]))[math.ceil(0.95 * 201) - 1]
        assert result[f"{compare}_calibrated"] == pytest.approx(min(max((score - tau) / (1 - tau), 0.0), 1.0), abs=1e-9)
        assert result[f"{compare}_chance"] == pytest.approx(null.mean(), abs=1e-9)
    low, high = result["spearman_ci"]
    assert -1.0 <= low <= high <= 1.0


def test_bootstrap_interval_equals_percentiles_of_brute_force_resamples():
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(50) % 5
    text = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    x = text[labels] + 0.8 * torch.randn(50, 8, generator=gen, dtype=torch.float64)
    low, high, reps = crsa_module.centroid_rsa_bootstrap(x, labels, text, n_bootstrap=50, seed=9)
    g = torch.Generator().manual_seed(9)  # the same draws, recomputed from the resampled rows
    brute = []
    for _ in range(50):
        idx = stratified_bootstrap(labels, g)
        xs, ls = x[idx].numpy(), labels[idx].numpy()
        cents = np.stack([xs[ls == c].mean(0) for c in range(5)])
        brute.append(spearmanr(pdist(cents, "cosine"), pdist(text.numpy(), "cosine")).statistic)
    np.testing.assert_allclose(reps.numpy(), brute, atol=1e-10)
    assert (low, high) == pytest.approx((np.quantile(brute, 0.025), np.quantile(brute, 0.975)))


def test_weighted_class_centroids_equal_centroids_of_the_resampled_rows():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    labels = torch.arange(40) % 10
    idx = stratified_bootstrap(labels, gen)
    assert torch.equal(torch.bincount(labels[idx], minlength=10), torch.bincount(labels, minlength=10))
    counts = torch.bincount(idx, minlength=40)[None]
    expected = torch.stack([x[idx][labels[idx] == c].mean(0) for c in range(10)])
    torch.testing.assert_close(class_centroids(x, labels, weights=counts)[0], expected)


def test_a_class_without_samples_is_refused():
    with pytest.raises(ValueError, match="class 1 has no samples"):
        class_centroids(torch.randn(4, 2), torch.tensor([0, 0, 2, 2]))


# -- run-to-run dynamics -------------------------------------------------------------------------
def _runs(n=30, steps=(0, 10, 20), seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 5, generator=gen)
    runs = {}
    for r in range(3):
        runs[f"run{r}"] = {s: {"early": torch.randn(n, 4, generator=gen),
                               "last": base + (1.0 - s / 25) * torch.randn(n, 5, generator=gen)} for s in steps}
    return runs


def test_between_runs_against_brute_force_mutual_knn():
    runs, k = _runs(), 4
    res = between_runs(runs, layer="last", k=k, n_bootstrap=30, seed=1)
    assert res["steps"] == [0, 10, 20]
    for name, values in res["per_pair"].items():
        a, b = name.split(" vs ")
        for s, step in enumerate(res["steps"]):
            assert values[s] == pytest.approx(_np_mutual_knn(runs[a][step]["last"].numpy(), runs[b][step]["last"].numpy(), k), abs=1e-6)
            best = max(_np_mutual_knn(x.numpy(), y.numpy(), k) for x in runs[a][step].values() for y in runs[b][step].values())
            assert res["best_layer_pair"][name][s] == pytest.approx(best, abs=1e-6)
    mean = np.mean(list(res["per_pair"].values()), axis=0)
    assert res["mean"] == pytest.approx(mean.tolist())
    assert np.asarray(res["replicates"]).shape == (30, 3)
    # runs converge to the shared base: the paired interval of last minus first is above 0
    diff, low, high = step_difference_interval(res, 0, 2)
    assert diff == pytest.approx(mean[2] - mean[0]) and low > 0 and low <= diff <= high + 1e-9


def test_drift_against_brute_force():
    runs, k = _runs(), 3
    out = drift(runs, layer="last", k=k)
    for name, d in out.items():
        feats = [runs[name][s]["last"].numpy() for s in d["steps"]]
        assert d["vs_final"][-1] == pytest.approx(1.0)
        assert d["vs_final"][0] == pytest.approx(_np_mutual_knn(feats[0], feats[-1], k), abs=1e-6)
        assert d["vs_previous"][0] is None
        assert d["vs_previous"][2] == pytest.approx(_np_mutual_knn(feats[1], feats[2], k), abs=1e-6)


def test_bad_dynamics_input_is_refused():
    runs = _runs()
    with pytest.raises(ValueError, match="two runs"):
        between_runs({"a": runs["run0"]})
    with pytest.raises(ValueError, match="not recorded"):
        between_runs(runs, layer="conv9")


@pytest.mark.parametrize("module", [mm_module, crsa_module, dyn_module])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


def test_calibrated_best_layer_pairs_against_a_brute_force_max_null():
    from prh_lightning.analysis import calibrated_best_layer_pairs

    gen = torch.Generator().manual_seed(4)
    n, k, K = 30, 3, 19
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    rows = {"lm": {"h0": x, "h1": torch.randn(n, 4, generator=gen, dtype=torch.float64)}}
    cols = {"v": {"b0": x + 0.5 * torch.randn(n, 5, generator=gen, dtype=torch.float64),
                  "b1": torch.randn(n, 3, generator=gen, dtype=torch.float64)}}
    perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(K)])
    res = calibrated_best_layer_pairs(rows, cols, metric="mutual_knn", permutations=perms, k=k)
    xs, ys = list(rows["lm"].values()), list(cols["v"].values())
    observed = max(_np_mutual_knn(a.numpy(), b.numpy(), k) for a in xs for b in ys)
    null = [max(_np_mutual_knn(a.numpy(), b[p].numpy(), k) for a in xs for b in ys) for p in perms]
    assert res["raw"][0, 0] == pytest.approx(observed, abs=1e-6)
    assert res["null_mean"][0, 0] == pytest.approx(np.mean(null), abs=1e-6)
    assert res["p_value"][0, 0] == pytest.approx((1 + sum(v >= observed - 1e-9 for v in null)) / (K + 1))
    assert 0.0 <= res["calibrated"][0, 0] <= 1.0
