"""The platonic recipe end to end on 64 Flickr8k pairs with EfficientNet-Lite0 and MiniLM,
checked against best_alignment on the saved files, the chance level, and bad input."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from prh_lightning.alignment import best_alignment
from prh_lightning.data.paired import PairedDataError, load_paired
from prh_lightning.recipes import platonic
from prh_lightning.representations import Representations

pytestmark = pytest.mark.slow
N, K = 64, 5
SIZES = (16, 32, 64)
MODELS = ["efficientnet-lite0", "all-MiniLM-L6-v2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("platonic")
    code = platonic.main(["--out", str(out), "--n", str(N), "--k", str(K), "--models", *MODELS, "--threads", "1",
                          "--sizes", ",".join(map(str, SIZES)), "--repeats", "2"])
    assert code == 0
    return out, json.loads((out / "summary.json").read_text())


def test_recipe_writes_summary_figures_report_and_alignment_files(run):
    out, summary = run
    assert summary["language_models"] == ["all-MiniLM-L6-v2"] and summary["vision_models"] == ["efficientnet-lite0"]
    assert np.asarray(summary["score_matrix"]).shape == (1, 1)
    assert (out / "figures" / "scores.png").stat().st_size > 1000
    # one vision model and no causal LM: no trend plots, said in the report
    assert not (out / "figures" / "alignment_vs_vision_size.png").exists()
    assert not (out / "figures" / "alignment_vs_bits_per_byte.png").exists()
    report = (out / "report.md").read_text()
    assert "Shuffled control" in report and "no plot" in report
    # the best layer pair is named, and the data used is recorded
    lang_layer, vis_layer = summary["best_layer_names"]["all-MiniLM-L6-v2 / efficientnet-lite0"]
    assert lang_layer in summary["layers"]["all-MiniLM-L6-v2"] and vis_layer in summary["layers"]["efficientnet-lite0"]
    assert f"| {lang_layer} | {vis_layer} |" in report
    assert summary["data"]["n_items"] == N and len(summary["data"]["sha256"]) == 64
    # calibrated next to raw: the raw aggregate is the best-layer-pair score; true pairs beat every shuffle
    cal = summary["calibrated"]
    assert cal["raw"][0][0] == pytest.approx(summary["score_matrix"][0][0], abs=1e-6)
    assert cal["p_value"][0][0] == pytest.approx(1 / 201) and cal["p_holm"][0][0] == pytest.approx(1 / 201)
    assert 0 < cal["calibrated"][0][0] <= 1 and cal["null_mean"][0][0] < cal["raw"][0][0]
    assert "Calibrated scores" in report
    folder = out / "alignment" / f"flickr8k-1024_n{N}"
    scores = np.load(folder / f"mutual_knn_k{K}.npy", allow_pickle=False)  # plain arrays, no pickle
    np.testing.assert_allclose(scores, summary["score_matrix"])
    assert np.load(folder / f"mutual_knn_k{K}_indices.npy", allow_pickle=False).shape == (1, 1, 2)


def test_the_alignment_curve_is_in_the_summary_the_files_and_the_report(run):
    out, summary = run
    curve = summary["alignment_curve"]
    assert curve["sizes"] == list(SIZES) and curve["repeats"] == 2 and len(curve["pairs"]) == 1
    pair = curve["pairs"][0]
    # at all n pairs every subset is the whole set: its score is the best-layer-pair score, with no spread
    assert pair["mean"][-1] == pytest.approx(summary["score_matrix"][0][0], abs=1e-6)
    assert pair["low"][-1] == pytest.approx(pair["high"][-1], abs=1e-12)
    assert pair["chance"][-1] < pair["mean"][-1]
    files = summary["alignment_files"]
    assert Path(files["curve_png"]).stat().st_size > 1000 and Path(files["curve_csv"]).read_text().count("\n") == 1 + len(SIZES)
    report = (out / "report.md").read_text()
    assert "## Alignment as a function of n" in report
    assert f"(alignment/flickr8k-1024_n{N}/mutual_knn_k{K}_curve.png)" in report


def test_sizes_beyond_the_data_are_refused_before_anything_loads(tmp_path, capsys):
    assert platonic.main(["--out", str(tmp_path / "out"), "--n", "32", "--sizes", "16,64", "--models", *MODELS]) == 2
    assert "--sizes asks for 64 samples but there are only n = 32 pairs (--n 32)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_score_matrix_equals_best_alignment_on_the_saved_features(run):
    out, summary = run
    feats = out / "features" / f"flickr8k-1024_n{N}"
    lang = Representations.load(feats / "all-MiniLM-L6-v2_pool-avg.safetensors")
    vis = Representations.load(feats / "efficientnet-lite0_pool-none.safetensors")
    score, (i, j) = best_alignment(lang, vis, metric="mutual_knn", k=K, clip_quantile=0.95)
    assert summary["score_matrix"][0][0] == pytest.approx(score, abs=1e-6)
    assert summary["best_layer_pairs"][0][0] == [i, j]


def test_shuffled_pairing_falls_to_chance_and_real_pairing_is_above_it(run):
    _, summary = run
    control = summary["shuffled_control"]
    chance = K / (N - 1)
    assert control["chance"] == pytest.approx(chance)
    assert abs(control["layer_pair_mean"] - chance) < 0.03  # mean over 7 x 17 layer pairs
    real = summary["score_matrix"][0][0]
    assert real > control["scores"][0][0] + 0.05 and real > 2 * chance


def test_second_extract_skips_and_measure_takes_other_metrics(run, capsys):
    out, _ = run
    path = out / "features" / f"flickr8k-1024_n{N}" / "efficientnet-lite0_pool-none.safetensors"
    before = path.stat().st_mtime_ns
    assert platonic.extract_main(["--out", str(out), "--n", str(N), "--models", *MODELS]) == 0
    assert capsys.readouterr().out.count("exists, skipped") == 2 and path.stat().st_mtime_ns == before
    assert platonic.measure_main(["--out", str(out), "--metric", "cka", "--clip-quantile", "1"]) == 0
    cka = np.load(out / "alignment" / f"flickr8k-1024_n{N}" / "cka.npy")
    assert cka.shape == (1, 1) and 0 < cka[0, 0] <= 1


# -- bad input -------------------------------------------------------------------------------
def test_unknown_model_name_is_refused_before_loading_anything(tmp_path, capsys):
    assert platonic.extract_main(["--out", str(tmp_path), "--models", "gpt-17"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt-17'" in err and "hf-lm:<name>" in err and "Traceback" not in err


def test_model_not_available_offline_names_what_to_download(tmp_path, capsys):
    code = platonic.extract_main(["--out", str(tmp_path), "--n", "4", "--models", "timm:vit_small_patch16_224.augreg_in21k"])
    err = capsys.readouterr().err
    assert code == 2 and "vit_small_patch16_224" in err and "internet" in err


def test_dataset_without_text_column(tmp_path):
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.csv").write_text("file_name,caption\n0.png,red\n1.png,black\n")
    with pytest.raises(PairedDataError, match="no 'text' column.*caption"):
        load_paired(tmp_path)


def test_hub_dataset_offline_points_to_the_local_folder():
    with pytest.raises(PairedDataError, match="needs internet.*metadata.csv"):
        load_paired("minhuh/prh", "wit_1024")


def test_measure_refuses_feature_files_with_different_samples(tmp_path, capsys):
    folder = tmp_path / "features" / "some-data_n10"
    meta = {"pool": "avg", "modality": "language", "model": "lm"}
    Representations({"a": torch.randn(10, 4)}, sample_ids=range(10), metadata=meta).save(folder / "lm_pool-avg.safetensors")
    meta = {"pool": "none", "modality": "vision", "model": "vm"}
    Representations({"a": torch.randn(12, 4)}, sample_ids=range(12), metadata=meta).save(folder / "vm_pool-none.safetensors")
    assert platonic.measure_main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "12 samples" in err and "10" in err and "same pairs" in err


def test_paper_style_pool_needs_a_modality(tmp_path, capsys):
    assert platonic.extract_main(["--out", str(tmp_path), "--pool", "avg"]) == 2
    assert "--pool needs --modality" in capsys.readouterr().err
    assert platonic.extract_main(["--out", str(tmp_path), "--modality", "vision", "--pool", "last"]) == 2
    assert "not defined for vision" in capsys.readouterr().err


@pytest.mark.parametrize("q", ["0", "1.5", "-0.2"])
def test_clip_quantile_outside_0_1_is_refused(tmp_path, capsys, q):
    assert platonic.main(["--out", str(tmp_path / "out"), "--n", "4", "--models", *MODELS, "--clip-quantile", q]) == 2
    assert "--clip-quantile must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unwritable_out_and_empty_data_are_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert platonic.main(["--out", str(tmp_path / "f" / "out"), "--models", *MODELS]) == 2
    assert "not a writable folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert platonic.extract_main(["--out", str(tmp_path / "out"), "--data", str(tmp_path / "empty"), "--models", *MODELS]) == 2
    err = capsys.readouterr().err
    assert "holds no photos" in err and "PRH_FLICKR_DIR" in err and "minhuh/prh" in err


def test_measure_before_extract_says_what_to_run(tmp_path, capsys):
    assert platonic.measure_main(["--out", str(tmp_path)]) == 2
    assert "run prh-lightning extract" in capsys.readouterr().err.lower()
