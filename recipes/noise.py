"""Progressive noise injection: how fast does alignment between vision models fall as Gaussian
noise is added to the images, and does it reach the shuffled-pairing chance level?

N Flickr8k photos are corrupted as ``clip(x + sigma * eps, 0, 1)`` with one fixed
``eps ~ N(0, 1)`` per image and ``sigma`` on a linear grid from 0 to ``--max-sigma``. At
each level every model embeds the images (pooled head features by default) and the mutual
k-NN alignment of every model pair is averaged. Intervals: percentile bootstrap over images
(scipy.stats.bootstrap; duplicated images are never each other's neighbours), the same
resamples at every level so differences between levels are paired. Chance: the same mean when
each model's rows are shuffled independently (analytic mean ``k / (n - 1)``); per level a
permutation p-value, Holm-corrected over the levels, and the calibrated score of Gröger, Wen &
Brbić (``clamp((score - tau) / (1 - tau), 0, 1)``, tau the null's 95% quantile); each model pair
calibrated on its own with :func:`prh_lightning.calibrate`.

    python recipes/noise.py --out runs/noise --quick
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from prh_lightning.analysis.calibrated import calibrate_statistic, calibrated_model_pairs, draw_permutations
from prh_lightning.analysis.claims import corrected_confidence, holm, verdict, verdict_from_p
from prh_lightning.analysis.dynamics import resampled_mutual_knn
from prh_lightning.functional.knn import knn_indices, mutual_knn_from_indices
from prh_lightning.recipes import _common as common
from prh_lightning.recipes import _vision_set as vs
from prh_lightning.recipes._noise_report import curve_figure, write_report
from prh_lightning.reporting import save_figure, write_json

# Holm over L levels can only reach p < 0.05 when the smallest permutation p, 1 / (P + 1), is below
# 0.05 / L: P >= 20 L (checked in check_args).
FULL = {"n_images": 250, "levels": 100, "image_size": 224, "bootstrap": 500, "permutations": 4000}
QUICK = {"n_images": 128, "levels": 20, "image_size": 128, "bootstrap": 200, "permutations": 1000}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prh-lightning noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="small settings (128 images, 20 levels, 128 px)")
    p.add_argument("--data-dir", help=f"Flickr8k folder (default ${common.FLICKR_ENV}, else ../shared/data/flickr8k-1024)")
    p.add_argument("--threads", default="auto", help=common.THREADS_HELP)
    p.add_argument("--models", default="lite0,lite1,lite2", help="comma-separated: lite0, lite1, lite2 (+ '-random')")
    p.add_argument("--n-images", type=int, help=f"photos (default {FULL['n_images']}, quick {QUICK['n_images']})")
    p.add_argument("--levels", type=int, help=f"noise levels incl. sigma=0 (default {FULL['levels']}, quick {QUICK['levels']})")
    p.add_argument("--max-sigma", type=float, default=2.0, help="largest noise std, pixels in [0, 1] (default 2.0)")
    p.add_argument("--image-size", type=int, help=f"pixels (default {FULL['image_size']}, quick {QUICK['image_size']})")
    p.add_argument("--layer", default="_avg_pooling", help="layer compared (default: the pooled head, 1280-d)")
    p.add_argument("--k", type=int, default=10, help="neighbours for mutual k-NN (default 10)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples over images")
    p.add_argument("--permutations", type=int, help="row shuffles for the chance band and the calibration "
                   "(default 4000, quick 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args: argparse.Namespace) -> list[str]:
    """Validated model names; raises :class:`RecipeInputError` on impossible settings."""
    if args.levels < 2:
        raise common.RecipeInputError(f"--levels must be >= 2, got {args.levels}")
    if args.max_sigma <= 0:
        raise common.RecipeInputError(f"--max-sigma must be > 0, got {args.max_sigma}")
    if not 1 <= args.k < args.n_images - 1:
        raise common.RecipeInputError(f"--k must be in [1, n_images - 2], got k={args.k}, n_images={args.n_images}")
    if (args.permutations + 1) * 0.05 <= args.levels:
        raise common.RecipeInputError(
            f"--permutations {args.permutations} is too few for {args.levels} levels: the smallest Holm-adjusted p-value "
            f"would be {args.levels}/{args.permutations + 1} >= 0.05, so no level could be told apart from chance; "
            f"use at least {20 * args.levels} permutations")
    if args.bootstrap < 10 or args.permutations < 10:
        raise common.RecipeInputError("--bootstrap and --permutations must be >= 10")
    return vs.parse_model_names(args.models)


def level_features(models: list, images: torch.Tensor, eps: torch.Tensor,
                   sigmas: np.ndarray, layer: str, batch_size: int) -> list[list[torch.Tensor]]:
    """``feats[level][model]``: ``[n, d]`` features of the noisy images at each sigma."""
    feats = []
    for sigma in sigmas:
        noisy = vs.add_gaussian_noise(images, eps, float(sigma))
        feats.append([torch.nn.functional.normalize(vs.embed(m, noisy, [layer], batch_size)[layer], dim=1) for m in models])
    return feats


def mean_pairwise_mutual(lists: list[torch.Tensor], pairs: list[tuple[int, int]]) -> float:
    """Mean over model pairs of mutual k-NN from ``[n, k]`` neighbour lists."""
    return float(np.mean([float(mutual_knn_from_indices(lists[i], lists[j])) for i, j in pairs]))


def curve(feats: list[list[torch.Tensor]], pairs: list[tuple[int, int]], k: int,
          index: np.ndarray | None = None) -> np.ndarray:
    """``[levels]`` mean pairwise mutual k-NN on the images at ``index`` (all when None).
    Copies of one image in a bootstrap resample are never each other's neighbours."""
    idx = None if index is None else torch.as_tensor(index, dtype=torch.long)
    return np.array([np.mean([resampled_mutual_knn(level[i], level[j], k, idx) for i, j in pairs]) for level in feats])


def per_pair_curves(feats: list[list[torch.Tensor]], pairs: list[tuple[int, int]], k: int) -> np.ndarray:
    """``[pairs, levels]`` mutual k-NN of each model pair."""
    out = np.zeros((len(pairs), len(feats)))
    for j, level in enumerate(feats):
        lists = [knn_indices(f, k) for f in level]
        for p, (a, b) in enumerate(pairs):
            out[p, j] = float(mutual_knn_from_indices(lists[a], lists[b]))
    return out


def chance_null(feats: list[list[torch.Tensor]], pairs: list[tuple[int, int]], k: int,
                n_perm: int, seed: int) -> np.ndarray:
    """``[n_perm, levels]`` mean pairwise mutual k-NN after shuffling each model's rows
    independently (the shuffled-pairing null). Shuffling rows relabels neighbour lists."""
    rng = np.random.default_rng(seed)
    base = [[knn_indices(f, k) for f in level] for level in feats]
    n = base[0][0].shape[0]
    out = np.zeros((n_perm, len(feats)))
    for b in range(n_perm):
        perms = [torch.from_numpy(rng.permutation(n)) for _ in base[0]]
        for j, lists in enumerate(base):
            shuffled = [torch.argsort(p)[idx[p]] for p, idx in zip(perms, lists)]
            out[b, j] = mean_pairwise_mutual(shuffled, pairs)
    return out


def first_at_chance(p_adjusted: np.ndarray, alpha: float = 0.05) -> int | None:
    """First level whose alignment is not distinguishable from chance (Holm-adjusted p >= alpha), or None."""
    at = np.flatnonzero(np.asarray(p_adjusted) >= alpha)
    return int(at[0]) if at.size else None


def analyse(feats, pairs, k: int, sigmas: np.ndarray, args: argparse.Namespace) -> dict:
    """Point curve, bootstrap interval, chance band, Holm-corrected p-values, and the two claims."""
    n = feats[0][0].shape[0]
    point = curve(feats, pairs, k)
    boot = stats.bootstrap(
        (np.arange(n),), lambda idx: curve(feats, pairs, k, idx), vectorized=False,
        n_resamples=args.bootstrap, method="percentile", rng=np.random.default_rng(args.seed),
    )
    null = chance_null(feats, pairs, k, args.permutations, args.seed + 1)
    band_low, band_high = np.percentile(null, [2.5, 97.5], axis=0)
    cal = calibrate_statistic(point, null, high=1.0)  # the paper's formulas on the mean's own null
    p_raw = cal["p_value"]
    p_holm = holm(p_raw)
    at_chance = first_at_chance(p_holm)
    # claim "alignment falls from clean to the largest sigma": paired bootstrap of the difference,
    # Bonferroni over the two claims judged (falls; still above chance at the largest sigma)
    conf = corrected_confidence(0.95, 2)
    diff = boot.bootstrap_distribution[0] - boot.bootstrap_distribution[-1]
    d_low, d_high = np.quantile(diff, [(1 - conf) / 2, (1 + conf) / 2])
    return {
        "mean_alignment": point,
        "ci_low": boot.confidence_interval.low,
        "ci_high": boot.confidence_interval.high,
        "chance_analytic": k / (n - 1),
        "chance_band_low": band_low,
        "chance_band_high": band_high,
        "chance_null_mean": cal["null_mean"],
        "threshold_tau": cal["tau"],
        "calibrated_alignment": cal["calibrated"],
        "p_value_above_chance": p_raw,
        "p_value_above_chance_holm": p_holm,
        "first_chance_level": at_chance,
        "first_chance_sigma": None if at_chance is None else float(sigmas[at_chance]),
        "claims": [
            {"id": "falls", "text": "alignment is lower at the largest sigma than on clean images",
             "value": float(point[0] - point[-1]), "low": float(d_low), "high": float(d_high), "confidence": conf,
             "verdict": verdict(d_low, d_high, "greater")},
            {"id": "above_chance_at_max_sigma", "text": "alignment at the largest sigma is above chance",
             "p_holm": float(p_holm[-1]), "verdict": verdict_from_p(float(p_holm[-1]), alpha=(1 - conf))},
        ],
    }


def pair_calibration(feats, pairs: list[tuple[int, int]], names: list[str], k: int, permutations) -> dict[str, dict]:
    """``{"a vs b": {field: [levels]}}``: each model pair at each level, calibrated with
    :func:`prh_lightning.calibrate` (the second model's rows reordered by ``permutations``)."""
    per_level = [calibrated_model_pairs([[f] for f in level], "mutual_knn", permutations, pairs=pairs, k=k) for level in feats]
    return {f"{names[i]} vs {names[j]}": {key: [lv[key][p] for lv in per_level] for key in per_level[0]}
            for p, (i, j) in enumerate(pairs)}


def run(args: argparse.Namespace) -> dict:
    """The whole recipe; returns the summary written to ``summary.json``."""
    start = time.time()
    names = check_args(args)
    images, data = vs.flickr_images(common.resolve_flickr_dir(args.data_dir), args.n_images, args.image_size, args.seed)
    models = [vs.load_vision_model(name, seed=args.seed + i) for i, name in enumerate(names)]
    if args.layer not in dict(models[0].model.named_modules()):
        raise common.RecipeInputError(f"--layer {args.layer!r} is not a module of the EfficientNets "
                                      f"(e.g. _avg_pooling, _blocks.15, _conv_head)")
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(args.seed + 7))
    sigmas = np.linspace(0.0, args.max_sigma, args.levels)
    pairs = list(itertools.combinations(range(len(models)), 2))
    pair_names = [f"{names[i]} vs {names[j]}" for i, j in pairs]
    common.log(f"extracting {len(sigmas)} noise levels")
    feats = level_features(models, images, eps, sigmas, args.layer, args.batch_size)
    common.log("bootstrap and chance band")
    res = analyse(feats, pairs, args.k, sigmas, args)
    per_pair = per_pair_curves(feats, pairs, args.k)
    pair_cal = pair_calibration(feats, pairs, names, args.k, draw_permutations(len(images), args.permutations, args.seed + 2))
    save_figure(curve_figure(sigmas, res, per_pair, pair_names, "Alignment vs Gaussian noise", pair_cal),
                args.out / "figures" / "noise_curve.png")
    seconds = time.time() - start
    summary = {"recipe": "noise", "settings": common.settings_dict(args), "data": data, "models": names,
               "pairs": pair_names, "sigmas": sigmas, "per_pair_alignment": dict(zip(pair_names, per_pair)),
               "per_pair_calibrated": pair_cal, "calibration": {
                   "n_permutations": args.permutations, "seed": args.seed + 2, "alpha": 0.05, "permutations":
                   "prh_lightning.analysis.draw_permutations(n_images, n_permutations, seed) reorder the second model "
                   "of a pair (per_pair_calibrated); the mean's null shuffles every model (chance_null)"},
               **res, "seconds": seconds}
    write_json(args.out / "summary.json", summary)
    write_report(args.out, res, sigmas, names, args, seconds, pair_cal)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def describe(summary: dict) -> str:
        at = summary["first_chance_sigma"]
        return (f"noise: clean alignment {summary['mean_alignment'][0]:.3f}; first level not distinguishable from "
                f"chance: sigma = {at if at is not None else 'none'}; wrote {args.out}")

    return common.run_cli("noise", run, args, describe)


if __name__ == "__main__":
    sys.exit(main())
