"""Progressive noise injection: how fast does alignment between vision models fall as Gaussian
noise is added to the images, and when does it reach the shuffled-pairing chance level?

N Flickr8k photos are corrupted as ``clip(x + sigma * eps, 0, 1)`` with one fixed
``eps ~ N(0, 1)`` per image and ``sigma`` on a linear grid from 0 to ``--max-sigma``. At
each level every model embeds the images (pooled head features by default) and the mutual
k-NN alignment of every model pair is averaged. Intervals: percentile bootstrap over images
(scipy.stats.bootstrap; duplicated images are never each other's neighbours). Chance band:
the 2.5-97.5% quantiles of the same mean when each model's rows are shuffled independently
(analytic mean ``k / (n - 1)``).

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

if __package__ in (None, ""):  # run as a script: python recipes/noise.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prh_lightning.functional.knn import knn_indices, mutual_knn_from_indices
from prh_lightning.recipes import _vision_set as vs
from prh_lightning.reporting import Report, markdown_table, save_figure, write_json

FULL = {"n_images": 250, "levels": 100, "image_size": 224, "bootstrap": 500, "permutations": 500}
QUICK = {"n_images": 128, "levels": 20, "image_size": 128, "bootstrap": 200, "permutations": 200}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prh-lightning noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="small settings (128 images, 20 levels, 128 px)")
    p.add_argument("--models", default="lite0,lite1,lite2", help="comma-separated: lite0, lite1, lite2 (+ '-random')")
    p.add_argument("--n-images", type=int, help=f"photos (default {FULL['n_images']}, quick {QUICK['n_images']})")
    p.add_argument("--levels", type=int, help=f"noise levels incl. sigma=0 (default {FULL['levels']}, quick {QUICK['levels']})")
    p.add_argument("--max-sigma", type=float, default=2.0, help="largest noise std, pixels in [0, 1] (default 2.0)")
    p.add_argument("--image-size", type=int, help=f"pixels (default {FULL['image_size']}, quick {QUICK['image_size']})")
    p.add_argument("--layer", default="_avg_pooling", help="layer compared (default: the pooled head, 1280-d)")
    p.add_argument("--k", type=int, default=10, help="neighbours for mutual k-NN (default 10)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples over images")
    p.add_argument("--permutations", type=int, help="row shuffles for the chance band")
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
        raise vs.RecipeInputError(f"--levels must be >= 2, got {args.levels}")
    if args.max_sigma <= 0:
        raise vs.RecipeInputError(f"--max-sigma must be > 0, got {args.max_sigma}")
    if not 1 <= args.k < args.n_images - 1:
        raise vs.RecipeInputError(f"--k must be in [1, n_images - 2], got k={args.k}, n_images={args.n_images}")
    if args.bootstrap < 10 or args.permutations < 10:
        raise vs.RecipeInputError("--bootstrap and --permutations must be >= 10")
    return vs.parse_model_names(args.models)


def level_features(models: list[vs.VisionModel], images: torch.Tensor, eps: torch.Tensor,
                   sigmas: np.ndarray, layer: str, batch_size: int) -> list[list[torch.Tensor]]:
    """``feats[level][model]``: ``[n, d]`` features of the noisy images at each sigma."""
    feats = []
    for sigma in sigmas:
        noisy = vs.add_gaussian_noise(images, eps, float(sigma))
        feats.append([vs.embed(m, noisy, [layer], batch_size)[layer] for m in models])
    return feats


def mean_pairwise_mutual(lists: list[torch.Tensor], pairs: list[tuple[int, int]]) -> float:
    """Mean over model pairs of mutual k-NN from ``[n, k]`` neighbour lists."""
    return float(np.mean([float(mutual_knn_from_indices(lists[i], lists[j])) for i, j in pairs]))


def curve(feats: list[list[torch.Tensor]], pairs: list[tuple[int, int]], k: int,
          index: np.ndarray | None = None) -> np.ndarray:
    """``[levels]`` mean pairwise mutual k-NN on the images at ``index`` (all when None).
    Copies of one image in a bootstrap resample are never each other's neighbours."""
    return np.array([mean_pairwise_mutual([vs.neighbour_lists(f, k, index) for f in level], pairs) for level in feats])


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


def first_crossing(values: np.ndarray, upper: np.ndarray) -> int | None:
    """First index ``j`` with ``values[..., j] <= upper[j]`` (None where it never happens);
    for ``values [B, L]`` returns ``[B]`` floats with NaN for never."""
    below = values <= upper
    if values.ndim == 1:
        return int(np.argmax(below)) if below.any() else None
    return np.where(below.any(axis=1), np.argmax(below, axis=1), np.nan)


def analyse(feats, pairs, k: int, sigmas: np.ndarray, args: argparse.Namespace) -> dict:
    """Point curve, bootstrap interval, chance band and crossing level."""
    n = feats[0][0].shape[0]
    point = curve(feats, pairs, k)
    boot = stats.bootstrap(
        (np.arange(n),), lambda idx: curve(feats, pairs, k, idx), vectorized=False,
        n_resamples=args.bootstrap, method="percentile", rng=np.random.default_rng(args.seed),
    )
    null = chance_null(feats, pairs, k, args.permutations, args.seed + 1)
    band_low, band_high = np.percentile(null, [2.5, 97.5], axis=0)
    cross = first_crossing(point, band_high)
    boot_cross = first_crossing(boot.bootstrap_distribution.T, band_high)
    never = float(np.isnan(boot_cross).mean())
    cross_ci = np.nanpercentile(boot_cross, [2.5, 97.5]) if never < 1 else [np.nan, np.nan]
    return {
        "mean_alignment": point,
        "ci_low": boot.confidence_interval.low,
        "ci_high": boot.confidence_interval.high,
        "chance_analytic": k / (n - 1),
        "chance_band_low": band_low,
        "chance_band_high": band_high,
        "p_value_above_chance": (1 + (null >= point).sum(axis=0)) / (1 + len(null)),
        "first_chance_level": cross,
        "first_chance_sigma": None if cross is None else float(sigmas[cross]),
        "first_chance_sigma_ci": [float(sigmas[int(c)]) if np.isfinite(c) else None for c in cross_ci],
        "fraction_resamples_never_at_chance": never,
    }


def curve_figure(sigmas: np.ndarray, res: dict, per_pair: np.ndarray, pair_names: list[str], title: str):
    """Mean alignment with its bootstrap band, per-pair lines and the chance band vs sigma."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.6, 4.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.fill_between(sigmas, res["chance_band_low"], res["chance_band_high"], color="grey", alpha=0.3,
                    label="shuffled-pairing chance (95%)")
    for name, values in zip(pair_names, per_pair):
        ax.plot(sigmas, values, linewidth=0.8, alpha=0.7, label=name)
    ax.fill_between(sigmas, res["ci_low"], res["ci_high"], color="C3", alpha=0.25, label="bootstrap 95% CI")
    ax.plot(sigmas, res["mean_alignment"], color="C3", linewidth=2, label="mean over pairs")
    if res["first_chance_sigma"] is not None:
        ax.axvline(res["first_chance_sigma"], color="k", linestyle="--", linewidth=1, label="reaches chance")
    ax.set_xlabel("noise std sigma (pixels in [0, 1])")
    ax.set_ylabel("mutual k-NN alignment")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return fig


def write_report(out: Path, res: dict, sigmas: np.ndarray, names: list[str], args, seconds: float) -> None:
    """``report.md``: what the curve shows, with its uncertainty, against the seed."""
    a0, lo0, hi0 = res["mean_alignment"][0], res["ci_low"][0], res["ci_high"][0]
    a1, lo1, hi1 = res["mean_alignment"][-1], res["ci_low"][-1], res["ci_high"][-1]
    cross = res["first_chance_sigma"]
    cross_text = (
        f"The mean alignment first falls inside the chance band at sigma = {cross:.3g} "
        f"(level {res['first_chance_level']} of {len(sigmas) - 1}; bootstrap 95% range of that sigma "
        f"{[None if v is None else round(v, 3) for v in res['first_chance_sigma_ci']]}, {100 * res['fraction_resamples_never_at_chance']:.0f}% of resamples never reach it)."
        if cross is not None else
        f"It never falls inside the chance band up to sigma = {sigmas[-1]:.3g} "
        f"(last level p = {res['p_value_above_chance'][-1]:.3g} against the shuffled-pairing null)."
    )
    rows = [[f"{s:.3g}", float(m), float(l), float(h), float(c), float(p)] for s, m, l, h, c, p in zip(
        sigmas, res["mean_alignment"], res["ci_low"], res["ci_high"], res["chance_band_high"], res["p_value_above_chance"])]
    report = Report(
        "Alignment under progressive Gaussian noise",
        f"Models: {', '.join(names)} (EfficientNet-Lite, ImageNet weights unless '-random'); "
        f"{args.n_images} Flickr8k photos at {args.image_size} px; layer `{args.layer}`; "
        f"mutual k-NN with k = {args.k}; {args.levels} levels sigma = 0 .. {args.max_sigma}; "
        f"{args.bootstrap} bootstrap resamples over images, {args.permutations} row shuffles. "
        f"Run time {seconds:.0f} s.",
    )
    report.section(
        "What the data shows",
        f"Clean images: mean pairwise alignment {a0:.3f} (95% CI {lo0:.3f}-{hi0:.3f}); at sigma = "
        f"{sigmas[-1]:.3g}: {a1:.3f} ({lo1:.3f}-{hi1:.3f}); chance k/(n-1) = {res['chance_analytic']:.3f}. "
        + cross_text,
        figure="figures/noise_curve.png",
    )
    report.section(
        "Against the seed",
        "The seed (000/001) ran this experiment on 17 ViTs but reported no result for it, so there is "
        "no number to compare with: **cannot tell**. Its general claim that structure-free inputs break "
        "alignment is tested here: "
        + ("**holds** — alignment falls to the chance band as noise replaces the image."
           if cross is not None else
           "alignment falls with noise but stays above chance up to the largest sigma; the claim "
           "**does not hold in full** on this range (the models still agree on the noisy images, "
           "e.g. on their remaining low-frequency content)."),
    )
    report.section("Numbers per level", "p: permutation p-value that alignment exceeds chance.",
                   table=markdown_table(["sigma", "mean", "CI low", "CI high", "chance 97.5%", "p"], rows))
    report.write(out / "report.md")


def run(args: argparse.Namespace) -> dict:
    """The whole recipe; returns the summary written to ``summary.json``."""
    start = time.time()
    names = check_args(args)
    images = vs.flickr_images(args.n_images, args.image_size, args.seed)
    models = [vs.load_vision_model(name, seed=args.seed + i) for i, name in enumerate(names)]
    if args.layer not in dict(models[0].module.named_modules()):
        raise vs.RecipeInputError(f"--layer {args.layer!r} is not a module of the EfficientNets "
                                  f"(e.g. _avg_pooling, _blocks.15, _conv_head)")
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(args.seed + 7))
    sigmas = np.linspace(0.0, args.max_sigma, args.levels)
    pairs = list(itertools.combinations(range(len(models)), 2))
    pair_names = [f"{names[i]} vs {names[j]}" for i, j in pairs]
    vs.log(f"extracting {len(sigmas)} noise levels")
    feats = level_features(models, images, eps, sigmas, args.layer, args.batch_size)
    vs.log("bootstrap and chance band")
    res = analyse(feats, pairs, args.k, sigmas, args)
    per_pair = per_pair_curves(feats, pairs, args.k)
    out = args.out
    save_figure(curve_figure(sigmas, res, per_pair, pair_names, "Alignment vs Gaussian noise"),
                out / "figures" / "noise_curve.png")
    seconds = time.time() - start
    summary = {
        "recipe": "noise",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": names,
        "pairs": pair_names,
        "sigmas": sigmas,
        "per_pair_alignment": dict(zip(pair_names, per_pair)),
        **res,
        "seconds": seconds,
    }
    write_json(out / "summary.json", summary)
    write_report(out, res, sigmas, names, args, seconds)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def describe(summary: dict) -> str:
        cross = summary["first_chance_sigma"]
        return (f"noise: clean alignment {summary['mean_alignment'][0]:.3f}, reaches chance at "
                f"sigma = {cross if cross is not None else 'never'}; wrote {args.out}")

    return vs.run_cli("noise", run, args, describe)

if __name__ == "__main__":
    sys.exit(main())
