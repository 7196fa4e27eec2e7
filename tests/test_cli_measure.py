"""``prh-lightning measure`` on small synthetic feature files: the calibrated numbers and the
alignment curve it writes equal brute-force recomputations written here (the paper's formulas in
numpy over the same seeded permutations and the same nested subsets), and bad ``--sizes`` are
refused before anything is written."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from reference_formulas import ref_linear_cka, ref_mutual_knn

from prh_lightning.cli import main
from prh_lightning.representations import Representations

N, K_NN, PERMS, SEED = 48, 4, 19, 3
CLIP = 0.95  # measure's default: the paper's outlier clipping
LANGUAGE = {"lmA": ["l0", "l1"], "lmB": ["a"]}
VISION = {"vm": ["v0", "v1"], "vn": ["c"]}


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """``(out, layers)``: feature files of two language and two vision models sharing a latent
    signal at various strengths (one layer pure noise), and the same layers as float64 arrays."""
    out = tmp_path_factory.mktemp("measure")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, 3, generator=g)
    layers = {}
    for modality, models in (("language", LANGUAGE), ("vision", VISION)):
        pool = "avg" if modality == "language" else "none"
        for model, names in models.items():
            feats = {}
            for i, name in enumerate(names):
                d = 5 + i
                signal = 0.0 if name == "v1" else (1.5 + i)
                feats[name] = signal * (z @ torch.randn(3, d, generator=g)) + torch.randn(N, d, generator=g)
            meta = {"pool": pool, "modality": modality, "model": model}
            Representations(feats, sample_ids=range(N), metadata=meta).save(out / "features" / f"synth_n{N}" / f"{model}_pool-{pool}.safetensors")
            layers[model] = {name: feats[name].double().numpy() for name in names}
    return out, layers


def prep(x: np.ndarray, q: float = CLIP) -> torch.Tensor:
    """The paper's preprocessing in float64: clamp at t = mean over samples of the q-quantile of |x_i|, then unit rows."""
    t = np.quantile(np.abs(x), q, axis=1).mean()
    x = np.clip(x, -t, t)
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


def score(metric: str, a: np.ndarray, b: np.ndarray) -> float:
    a, b = prep(a), prep(b)
    return ref_mutual_knn(a, b, K_NN) if metric == "mutual_knn" else ref_linear_cka(a, b)


def paper_calibration(observed: float, null: list[float], alpha: float = 0.05) -> dict:
    """Algorithms 1-2 of Gröger, Wen & Brbić, written out for one score (both metrics have max 1)."""
    K = len(null)
    tau = sorted([observed, *null])[math.ceil((1 - alpha) * (K + 1)) - 1]
    p = (1 + sum(v >= observed - 1e-12 for v in null)) / (K + 1)
    calibrated = min(max((observed - tau) / (1.0 - tau), 0.0), 1.0) if tau < 1 else 0.0
    mean, std = float(np.mean(null)), float(np.std(null, ddof=1))
    return {"raw": observed, "null_mean": mean, "tau": tau, "p_value": p, "calibrated": calibrated,
            "z_score": (observed - mean) / std if std > 0 else 0.0}


def seeded_permutations(n: int, count: int, seed: int) -> list[torch.Tensor]:
    """As measure --help documents: the first ``count`` torch.randperm(n) of a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g) for _ in range(count)]


def holm_loop(p: list[float]) -> list[float]:
    m, order = len(p), sorted(range(len(p)), key=lambda i: p[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def run_measure(out, *args: str) -> dict:
    assert main(["measure", "--out", str(out), "--k", str(K_NN), *args]) == 0
    stem = "cka" if "cka" in args else f"mutual_knn_k{K_NN}"
    folder = out / "alignment" / f"synth_n{N}"
    return {"folder": folder, "stem": stem, "json": json.loads((folder / f"{stem}.json").read_text())}


@pytest.mark.parametrize("metric", ["mutual_knn", "cka"])
def test_calibrated_matrices_equal_the_papers_formulas_over_the_same_permutations(features, metric):
    out, layers = features
    got = run_measure(out, "--metric", metric, "--permutations", str(PERMS), "--seed", str(SEED))
    folder, stem, summary = got["folder"], got["stem"], got["json"]
    npz = np.load(folder / f"{stem}_calibration.npz", allow_pickle=False)
    perms = seeded_permutations(N, PERMS, SEED)
    np.testing.assert_array_equal(npz["permutations"], torch.stack(perms).numpy())
    rows = [(m, name) for m in LANGUAGE for name in LANGUAGE[m]]
    cols = [(m, name) for m in VISION for name in VISION[m]]
    assert summary["layer_names"] == {"language": [f"{m}/{n}" for m, n in rows], "vision": [f"{m}/{n}" for m, n in cols]}
    p_best = []
    for a, lm in enumerate(LANGUAGE):
        for b, vm in enumerate(VISION):
            cells = [(i, j) for i, r in enumerate(rows) if r[0] == lm for j, c in enumerate(cols) if c[0] == vm]
            observed, null = {}, {}
            for i, j in cells:
                x, y = layers[lm][rows[i][1]], layers[vm][cols[j][1]]
                observed[i, j] = score(metric, x, y)
                null[i, j] = [score(metric, x, y[perm.numpy()]) for perm in perms]  # permutation k reorders the vision rows
                want = paper_calibration(observed[i, j], null[i, j])
                for field, value in want.items():
                    # scores match to 1e-6; the z-score divides their differences by the null's spread
                    tol = 1e-6 * (1 + abs(value)) / max(float(np.std(null[i, j], ddof=1)), 1e-3) if field == "z_score" else 1e-6
                    assert npz[f"layer_{field}"][i, j] == pytest.approx(value, rel=1e-6, abs=tol), (field, i, j)
            # the best layer pair: the max is retaken on every permutation (same permutation for every layer)
            best_null = [max(null[c][k] for c in cells) for k in range(PERMS)]
            want = paper_calibration(max(observed.values()), best_null)
            for field, value in want.items():
                tol = 1e-6 * (1 + abs(value)) / max(float(np.std(best_null, ddof=1)), 1e-3) if field == "z_score" else 1e-6
                assert npz[f"best_{field}"][a, b] == pytest.approx(value, rel=1e-6, abs=tol), (field, lm, vm)
                assert summary["calibrated"][field][a][b] == pytest.approx(value, rel=1e-6, abs=tol)
            p_best.append(want["p_value"])
    np.testing.assert_allclose(npz["best_p_holm"].ravel(), holm_loop(p_best), atol=1e-12)
    np.testing.assert_array_equal(np.load(folder / f"{stem}_calibrated.npy", allow_pickle=False), npz["best_calibrated"])
    np.testing.assert_array_equal(np.load(folder / f"{stem}_p_value.npy", allow_pickle=False), npz["best_p_value"])
    np.testing.assert_allclose(np.load(folder / f"{stem}.npy", allow_pickle=False), npz["best_raw"], atol=1e-6)
    np.testing.assert_allclose(np.load(folder / f"{stem}_layers.npy", allow_pickle=False), npz["layer_raw"], atol=1e-6)
    assert summary["calibrated"]["n_permutations"] == PERMS and summary["calibrated"]["seed"] == SEED
    # the layer pairs with a shared signal beat every permutation; the noise layer v1 (column 1) does not
    signal = np.array([True, False, True])
    assert np.allclose(npz["layer_p_value"][:, signal], 1 / (PERMS + 1)) and (npz["layer_calibrated"][:, signal] > 0).all()
    assert (npz["layer_p_value"][:, ~signal] > 0.1).all()


def test_curve_equals_a_recomputation_on_the_same_nested_subsets(features):
    out, layers = features
    sizes, repeats, perms_per_subset = [12, 24, 48], 3, 4
    got = run_measure(out, "--permutations", "0", "--seed", str(SEED), "--sizes", ",".join(map(str, sizes)),
                      "--repeats", str(repeats), "--curve-permutations", str(perms_per_subset))
    folder, stem = got["folder"], got["stem"]
    record = json.loads((folder / f"{stem}_curve.json").read_text())
    subsets = np.load(folder / f"{stem}_curve_subsets.npy", allow_pickle=False)
    assert record["sizes"] == sizes and record["repeats"] == repeats and got["json"]["curve"] == record
    assert "calibrated" not in got["json"] and not (folder / f"{stem}_calibration.npz").exists()
    csv_rows = list(csv.DictReader((folder / f"{stem}_curve.csv").read_text().splitlines()))
    assert len(csv_rows) == len(LANGUAGE) * len(VISION) * len(sizes)
    assert (folder / f"{stem}_curve.png").stat().st_size > 1000
    for pair in record["pairs"]:
        lm, vm = pair["language"], pair["vision"]
        # each model pair's curve starts from a generator seeded with --seed: the orders, then the
        # permutations of each (repeat, size) subset
        g = torch.Generator().manual_seed(SEED)
        orders = [torch.randperm(N, generator=g).numpy() for _ in range(repeats)]
        np.testing.assert_array_equal(subsets, np.stack(orders))
        scores, chance = np.zeros((repeats, len(sizes))), np.zeros((repeats, len(sizes)))
        for r in range(repeats):
            for s, size in enumerate(sizes):
                rows = orders[r][:size]  # nested: every size is a prefix of the same order
                xs = [layers[lm][name][rows] for name in LANGUAGE[lm]]
                ys = [layers[vm][name][rows] for name in VISION[vm]]
                scores[r, s] = max(score("mutual_knn", x, y) for x in xs for y in ys)
                null = []
                for _ in range(perms_per_subset):
                    perm = torch.randperm(size, generator=g).numpy()
                    null.append(max(score("mutual_knn", x, y[perm]) for x in xs for y in ys))
                chance[r, s] = np.mean(null)
        np.testing.assert_allclose(pair["scores"], scores, atol=1e-9)
        np.testing.assert_allclose(pair["mean"], scores.mean(axis=0), atol=1e-9)
        np.testing.assert_allclose(pair["low"], np.quantile(scores, 0.05, axis=0), atol=1e-9)
        np.testing.assert_allclose(pair["high"], np.quantile(scores, 0.95, axis=0), atol=1e-9)
        np.testing.assert_allclose(pair["chance"], chance.mean(axis=0), atol=1e-9)
        for s, size in enumerate(sizes):
            row = next(r for r in csv_rows if (r["language"], r["vision"], r["n"]) == (lm, vm, str(size)))
            assert [float(row[key]) for key in ("mean", "low", "high", "chance")] == pytest.approx(
                [pair["mean"][s], pair["low"][s], pair["high"][s], pair["chance"][s]], abs=1e-12)


def test_a_rerun_replaces_the_files_and_removes_those_it_does_not_write(features):
    out, _ = features
    first = run_measure(out, "--permutations", "3", "--sizes", "24,48", "--repeats", "1", "--curve-permutations", "0")
    folder, stem = first["folder"], first["stem"]
    assert (folder / f"{stem}_curve.csv").exists() and (folder / f"{stem}_calibrated.npy").exists()
    second = run_measure(out, "--permutations", "0")
    left = sorted(p.name for p in folder.glob(f"{stem}*"))
    assert left == sorted(f"{stem}{s}" for s in (".npy", "_indices.npy", "_layers.npy", ".json", ".png"))
    assert sorted(second["json"]["files"]) == ["heatmap", "indices", "json", "layers", "npy"]
    assert not list(folder.glob(".*prh-tmp"))  # atomic writes leave no temporaries


@pytest.mark.parametrize("sizes, status, message", [
    ("24,96", 2, "--sizes asks for 96 samples but there are only n = 48 pairs (in the feature files)"),
    ("4,24", 2, "needs more than 4 samples"),
    ("24,12", 2, "expected increasing sample counts"),
    ("12,,24", 2, "expected increasing sample counts"),
    ("all", 2, "expected increasing sample counts"),
])
def test_bad_sizes_are_refused_before_anything_is_written(tmp_path, features, capsys, sizes, status, message):
    out, _ = features
    folder = tmp_path / "out"
    (folder / "features").mkdir(parents=True)
    (folder / "features" / f"synth_n{N}").symlink_to(out / "features" / f"synth_n{N}")
    assert main(["measure", "--out", str(folder), "--k", str(K_NN), "--sizes", sizes]) == status
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (folder / "alignment").exists()


@pytest.mark.parametrize("args, message", [
    (["--permutations", "-1"], "--permutations must be >= 0"),
    (["--sizes", "24,48", "--repeats", "0"], "--repeats must be >= 1"),
    (["--sizes", "24,48", "--curve-permutations", "-2"], "--curve-permutations must be >= 0"),
])
def test_bad_calibration_and_curve_settings_are_refused(tmp_path, features, capsys, args, message):
    out, _ = features
    folder = tmp_path / "out"
    (folder / "features").mkdir(parents=True)
    (folder / "features" / f"synth_n{N}").symlink_to(out / "features" / f"synth_n{N}")
    assert main(["measure", "--out", str(folder), "--k", str(K_NN), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (folder / "alignment").exists()
