"""Calibrated numbers for reports (prh_lightning.analysis.calibrated) against the paper's formulas
written here in numpy, over the same explicit permutations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prh_lightning import calibrate
from prh_lightning.analysis.calibrated import above_chance_phrase, calibrate_statistic, calibration_fields, draw_permutations


def _paper(observed: float, null: np.ndarray, high: float | None, alpha: float = 0.05) -> dict[str, float]:
    """Algorithms 1-2 of Gröger, Wen & Brbić, one statistic at a time."""
    K = len(null)
    pooled = np.sort(np.concatenate([[observed], null]))
    tau = pooled[math.ceil((1 - alpha) * (K + 1)) - 1]
    p = (1 + np.sum(null >= observed)) / (K + 1)
    cal = max(observed - tau, 0.0) if high is None else min(max((observed - tau) / (high - tau), 0.0), 1.0)
    return {"tau": tau, "p_value": p, "calibrated": cal, "null_mean": null.mean()}


def _cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


@pytest.mark.parametrize("high", [1.0, None])
def test_calibrate_statistic_matches_the_papers_formulas(high):
    rng = np.random.default_rng(0)
    null = rng.normal(0.3, 0.1, size=(99, 4))
    observed = np.array([0.2, 0.35, 0.6, 0.9])
    out = calibrate_statistic(observed, null, high=high)
    for j in range(4):
        ref = _paper(observed[j], null[:, j], high)
        for key, value in ref.items():
            assert out[key][j] == pytest.approx(value, abs=1e-12), (key, j)
    assert out["raw"].tolist() == observed.tolist()


def test_calibrate_statistic_refuses_a_null_of_the_wrong_shape():
    with pytest.raises(ValueError, match="null must be"):
        calibrate_statistic([0.1, 0.2], np.zeros((10, 3)))
    with pytest.raises(ValueError, match="alpha"):
        calibrate_statistic([0.1], np.zeros((10, 1)), alpha=1.5)


def test_calibration_fields_equal_a_brute_force_loop_over_the_same_permutations():
    gen = torch.Generator().manual_seed(3)
    n = 50
    shared = torch.randn(n, 4, generator=gen)
    xs = [shared @ torch.randn(4, 6, generator=gen) + 0.5 * torch.randn(n, 6, generator=gen), torch.randn(n, 5, generator=gen)]
    ys = [shared @ torch.randn(4, 7, generator=gen), torch.randn(n, 3, generator=gen), torch.randn(n, 8, generator=gen)]
    perms = draw_permutations(n, 60, seed=11)
    assert perms.shape == (60, n) and torch.equal(perms.sort(dim=1).values, torch.arange(n).expand(60, n))
    fields = calibration_fields(calibrate(xs, ys, "cka", permutations=perms, normalize=False))
    assert fields["n_permutations"] == 60
    X = [x.double().numpy() for x in xs]
    Y = [y.double().numpy() for y in ys]
    raw = np.array([[_cka(x, y) for y in Y] for x in X])
    null = np.array([[[_cka(x, y[p.numpy()]) for y in Y] for x in X] for p in perms])  # [K, 2, 3]
    for i in range(2):
        for j in range(3):
            ref = _paper(raw[i, j], null[:, i, j], 1.0)
            assert fields["raw"][i][j] == pytest.approx(raw[i, j], abs=1e-6)
            for key, value in ref.items():
                assert fields[key][i][j] == pytest.approx(value, abs=1e-6), (key, i, j)
    ref = _paper(raw.max(), null.reshape(60, -1).max(axis=1), 1.0)  # best-of-layers null
    for key, value in ref.items():
        assert fields["aggregate"][key] == pytest.approx(value, abs=1e-6), key
    assert fields["aggregate"]["p_value"] == pytest.approx(1 / 61)  # the shared signal beats every shuffle
    # a seeded generator in calibrate draws the same permutations
    seeded = calibrate(xs, ys, "cka", n_permutations=60, generator=torch.Generator().manual_seed(11), normalize=False)
    assert calibration_fields(seeded) == fields
    assert calibration_fields(calibrate(xs, ys, "cka", permutations=perms, aggregate=None), cells=False)["aggregate"] is None


def test_draw_permutations_refuses_a_bad_count():
    with pytest.raises(ValueError, match="positive int"):
        draw_permutations(5, 0, seed=0)


@pytest.mark.parametrize("raw, cal, p, expected", [
    (0.71, 0.0, 0.4, "not above chance"),
    (0.52, 0.31, 0.005, "above chance"),
    (0.52, 0.0, 0.01, "not above chance"),  # p small but the score does not pass tau
    (0.52, 0.2, 0.2, "not above chance"),
])
def test_above_chance_phrase_leads_with_the_calibrated_number(raw, cal, p, expected):
    text = above_chance_phrase(raw, cal, p, "CKA")
    assert text.startswith(f"calibrated CKA {cal:.2f} (raw {raw:.2f})")
    assert text.endswith(": " + expected)


def test_calibrated_model_pairs_scores_each_pair_and_leaves_undefined_neighbours_nan():
    """Rotated copy: p = 1/(K+1), calibrated 1; a model of 10 rows repeated 3 times: neighbour
    lists cut through groups of identical rows, k-NN undefined, NaN."""
    from prh_lightning.analysis.calibrated import calibrated_model_pairs

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30, 6, generator=gen)
    rot = torch.linalg.qr(torch.randn(6, 6, generator=gen)).Q
    repeated = torch.randn(10, 4, generator=gen).repeat_interleave(3, dim=0)
    models = [{"h": x}, {"h": x @ rot}, {"h": repeated}]
    out = calibrated_model_pairs(models, "mutual_knn", draw_permutations(30, 39, seed=0), k=3)
    assert len(out["p_value"]) == 3  # pairs (0, 1), (0, 2), (1, 2)
    assert out["p_value"][0] == pytest.approx(1 / 40) and out["calibrated"][0] == pytest.approx(1.0)
    assert out["raw"][0] == pytest.approx(1.0)
    assert all(math.isnan(out[key][p]) for key in out for p in (1, 2))
    only = calibrated_model_pairs(models, "mutual_knn", draw_permutations(30, 39, seed=0), pairs=[(1, 0)], k=3)
    assert only["p_value"] == [pytest.approx(1 / 40)]
