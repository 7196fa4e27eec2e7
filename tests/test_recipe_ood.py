"""The in-distribution / OOD / noise recipe: a tiny end-to-end run, its statistics against
scipy, and the seed's central claim (noise images align less than photos) on real models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from prh_lightning.functional import mutual_knn
from prh_lightning.recipes import _vision_set as vs
from prh_lightning.recipes import ood

TINY = ["--n-images", "20", "--image-size", "48", "--models", "lite0,lite1,lite0-random",
        "--metrics", "mutual_knn,cka,cknna", "--k", "3", "--blocks", "1", "--jackknife-groups", "5",
        "--ood", "noise", "--noise-set", "gaussian-noise", "--in-dist", "flickr", "--permutations", "39", "--threads", "1"]


@pytest.mark.slow
def test_tiny_run_writes_consistent_outputs(tmp_path):
    assert ood.main(["--out", str(tmp_path), *TINY]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model_pairs"] == ["lite0 vs lite1", "lite0 vs lite0-random", "lite1 vs lite0-random"]
    s = summary["statistics"]
    for role in ood.SET_ROLES:
        corr = np.array(s[f"{role}/metric_corr_layers"]["value"], dtype=float)
        assert corr.shape == (3, 3)
        assert np.allclose(np.diag(corr), 1) and np.allclose(corr, corr.T)
        # the seed's statistic, recomputed with scipy from the saved pair scores
        scores = np.array(s[f"{role}/model_scores"]["value"])
        assert np.allclose(s[f"{role}/metric_corr_models"]["value"], stats.spearmanr(scores, axis=1).statistic)
    for key, entry in s.items():
        value, low, high = (np.array(entry[k], dtype=float) for k in ("value", "ci_low", "ci_high"))
        ok = np.isnan(value) | ((low <= value + 1e-9) & (value <= high + 1e-9))
        assert ok.all(), key
    for rel in summary["figures"]:
        assert (tmp_path / rel).read_bytes()[:4] == b"\x89PNG"
    # every interval stays inside its statistic's range
    for m, metric in enumerate(summary["metrics"]):
        for role in ood.SET_ROLES:
            entry = s[f"{role}/pretrained_mean"]
            assert 0.0 <= entry["ci_low"][m] <= entry["ci_high"][m] <= 1.0 or metric == "cknna"
    for key in (k for k in s if "agreement" in k and "minus" not in k):
        assert -1.0 <= s[key]["ci_low"] <= s[key]["ci_high"] <= 1.0
    assert summary["undefined_scores"] == []
    # the data actually used is recorded
    flickr = summary["data"]["in-distribution"]
    assert flickr["n_items"] == 20 and len(flickr["sha256"]) == 64 and flickr["path"]
    # claims: one per comparison, Bonferroni-corrected, each with a verdict of the rule
    claims = summary["claims"]
    assert len(claims) == 3 + 2 * 3
    assert all(c["confidence"] == pytest.approx(1 - 0.05 / len(claims)) for c in claims)
    assert {c["verdict"] for c in claims} <= {"holds", "does not hold", "cannot tell"}
    report = (tmp_path / "report.md").read_text()
    assert "Seed claim 1" in report and "Bonferroni" in report
    _check_calibrated(summary, report)


def _check_calibrated(summary: dict, report: str) -> None:
    """Calibrated best-pair numbers beside the raw ones, consistent with them, and read by the report."""
    from prh_lightning.analysis.calibrated import above_chance_phrase
    from prh_lightning.analysis.claims import holm

    assert summary["calibration"]["n_permutations"] == 39
    pre = np.array([True, False, False])  # lite0 vs lite1 is the only pretrained pair
    for role in ood.SET_ROLES:
        raw_best = np.array(summary["statistics"][f"{role}/model_scores"]["value"], dtype=float)  # [metrics, pairs]
        for m, metric in enumerate(summary["metrics"]):
            c = summary["calibrated"][role][metric]
            assert np.allclose(c["raw"], raw_best[m], atol=1e-6), (role, metric)
            p, cal = np.array(c["p_value"]), np.array(c["calibrated"])
            assert np.allclose(p * 40, np.round(p * 40)) and np.all((cal >= 0) & (cal <= 1))
            assert np.all(cal[p > 0.05] == 0)
            assert c["p_holm"][0] == pytest.approx(holm(p[pre])[0]) and c["pretrained_mean"] == pytest.approx(cal[0])
            assert c["above_chance"] == int(c["p_holm"][0] < 0.05 and cal[0] > 0)
        c = summary["calibrated"][role]["mutual_knn"]
        phrase = above_chance_phrase(c["raw"][0], c["calibrated"][0], c["p_holm"][0], "mutual_knn", p_label="Holm p")
        assert f"lite0 vs lite1: {phrase}" in report
    assert "## Alignment above chance (calibrated)" in report and "Read from the calibrated scores" in report
    for role in ood.SET_ROLES:
        for kind in ("", "_calibrated"):
            rel = f"figures/scores_{role}_mutual_knn{kind}.png"
            assert rel in summary["figures"] and f"({rel})" in report


def test_calibrated_scores_against_numpy_cka_over_the_same_permutations():
    """A rotated copy is above chance at p = 1/(K+1); an independent model is scored as numpy's CKA
    under the same permutations says (the best of its 2 x 2 layer pairs, the paper's formulas)."""
    import math

    import torch

    from prh_lightning.recipes import _ood_report

    gen = torch.Generator().manual_seed(0)
    n, K = 40, 39
    base = [torch.randn(n, 6, generator=gen), torch.randn(n, 4, generator=gen)]
    rot = torch.linalg.qr(torch.randn(6, 6, generator=gen)).Q
    other = [torch.randn(n, 5, generator=gen), base[1] + 2 * torch.randn(n, 4, generator=gen)]
    models = [dict(zip("ab", base)), {"a": base[0] @ rot, "b": base[1].flip(1)}, dict(zip("ab", other))]
    perms = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(100 + i)) for i in range(K)])
    out = _ood_report.calibrated_scores({"in-distribution": models}, ["cka"], perms, [True, True, False], lambda m: {})
    c = out["in-distribution"]["cka"]
    assert c["p_value"][0] == pytest.approx(1 / (K + 1)) and c["calibrated"][0] == pytest.approx(1.0, abs=1e-6)
    assert c["above_chance"] == 1 and c["pretrained_pairs"] == 1

    def cka(x, y):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        x, y = x - x.mean(0), y - y.mean(0)
        return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))

    xs = [t.double().numpy() for t in base]
    ys = [t.double().numpy() for t in other]
    best = lambda perm: max(cka(x, y[perm]) for x in xs for y in ys)  # noqa: E731
    observed, null = best(np.arange(n)), np.array([best(p.numpy()) for p in perms])
    tau = np.sort(np.concatenate([[observed], null]))[math.ceil(0.95 * (K + 1)) - 1]
    assert c["raw"][1] == pytest.approx(observed, abs=1e-6)
    assert c["tau"][1] == pytest.approx(tau, abs=1e-6)
    assert c["p_value"][1] == pytest.approx((1 + np.sum(null >= observed)) / (K + 1))
    assert c["calibrated"][1] == pytest.approx(min(max((observed - tau) / (1 - tau), 0), 1), abs=1e-6)


def test_metric_correlation_is_spearman():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4, 15))
    vectors[2] = np.exp(vectors[0])  # monotone: rank correlation exactly 1
    corr = ood.metric_correlation(vectors)
    assert np.allclose(corr, stats.spearmanr(vectors, axis=1).statistic)
    assert corr[0, 2] == pytest.approx(1.0)


@pytest.mark.slow
def test_noise_images_align_less_than_photos():
    """The seed's central claim, on the offline ImageNet EfficientNet-Lites: for every pair and
    two image draws, mutual k-NN of the pooled head is higher on photos than on pixel noise.
    Checked beforehand (n = 24..96 photos, 64..128 px): gaps of 0.35..0.6 in mutual k-NN."""
    from prh_lightning.recipes._common import resolve_flickr_dir

    models = [vs.load_vision_model(name) for name in ("lite0", "lite1")]
    for seed in (0, 1):
        scores = {}
        for name in ("flickr", "noise"):
            images, _ = vs.image_set(name, 32, 64, seed, flickr_dir=resolve_flickr_dir())
            a, b = (vs.embed(m, images, ["_avg_pooling"])["_avg_pooling"] for m in models)
            scores[name] = float(mutual_knn(a, b, k=5))
        assert scores["flickr"] > scores["noise"] + 0.2, scores


@pytest.mark.parametrize(
    "extra, message",
    [(["--metrics", "mutual_knn,foo"], "--metrics"), (["--models", "lite0,lite0-random"], "two pretrained"),
     (["--jackknife-groups", "2"], "--jackknife-groups"), (["--permutations", "5"], "--permutations")],
)
def test_bad_input_gives_a_message(tmp_path, capsys, extra, message):
    assert ood.main(["--out", str(tmp_path), *TINY, *extra]) == 2
    assert message in capsys.readouterr().err


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert ood.main(["--out", str(blocker / "out"), *TINY]) == 2
    assert "not a writable folder" in capsys.readouterr().err


def test_empty_data_dir_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert ood.main(["--out", str(tmp_path / "out"), *TINY, "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "holds no photos" in err and "PRH_FLICKR_DIR" in err
    assert not (tmp_path / "out").exists()


def test_unknown_image_set_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ood.main(["--out", str(tmp_path), "--ood", "imagenet-o"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_random_controls_are_the_zoo_architecture_reinitialised_from_the_seed():
    import torch

    pretrained = vs.load_vision_model("lite0")
    a, b, c = (vs.load_vision_model("lite0-random", seed=s) for s in (0, 0, 1))
    assert not a.extra["pretrained"] and pretrained.extra["pretrained"]
    pa, pb, pc, pp = (dict(m.model.named_parameters()) for m in (a, b, c, pretrained))
    assert pa.keys() == pp.keys()
    name = "_blocks.3._depthwise_conv.weight"
    assert torch.equal(pa[name], pb[name]) and not torch.equal(pa[name], pc[name])
    assert not torch.equal(pa[name], pp[name])
    assert a.model._bn0.running_mean is None  # batch statistics: untrained running ones shrink activations to ~0
    images, _ = vs.image_set("noise", 9, 32, 0)
    feats = vs.embed(a, images, ["_avg_pooling"], batch_size=4)["_avg_pooling"]  # batches 4 + 5, never 1
    assert feats.shape == (9, 1280) and 0.1 < float(feats.std()) < 10


def test_pair_vectors_granularities():
    """Best layer pair per model pair; every cross-model layer pair; pretrained-only subset."""
    import torch

    scores = {"m": {(0, 1): torch.tensor([[0.1, 0.5], [0.2, 0.3]]), (0, 2): torch.tensor([[0.4, 0.0], [0.0, 0.0]]),
                    (1, 2): torch.tensor([[0.9, 0.0], [0.0, 0.1]])}}
    vectors = ood.pair_vectors(scores, pretrained=[True, True, False])
    assert vectors["models"][0].tolist() == pytest.approx([0.5, 0.4, 0.9])
    assert vectors["layers"].shape == (1, 12)
    assert vectors["layers_pretrained"][0].tolist() == pytest.approx([0.1, 0.5, 0.2, 0.3])
    assert vectors["layers"][0, 4:8].tolist() == pytest.approx([0.4, 0.0, 0.0, 0.0])
