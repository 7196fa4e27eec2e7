"""The progressive-noise recipe: a tiny end-to-end run and the chance-level machinery."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from prh_lightning.recipes import noise

TINY = ["--n-images", "24", "--levels", "3", "--image-size", "64", "--models", "lite0,lite1",
        "--k", "3", "--bootstrap", "10", "--permutations", "99", "--max-sigma", "3", "--threads", "1"]


@pytest.mark.slow
def test_tiny_run_writes_consistent_outputs(tmp_path):
    assert noise.main(["--out", str(tmp_path), *TINY]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sigmas"] == pytest.approx([0.0, 1.5, 3.0])
    curve = np.array(summary["mean_alignment"])
    assert curve.shape == (3,) and np.all((curve >= 0) & (curve <= 1))
    assert summary["chance_analytic"] == pytest.approx(3 / 23)
    # with one pair the mean over pairs is that pair's curve
    assert summary["per_pair_alignment"]["lite0 vs lite1"] == pytest.approx(curve.tolist())
    # clean photos: two ImageNet models agree far above shuffled pairing
    assert curve[0] > summary["chance_band_high"][0]
    assert (tmp_path / "figures" / "noise_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # p-values: Holm over the levels, never below the raw ones; claims judged by the stated rule
    p, q = np.array(summary["p_value_above_chance"]), np.array(summary["p_value_above_chance_holm"])
    assert np.all(q >= p - 1e-12) and np.all(q <= 1)
    assert [c["id"] for c in summary["claims"]] == ["falls", "above_chance_at_max_sigma"]
    assert summary["data"]["n_items"] == 24 and len(summary["data"]["sha256"]) == 64
    report = (tmp_path / "report.md").read_text()
    assert "Bonferroni" in report and "Holm" in report
    _check_calibration(summary, report)


def _mutual_knn(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Brute force in float64: cosine neighbours of every row (itself excluded), mean shared fraction."""
    def lists(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(u) & set(v)) / k for u, v in zip(lists(a), lists(b))]))


def _paper(observed: float, null: np.ndarray) -> tuple[float, float, float]:
    K = len(null)
    tau = np.sort(np.concatenate([[observed], null]))[math.ceil(0.95 * (K + 1)) - 1]
    return tau, (1 + np.sum(null >= observed)) / (K + 1), min(max((observed - tau) / (1 - tau), 0.0), 1.0)


def _check_calibration(summary: dict, report: str) -> None:
    """Features re-extracted here; mutual k-NN by brute force over the same permutations (the mean's
    null: numpy's default_rng(seed + 1), one permutation per model; each pair: torch.randperm with
    seed + 2 reordering the second model), then the paper's formulas; the report reads them."""
    from prh_lightning.analysis.calibrated import above_chance_phrase
    from prh_lightning.recipes import _vision_set as vs
    from prh_lightning.recipes._common import resolve_flickr_dir

    images, _ = vs.flickr_images(resolve_flickr_dir(), 24, 64, 0)
    models = [vs.load_vision_model(name, seed=i) for i, name in enumerate(["lite0", "lite1"])]
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    feats = [[f.double().numpy() for f in level] for level in
             noise.level_features(models, images, eps, np.array(summary["sigmas"]), "_avg_pooling", 32)]
    rng = np.random.default_rng(1)
    shuffles = [(rng.permutation(24), rng.permutation(24)) for _ in range(99)]
    gen = torch.Generator().manual_seed(2)
    perms = [torch.randperm(24, generator=gen).numpy() for _ in range(99)]
    pair = summary["per_pair_calibrated"]["lite0 vs lite1"]
    assert summary["calibration"]["n_permutations"] == 99
    for level, (a, b) in enumerate(feats):
        observed = _mutual_knn(a, b, 3)
        assert summary["mean_alignment"][level] == pytest.approx(observed, abs=1e-9)
        tau, p, cal = _paper(observed, np.array([_mutual_knn(a[pa], b[pb], 3) for pa, pb in shuffles]))
        got = (summary["threshold_tau"][level], summary["p_value_above_chance"][level], summary["calibrated_alignment"][level])
        assert got == pytest.approx((tau, p, cal), abs=1e-9), level
        tau, p, cal = _paper(observed, np.array([_mutual_knn(a, b[q], 3) for q in perms]))
        assert (pair["raw"][level], pair["tau"][level], pair["p_value"][level], pair["calibrated"][level]) == pytest.approx(
            (observed, tau, p, cal), abs=1e-9), level
    m, c, q = summary["mean_alignment"], summary["calibrated_alignment"], summary["p_value_above_chance_holm"]
    assert above_chance_phrase(m[0], c[0], q[0], "mean mutual k-NN", p_label="Holm p") in report
    assert "lite0 vs lite1 at sigma 3: " + above_chance_phrase(pair["raw"][-1], pair["calibrated"][-1], pair["p_value"][-1], "mutual k-NN") in report


def test_shuffled_null_matches_analytic_chance():
    """Independent random features: the row-shuffle null averages k/(n-1)."""
    gen = torch.Generator().manual_seed(0)
    n, k = 60, 5
    feats = [[torch.randn(n, 8, generator=gen) for _ in range(3)]]
    null = noise.chance_null(feats, [(0, 1), (0, 2), (1, 2)], k, n_perm=300, seed=0)
    assert null.shape == (300, 1)
    assert null.mean() == pytest.approx(k / (n - 1), abs=0.01)


def test_shuffling_rows_relabels_identical_features_to_chance():
    """Identical features score 1 unshuffled; the null of the same features sits near chance."""
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    feats = [[x, x.clone()]]
    assert noise.curve(feats, [(0, 1)], k=4)[0] == pytest.approx(1.0)
    assert noise.chance_null(feats, [(0, 1)], 4, n_perm=200, seed=0).mean() < 0.2


def test_first_level_at_chance_uses_adjusted_p_values():
    assert noise.first_at_chance(np.array([0.001, 0.01, 0.2, 0.01])) == 2
    assert noise.first_at_chance(np.array([0.001, 0.01])) is None


@pytest.mark.parametrize(
    "extra, message",
    [(["--models", "lite0"], "at least two"), (["--models", "lite0,vit"], "unknown model"),
     (["--k", "40"], "--k"), (["--levels", "1"], "--levels"), (["--permutations", "50"], "too few for 3 levels")],
)
def test_bad_input_gives_a_message(tmp_path, capsys, extra, message):
    assert noise.main(["--out", str(tmp_path), *TINY, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


def test_missing_photos_give_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PRH_FLICKR_DIR", str(tmp_path / "nowhere"))
    assert noise.main(["--out", str(tmp_path / "out"), *TINY]) == 2
    assert "PRH_FLICKR_DIR" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("make", ["file", "empty"])
def test_bad_out_or_data_dir_fail_before_any_work(tmp_path, capsys, make):
    if make == "file":
        (tmp_path / "f").write_text("")
        args = ["--out", str(tmp_path / "f" / "out")]
        message = "not a writable folder"
    else:
        (tmp_path / "empty").mkdir()
        args = ["--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "empty")]
        message = "holds no photos"
    assert noise.main([*args, *TINY]) == 2
    assert message in capsys.readouterr().err
