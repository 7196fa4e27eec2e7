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
        "--ood", "noise", "--noise-set", "gaussian-noise", "--in-dist", "flickr", "--threads", "1"]


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
     (["--jackknife-groups", "2"], "--jackknife-groups")],
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
