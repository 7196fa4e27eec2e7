"""The Fashion-MNIST recipe end to end: one tiny real run (real Fashion-MNIST, real MiniLM,
real Trainer runs), its outputs checked against independent references (scipy, numpy),
TensorBoard files read back, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from prh_lightning import Representations
from prh_lightning.recipes import fashion_mnist as recipe

pytestmark = pytest.mark.slow

CNN = ["conv1", "conv2", "avgpool"]
RESNET = ["conv1", "layer1", "layer2", "layer3", "layer4", "avgpool"]
TINY = ["--n-samples", "100", "--train-size", "2000", "--epochs", "1", "--resnet-weights", "scratch",
        "--resnet-epochs", "1", "--resnet-train-size", "400", "--val-size", "100", "--test-size", "200",
        "--batch-size", "64", "--permutations", "99", "--calibration-permutations", "60", "--bootstraps", "20", "--umap-points", "100",
        "--umap-epochs", "10", "--probe-size", "64", "--monitor-every", "10", "--jackknife-groups", "5", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fashion") / "out"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = recipe.main(["--out", str(out), *TINY])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    return out, summary, stdout.getvalue()


def _reps(out: Path, name: str) -> Representations:
    return Representations.load(out / "representations" / f"{name}.safetensors")


def test_every_output_exists_and_the_report_shows_every_figure(run):
    out, summary, stdout = run
    report = (out / "report.md").read_text()
    figures = sorted((out / "figures").glob("*.png"))
    names = {p.stem for p in figures}
    assert {"umap_resnet", "umap_fashioncnn", "rsa_fashioncnn_minilm", "rsa_resnet_minilm",
            "heatmap_rsa_euclidean", "heatmap_rsa_cosine", "heatmap_cka", "heatmap_mutual_knn",
            "heatmap_cka_calibrated", "heatmap_mutual_knn_calibrated", "heatmap_rsa_euclidean_calibrated",
            "heatmap_rsa_cosine_calibrated"} <= names
    for png in figures:
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and min(image.shape[:2]) > 100
        assert f"(figures/{png.name})" in report
    for path in summary["heatmaps"].values():
        assert (out / path).is_file()
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    assert f"tensorboard --logdir {out / 'tensorboard'}" in stdout
    assert summary["resnet_weights"] == "scratch"


def test_matrices_match_the_layer_lists_and_independent_references(run):
    out, summary, _ = run
    cnn, resnet = _reps(out, "fashioncnn"), _reps(out, "resnet")
    assert cnn.layers == CNN and resnet.layers == RESNET and cnn.n == resnet.n == 100
    assert torch.equal(cnn.labels, resnet.labels)
    for name, entry in summary["heatmap_matrices"].items():
        values = np.array(entry["values"])
        assert entry["rows"] == CNN and entry["cols"] == RESNET and values.shape == (3, 6), name
        assert np.all(np.isfinite(values)) and np.all(np.abs(values) <= 1 + 1e-6), name
    # RSA with Euclidean RDMs: scipy's pdist + spearmanr, cell by cell.
    euclid = np.array(summary["heatmap_matrices"]["rsa_euclidean"]["values"])
    for i, a in enumerate(CNN):
        for j, b in enumerate(RESNET):
            ref = spearmanr(pdist(cnn[a].double().numpy()), pdist(resnet[b].double().numpy())).statistic
            assert euclid[i, j] == pytest.approx(ref, abs=1e-4)
    # Linear CKA of L2-normalised rows, from its textbook formula in numpy.
    cka = np.array(summary["heatmap_matrices"]["cka"]["values"])
    x = cnn["avgpool"].double().numpy()
    y = resnet["layer2"].double().numpy()
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    x, y = x - x.mean(0), y - y.mean(0)
    ref = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert cka[2, 2] == pytest.approx(ref, abs=1e-4)


def test_centroid_rsa_against_scipy_and_its_statistics(run):
    out, summary, _ = run
    text = _reps(out, "minilm_labels")
    assert text.layers == ["names", "templates"] and tuple(text["names"].shape) == (10, 384)
    for model, key in (("fashioncnn", "rsa_fashioncnn_minilm"), ("resnet", "rsa_resnet_minilm")):
        reps = _reps(out, model)
        feats, labels = reps["avgpool"].double().numpy(), reps.labels.numpy()
        centroids = np.stack([feats[labels == c].mean(0) for c in range(10)])
        ref = spearmanr(pdist(centroids, "cosine"), pdist(text["names"].double().numpy(), "cosine")).statistic
        assert summary[key] == pytest.approx(ref, abs=1e-6)
        p_value, null = _brute_force_mantel_p(centroids, text["names"].double().numpy(), 99, 0, spearmanr, with_null=True)
        assert summary[f"{key}_p"] == p_value
        # calibrated as in the paper: tau = the ceil(0.95 * 100)-th smallest of {score} and the 99 null scores
        tau = np.sort(np.concatenate([[summary[key]], null]))[94]
        assert summary[f"{key}_calibrated"] == pytest.approx(min(max((summary[key] - tau) / (1 - tau), 0.0), 1.0), abs=1e-9)
        assert summary["centroid_rsa"][model]["names"]["avgpool"]["spearman_chance"] == pytest.approx(np.mean(null), abs=1e-9)
        assert -1.0 <= summary[key] <= 1.0
        assert 1 / 100 <= summary[f"{key}_p"] <= 1.0  # 99 permutations: p is a multiple of 1/100
        assert summary[f"{key}_p"] * 100 == pytest.approx(round(summary[f"{key}_p"] * 100))
        stats = summary["centroid_rsa"][model]["names"]["avgpool"]
        low, high = stats["spearman_ci"]
        assert -1.0 <= low <= high <= 1.0
        assert -1.0 <= stats["pearson"] <= 1.0
        assert -1.0 <= summary[f"{key}_templates"] <= 1.0


def test_depth_contrast_counts_layer4_once_and_matches_its_definition(run):
    out, summary, _ = run
    resnet = _reps(out, "resnet")
    assert torch.allclose(resnet["layer4"], resnet["avgpool"], atol=1e-5)  # avgpool is layer4's spatial mean
    for name, c in summary["depth_contrast"].items():
        assert c["late_layers"] == ["layer3", "layer4"], name
        values = np.array(summary["heatmap_matrices"][name]["values"])
        assert c["early"] == pytest.approx(values[:, :3].mean(), abs=1e-6)
        assert c["late"] == pytest.approx(values[:, 3:5].mean(), abs=1e-6)
        assert c["low"] <= c["difference"] <= c["high"]
        assert c["confidence"] == pytest.approx(1 - 0.05 / 4)
        assert c["verdict"] in ("holds", "does not hold", "cannot tell")


def test_claims_are_holm_adjusted_and_the_data_is_recorded(run):
    out, summary, _ = run
    from prh_lightning.analysis.claims import holm

    claims = summary["claims"]
    assert len(claims) == 4 + 4  # centroid RSA (2 models x 2 texts) + the best cell of each of the 4 heatmaps
    assert [c["p_holm"] for c in claims] == pytest.approx(holm([c["p"] for c in claims]).tolist())
    for c in claims:
        assert c["verdict"] == ("holds" if c["p_holm"] < 0.05 else "cannot tell")
    data = summary["data"]
    assert data["files"] == 4 and data["n_items"] == 70000 and len(data["sha256"]) == 64
    assert summary["threads"] == 1  # --threads 1 holds for the whole run
    assert "## Claims" in (out / "report.md").read_text()


def _centred_gram(x: np.ndarray) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)  # the CKA heatmap normalises rows
    x = x - x.mean(0)
    return x @ x.T


def test_calibrated_cka_heatmap_equals_the_papers_formulas_over_the_same_permutations(run):
    """Linear CKA from centred Grams in numpy, ResNet's rows reordered by the documented seeded
    permutations (torch.randperm, seed 0), then tau, p and the calibrated score as in the paper,
    per cell and for the best cell against the best cell of each permuted matrix."""
    import math

    out, summary, _ = run
    cnn, resnet = _reps(out, "fashioncnn"), _reps(out, "resnet")
    K, n = 60, 100
    gen = torch.Generator().manual_seed(0)
    perms = [torch.randperm(n, generator=gen).numpy() for _ in range(K)]
    gx = [_centred_gram(cnn[a].double().numpy()) for a in CNN]
    gy = [_centred_gram(resnet[b].double().numpy()) for b in RESNET]
    cka = lambda a, b: float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    raw = np.array([[cka(a, b) for b in gy] for a in gx])
    null = np.array([[[cka(a, b[p][:, p]) for b in gy] for a in gx] for p in perms])  # [K, 3, 6]

    def paper(obs, nul):
        pooled = np.sort(np.concatenate([[obs], nul]))
        tau = pooled[math.ceil(0.95 * (K + 1)) - 1]
        return tau, (1 + np.sum(nul >= obs)) / (K + 1), min(max((obs - tau) / (1 - tau), 0.0), 1.0)

    cal = summary["calibrated_heatmaps"]["cka"]
    assert cal["n_permutations"] == K and cal["rows"] == CNN and cal["cols"] == RESNET
    assert np.allclose(cal["raw"], summary["heatmap_matrices"]["cka"]["values"], atol=1e-6)
    for i in range(3):
        for j in range(6):
            tau, p, c = paper(raw[i, j], null[:, i, j])
            assert cal["raw"][i][j] == pytest.approx(raw[i, j], abs=1e-5)
            assert cal["tau"][i][j] == pytest.approx(tau, abs=1e-5)
            assert cal["p_value"][i][j] == pytest.approx(p, abs=1e-9)
            assert cal["calibrated"][i][j] == pytest.approx(c, abs=1e-4)
            assert cal["null_mean"][i][j] == pytest.approx(null[:, i, j].mean(), abs=1e-5)
    tau, p, c = paper(raw.max(), null.reshape(K, -1).max(axis=1))
    agg, best = cal["aggregate"], summary["best_cell_calibrated"]["cka"]
    assert (agg["tau"], agg["p_value"], agg["calibrated"]) == pytest.approx((tau, p, c), abs=1e-5)
    assert best["p_value"] == agg["p_value"] and best["calibrated"] == agg["calibrated"]
    i, j = np.unravel_index(raw.argmax(), raw.shape)
    assert (best["fashioncnn_layer"], best["resnet_layer"]) == (CNN[i], RESNET[j])
    # the claim about the best cell reads the best-of-layers p-value
    claim = next(c for c in summary["claims"] if c["claim"].startswith("best cka cell"))
    assert claim["p"] == agg["p_value"]
    # every heatmap: calibrated scores in [0, 1], p-values on the 1/(K+1) grid, 0 where p > 0.05
    for name, entry in summary["calibrated_heatmaps"].items():
        c, pv = np.array(entry["calibrated"]), np.array(entry["p_value"])
        assert np.all((c >= 0) & (c <= 1)) and np.allclose(pv * (K + 1), np.round(pv * (K + 1))), name
        assert np.all(c[pv > 0.05] == 0), name


def test_the_report_reads_the_calibrated_numbers(run):
    from prh_lightning.analysis.calibrated import above_chance_phrase
    from prh_lightning.recipes._fashion_settings import HEATMAPS

    out, summary, stdout = run
    report = (out / "report.md").read_text()
    for name, best in summary["best_cell_calibrated"].items():
        phrase = above_chance_phrase(best["score"], best["calibrated"], best["p_value"], HEATMAPS[name][2])
        assert phrase in report, name
        assert f"({summary['calibrated_heatmap_figures'][name]})" in report
    best = summary["best_cell_calibrated"]["cka"]
    assert above_chance_phrase(best["score"], best["calibrated"], best["p_value"], "linear CKA") in stdout
    holm = {c["claim"]: c["p_holm"] for c in summary["claims"]}
    st = summary["centroid_rsa"]["resnet"]["names"]["avgpool"]
    p_holm = holm["centroid RSA resnet avgpool vs MiniLM (names) above chance"]
    assert above_chance_phrase(st["spearman"], st["spearman_calibrated"], p_holm, "Spearman RSA", p_label="Holm p") in report
    live = summary["monitor_history"]["alignment/cka/resnet/calibrated"]
    assert f"ResNet was {live[0][1]:.3f} at the first check and {live[-1][1]:.3f} at the last" in report


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert recipe.main(["--out", str(tmp_path / "f" / "out"), *TINY]) == 2
    assert "not a writable folder" in capsys.readouterr().err


def test_test_accuracies_are_above_chance(run):
    _, summary, _ = run
    # 200 test images: chance is 0.10 with a standard deviation of 0.021.
    assert summary["test_images"] == 200
    assert summary["test_accuracy"]["fashioncnn"] > 0.2
    assert summary["test_accuracy"]["resnet"] > 0.2


def test_tensorboard_holds_the_alignment_scalars(run):
    out, summary, _ = run
    events = EventAccumulator(str(out / "tensorboard" / "fashion_cnn"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # class names: 10 distinct rows for 1,000 probe images, so only CKA against MiniLM
    for metric, reference in (("cka", "minilm"), ("cka", "resnet"), ("mutual_knn", "resnet")):
        assert f"alignment/{metric}/{reference}/best" in tags
        for layer in CNN:
            assert f"alignment/{metric}/{reference}/{layer}" in tags
    assert "alignment/mutual_knn/minilm/best" not in tags
    values = [e.value for e in events.Scalars("alignment/cka/resnet/best")]
    assert len(values) >= 3  # start, every 10 of 32 steps, validation end
    assert all(0.0 <= v <= 1.0 + 1e-6 for v in values)
    assert summary["monitor_final"]["alignment/cka/resnet/best"] == pytest.approx(values[-1], abs=1e-6)
    assert "test_acc" in EventAccumulator(str(out / "tensorboard" / "resnet")).Reload().Tags()["scalars"]


def _brute_force_mantel_p(x: np.ndarray, y: np.ndarray, n_permutations: int, seed: int, correlation,
                          with_null: bool = False):
    """Mantel p-value from scratch: relabel the items of ``y`` (orderings drawn as the library draws
    them), recompute its cosine pdist and correlate with ``x``'s each time."""
    gen = torch.Generator().manual_seed(seed)
    dx = pdist(x, "cosine")
    score = correlation(dx, pdist(y, "cosine")).statistic
    null = [correlation(dx, pdist(y[torch.randperm(len(y), generator=gen).numpy()], "cosine")).statistic
            for _ in range(n_permutations)]
    p_value = (1 + sum(v >= score for v in null)) / (1 + n_permutations)
    return (p_value, np.array(null)) if with_null else p_value


def _hide_fashion_mnist(tmp_path: Path, monkeypatch) -> Path:
    import prh_lightning.data.fashion_mnist as fm

    monkeypatch.setenv("PRH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PRH_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-debian")
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


def test_missing_data_gives_instructions_and_exit_2(tmp_path, monkeypatch, capsys):
    empty = _hide_fashion_mnist(tmp_path, monkeypatch)
    out = tmp_path / "out"
    status = recipe.main(["--out", str(out), "--data-dir", str(empty), "--no-download", *TINY])
    err = capsys.readouterr().err
    assert status == 2
    assert "apt-get install dataset-fashion-mnist" in err and "--no-download" in err and str(empty) in err
    assert "Traceback" not in err
    assert not (out / "summary.json").exists() and not (out / "report.md").exists()


@pytest.mark.parametrize("args, message", [
    (["--n-samples", "5"], "--n-samples must be at least 30"),
    (["--resnet-weights", "/no/such/file.pth"], "--resnet-weights must be auto, imagenet, scratch"),
    (["--permutations", "0"], "--permutations must be positive"),
])
def test_bad_options_give_a_message_and_exit_2(tmp_path, capsys, args, message):
    status = recipe.main(["--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err


def test_resnet_weights_auto_falls_back_to_scratch_and_imagenet_fails_clearly(tmp_path, monkeypatch, capsys):
    import prh_lightning.models.resnet as resnet
    from prh_lightning.models.pretrained import PretrainedUnavailable

    def unavailable(allow_download: bool = True):
        raise PretrainedUnavailable("could not get the ResNet-18 ImageNet weights (offline)")

    monkeypatch.setattr(resnet, "imagenet_state_dict", unavailable)
    model, info = recipe.build_resnet(recipe.Settings(out=tmp_path, resnet_weights="auto"))
    assert info["weights"] == "scratch" and "trained from scratch" in info["note"] and info["needs_training"]
    status = recipe.main(["--out", str(tmp_path / "out"), *TINY, "--resnet-weights", "imagenet"])
    err = capsys.readouterr().err
    assert status == 2 and "could not get the ResNet-18 ImageNet weights (offline)" in err
    assert "Traceback" not in err


def test_resnet_weights_from_a_file_get_a_frozen_backbone_and_a_linear_probe(tmp_path):
    from torchvision.models import resnet18

    rgb = resnet18(weights=None)  # RGB weights with a 1000-class head, as ImageNet's file holds
    path = tmp_path / "resnet18-rgb.pth"
    torch.save(rgb.state_dict(), path)
    model, info = recipe.build_resnet(recipe.Settings(out=tmp_path, resnet_weights=str(path), progress=False))
    assert info == {"weights": f"file:{path}", "note": "", "input_size": 64, "needs_training": True,
                    "training": "linear probe (fc)"}
    assert torch.equal(model.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.layer3[1].conv2.weight, rgb.layer3[1].conv2.weight)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
