"""The training-dynamics recipe: tiny real Lightning runs with RepresentationRecorder, and the
online (Hugging Face revisions) path failing offline with a message."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prh_lightning.recipes import training_dynamics as td
from prh_lightning.representations import Representations

TINY = ["--archs", "fashion_cnn", "--seeds", "2", "--max-steps", "20", "--every", "2",
        "--probe-size", "64", "--bootstrap", "10", "--k", "5", "--batch-size", "32", "--permutations", "39", "--threads", "1"]


def _mutual_knn(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Brute force: cosine neighbours of every row (itself excluded), mean shared fraction."""
    def lists(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]
    la, lb = lists(a), lists(b)
    return float(np.mean([len(set(u) & set(v)) / k for u, v in zip(la, lb)]))


@pytest.mark.slow
def test_tiny_runs_record_and_compare_checkpoints(tmp_path):
    assert td.main(["--out", str(tmp_path), *TINY]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = list(range(0, 21, 2))  # step 0 (initial state) + every 2 steps
    assert summary["runs"] == ["fashion_cnn-seed0", "fashion_cnn-seed1"]
    between = summary["between_runs"]
    assert between["steps"] == steps
    values = np.array(between["per_pair"]["fashion_cnn-seed0 vs fashion_cnn-seed1"])
    assert values.shape == (11,) and np.all((values >= 0) & (values <= 1))
    assert between["mean"] == pytest.approx(values.tolist())  # one pair: the mean is that pair
    # best layer pair is at least the compared (avgpool) layer pair
    assert np.all(np.array(between["best_layer_pair"]["fashion_cnn-seed0 vs fashion_cnn-seed1"]) >= values - 1e-6)
    for name in summary["runs"]:
        drift = summary["drift"][name]
        assert drift["steps"] == steps
        assert drift["vs_final"][-1] == pytest.approx(1.0)  # the final checkpoint against itself
        files = sorted((tmp_path / "representations" / name).glob("*.safetensors"))
        assert len(files) == 10
        reps = Representations.load(files[-1])
        assert reps.layers == ["conv1", "conv2", "avgpool"] and reps.n == 64
    # the two seeds start from different random weights: their initial features differ
    first = [Representations.load(sorted((tmp_path / "representations" / n).glob("*"))[0])["avgpool"] for n in summary["runs"]]
    assert not torch.allclose(first[0], first[1])
    for fig in ("between_runs.png", "drift.png"):
        assert (tmp_path / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "report.md").read_text()
    assert "cannot be checked" in report and "Bonferroni" in report
    change = summary["change"]
    low, high = change["difference_ci"]
    assert low <= change["difference"] <= high and change["confidence"] == pytest.approx(0.975)
    verdicts = {change["more_alike_at_end"], change["less_alike_at_end"]}
    assert verdicts in ({"cannot tell"}, {"holds", "does not hold"})
    assert summary["data"]["n_items"] == 20 * 32 + 64 and len(summary["data"]["sha256"]) == 64
    _check_calibration(tmp_path, summary, report)


def _check_calibration(out, summary: dict, report: str) -> None:
    """The last step's calibrated avgpool score against a brute-force mutual k-NN over the same
    seeded permutations (torch.randperm, seed 0) and the paper's formulas; the report reads it."""
    import math

    from prh_lightning.analysis.calibrated import above_chance_phrase

    pair = "fashion_cnn-seed0 vs fashion_cnn-seed1"
    cal = summary["calibrated_between_runs"]
    assert cal["steps"] == summary["between_runs"]["steps"] and cal["n_permutations"] == 39
    compared = cal["compared"][pair]
    one = 1 / (64 * 5) + 1e-6  # one neighbour: between_runs ranks float32 rows, calibration float64 ones
    assert compared["raw"] == pytest.approx(summary["between_runs"]["per_pair"][pair], abs=one)
    assert cal["best_layer_pair"][pair]["raw"] == pytest.approx(summary["between_runs"]["best_layer_pair"][pair], abs=one)
    a, b = (Representations.load(sorted((out / "representations" / n).glob("*.safetensors"))[-1])["avgpool"].double().numpy()
            for n in summary["runs"])
    gen = torch.Generator().manual_seed(0)
    perms = [torch.randperm(64, generator=gen).numpy() for _ in range(39)]
    observed = _mutual_knn(a, b, 5)
    null = np.array([_mutual_knn(a, b[p], 5) for p in perms])
    tau = np.sort(np.concatenate([[observed], null]))[math.ceil(0.95 * 40) - 1]
    p_value = (1 + np.sum(null >= observed)) / 40
    calibrated = min(max((observed - tau) / (1 - tau), 0.0), 1.0)
    assert compared["raw"][-1] == pytest.approx(observed, abs=1e-9)
    assert compared["null_mean"][-1] == pytest.approx(null.mean(), abs=1e-9)
    assert (compared["tau"][-1], compared["p_value"][-1], compared["calibrated"][-1]) == pytest.approx((tau, p_value, calibrated), abs=1e-9)
    phrase = above_chance_phrase(observed, calibrated, p_value, "mutual k-NN", p_label="Holm p")  # one pair: Holm p = p
    assert f"{pair}: {phrase}" in report


def test_hf_revisions_offline_fail_with_a_message(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    code = td.main(["--out", str(tmp_path / "out"), "--hf-models", "EleutherAI/pythia-70m",
                    "--revisions", "step1000,step2000", "--texts", "8"])
    assert code == 2
    err = capsys.readouterr().err
    assert "EleutherAI/pythia-70m" in err and "internet" in err


@pytest.mark.parametrize(
    "extra, message",
    [(["--archs", "vit"], "--archs"), (["--seeds", "1"], "two runs"), (["--every", "15"], "--max-steps"),
     (["--permutations", "5"], "--permutations"),
     (["--revisions", "step1"], "go together")],
)
def test_bad_input_gives_a_message(tmp_path, capsys, extra, message):
    assert td.main(["--out", str(tmp_path), *TINY, *extra]) == 2
    assert message in capsys.readouterr().err


def test_revision_step():
    assert td.revision_step("step143000") == 143000
    with pytest.raises(ValueError, match="step number"):
        td.revision_step("main")
