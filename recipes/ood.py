"""In-distribution vs out-of-distribution vs random-noise images: do vision models stay aligned,
and do the alignment metrics still agree with each other?

For each of three image sets (default: Flickr8k photos as in-distribution for the ImageNet
EfficientNet-Lites, Fashion-MNIST as OOD, uniform pixel noise) every model embeds the images
at a few depths; every metric scores every model pair (best layer pair, the PRH protocol).
Reported per set, with delete-a-group jackknife intervals over images
(:mod:`prh_lightning.functional.jackknife`, clamped to each statistic's range):

- the metric x metric Spearman correlation of the pair scores (the seed's figures) at three
  granularities: model pairs, cross-model layer pairs, cross-model layer pairs of the
  pretrained models only (the one that says nothing about pretrained-vs-random);
- the mean alignment of the pretrained model pairs per metric, and of the random controls;
- per metric, the Spearman correlation of the pair scores between two sets.

Every best-layer-pair score is also calibrated against chance (:func:`prh_lightning.calibrate`,
``--permutations`` seeded shufflings of the images, the best pair of each shuffled matrix as
the null): calibrated score, chance level and p-value per metric, set and model pair.

Claims are judged by :func:`prh_lightning.analysis.claims.verdict` on Bonferroni-corrected
intervals of the differences.

    python recipes/ood.py --out runs/ood --quick
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prh_lightning.analysis.calibrated import draw_permutations
from prh_lightning.recipes import _common as common
from prh_lightning.recipes import _ood_report as report
from prh_lightning.recipes import _vision_set as vs

ALL_METRICS = ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cka", "unbiased_cka", "cknna", "svcca", "rsa")
FULL = {"n_images": 250, "image_size": 224, "jackknife_groups": 20, "blocks": 3,
        "models": "lite0,lite1,lite2,lite0-random,lite1-random", "metrics": ",".join(ALL_METRICS)}
QUICK = {"n_images": 192, "image_size": 128, "jackknife_groups": 12, "blocks": 1,
         "models": "lite0,lite1,lite2,lite0-random", "metrics": "mutual_knn,cycle_knn,lcs_knn,cka,unbiased_cka,cknna"}
SET_ROLES = report.SET_ROLES
GRANULARITIES = report.GRANULARITIES

Scores = dict[str, dict[tuple[int, int], torch.Tensor]]  # metric -> (model i, model j) -> [Li, Lj]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prh-lightning ood", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="small settings (192 images, 128 px, 4 models, 6 fast metrics, 12 jackknife groups)")
    p.add_argument("--in-dist", default="flickr", choices=vs.IMAGE_SETS, help="in-distribution set (default flickr)")
    p.add_argument("--ood", default="fashion-mnist", choices=vs.IMAGE_SETS, help="OOD set (default fashion-mnist)")
    p.add_argument("--noise-set", default="noise", choices=vs.IMAGE_SETS, help="noise set (default uniform pixel noise)")
    p.add_argument("--data-dir", help=f"Flickr8k folder (default ${common.FLICKR_ENV}, else ../shared/data/flickr8k-1024)")
    p.add_argument("--models", help="comma-separated: lite0, lite1, lite2, with '-random' for random-init controls "
                   f"(default {FULL['models']}; quick {QUICK['models']})")
    p.add_argument("--metrics", help=f"comma-separated subset of {', '.join(ALL_METRICS)} (default all; quick {QUICK['metrics']})")
    p.add_argument("--n-images", type=int, help=f"images per set (default {FULL['n_images']}, quick {QUICK['n_images']})")
    p.add_argument("--image-size", type=int, help=f"pixels (default {FULL['image_size']}, quick {QUICK['image_size']})")
    p.add_argument("--blocks", type=int, help="blocks tapped per model, plus the pooled head (default 3, quick 1)")
    p.add_argument("--k", type=int, default=10, help="neighbours for the k-NN metrics and CKNNA (default 10)")
    p.add_argument("--jackknife-groups", type=int, help="image groups of the delete-a-group jackknife (default 20, quick 12)")
    p.add_argument("--permutations", type=int, default=200,
                   help="image shufflings that calibrate every best-layer-pair score against chance (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", default="auto", help=common.THREADS_HELP)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Validated ``(model names, metric names)``; raises :class:`RecipeInputError`."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if any(m not in ALL_METRICS for m in metrics) or len(metrics) < 2:
        raise common.RecipeInputError(f"--metrics needs two or more of {', '.join(ALL_METRICS)}; got {args.metrics!r}")
    if not 1 <= args.k < args.n_images // 2:
        raise common.RecipeInputError(f"--k must be in [1, n_images / 2) so subsets keep enough images; got {args.k}")
    if args.blocks < 1:
        raise common.RecipeInputError(f"--blocks must be >= 1, got {args.blocks}")
    if not 5 <= args.jackknife_groups <= args.n_images // 2:
        raise common.RecipeInputError(f"--jackknife-groups must be in [5, n_images / 2], got {args.jackknife_groups}")
    if args.permutations < 19:
        raise common.RecipeInputError(f"--permutations must be >= 19 (p = 1/(K+1) must reach 0.05), got {args.permutations}")
    names = vs.parse_model_names(args.models)
    if sum(not n.endswith(vs.RANDOM_SUFFIX) for n in names) < 2:
        raise common.RecipeInputError("--models needs at least two pretrained models (lite0, lite1, lite2)")
    return names, metrics


def metric_kwargs(metric: str, k: int) -> dict:
    """``{"k": k}`` for metrics that take a neighbour count, else ``{}``."""
    from prh_lightning.functional import METRICS

    return {"k": k} if "k" in inspect.signature(METRICS[metric]).parameters else {}


# -- statistics -----------------------------------------------------------------------------------
def layer_scores(feats: list[dict[str, torch.Tensor]], metrics: list[str], k: int,
                 rows: torch.Tensor | None = None) -> Scores:
    """Every metric on every layer pair of every model pair, on the images ``rows`` (all when None)."""
    from prh_lightning.alignment import alignment_matrix
    from prh_lightning.functional import AmbiguousNeighbours

    sub = feats if rows is None else [{name: x[rows] for name, x in f.items()} for f in feats]
    pairs = list(itertools.combinations(range(len(feats)), 2))

    def score(m: str, i: int, j: int) -> torch.Tensor:
        try:
            return alignment_matrix(sub[i], sub[j], metric=m, normalize=True, **metric_kwargs(m, k))
        except AmbiguousNeighbours as err:  # neighbour lists through identical rows are refused: undefined, NaN
            UNDEFINED.append(f"{m}, models {i} and {j}: {str(err).split(';')[0]}")
            return torch.full((len(sub[i]), len(sub[j])), float("nan"))

    return {m: {(i, j): score(m, i, j) for i, j in pairs} for m in metrics}


UNDEFINED: list[str] = []  # scores left undefined (NaN) in this run, reported in summary.json


def pair_vectors(scores: Scores, pretrained: list[bool]) -> dict[str, np.ndarray]:
    """Per granularity, ``[metrics, pairs]`` score arrays: best layer pair per model pair
    (``models``), every cross-model layer pair (``layers``), and those of pretrained models only."""
    out = {}
    for by_pair in scores.values():
        out.setdefault("models", []).append([float(s.max()) for s in by_pair.values()])
        out.setdefault("layers", []).append(torch.cat([s.flatten() for s in by_pair.values()]).tolist())
        kept = [s.flatten() for (i, j), s in by_pair.items() if pretrained[i] and pretrained[j]]
        out.setdefault("layers_pretrained", []).append(torch.cat(kept).tolist())
    return {g: np.asarray(v) for g, v in out.items()}


def metric_correlation(vectors: np.ndarray) -> np.ndarray:
    """``[M, M]`` Spearman correlation between metrics over pairs, from ``vectors [M, P]``
    (Pearson on ranks; a metric with a NaN or constant score gets NaN entries only)."""
    from scipy import stats

    with np.errstate(invalid="ignore", divide="ignore"):
        return np.corrcoef(stats.rankdata(vectors, axis=1))


def set_statistics(scores: Scores, pretrained: list[bool]) -> dict[str, np.ndarray]:
    """Every number reported for one image set, as named arrays."""
    vectors = pair_vectors(scores, pretrained)
    is_pre = np.array([pretrained[i] and pretrained[j] for i, j in next(iter(scores.values()))])
    out = {}
    for g in GRANULARITIES:
        corr = metric_correlation(vectors[g])
        out[f"metric_corr_{g}"] = corr
        out[f"metric_agreement_{g}"] = np.array(np.nanmean(corr[~np.eye(len(corr), dtype=bool)]))
    out["model_scores"] = vectors["models"]  # [M, pairs]
    out["pretrained_mean"] = vectors["models"][:, is_pre].mean(axis=1)
    out["control_mean"] = vectors["models"][:, ~is_pre].mean(axis=1) if (~is_pre).any() else np.full(len(vectors["models"]), np.nan)
    return out


def all_statistics(feats: dict[str, list[dict]], metrics: list[str], pretrained: list[bool], k: int,
                   rows: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Statistics of every set and between sets, on the images ``rows`` (all when None)."""
    from scipy import stats

    per_set = {role: set_statistics(layer_scores(f, metrics, k, rows), pretrained) for role, f in feats.items()}
    out = {f"{role}/{name}": v for role, s in per_set.items() for name, v in s.items()}
    ind = per_set["in-distribution"]
    for role in ("ood", "noise"):
        out[f"in-distribution_vs_{role}/rank_corr"] = np.array(
            [stats.spearmanr(x, y).statistic for x, y in zip(ind["model_scores"], per_set[role]["model_scores"])])
        for g in GRANULARITIES:
            key = f"metric_agreement_{g}"
            out[f"in-distribution_minus_{role}/{key}"] = ind[key] - per_set[role][key]
        out[f"in-distribution_minus_{role}/pretrained_mean"] = ind["pretrained_mean"] - per_set[role]["pretrained_mean"]
    return out


def bounds_of(key: str, metrics: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Range of statistic ``key``: correlations in [-1, 1] (differences [-2, 2]); scores in their
    metric's range (differences in ``[low - high, high - low]``)."""
    from prh_lightning.functional.jackknife import metric_range

    diff = "minus" in key
    if "corr" in key or "agreement" in key:
        b = 2.0 if diff else 1.0
        return np.array(-b), np.array(b)
    ranges = np.array([metric_range(m, **metric_kwargs(m, k)) for m in metrics])  # [M, 2]
    low, high = ranges[:, 0], ranges[:, 1]
    if key.endswith("model_scores"):
        return low[:, None], high[:, None]
    return (low - high, high - low) if diff else (low, high)


def jackknife(feats, metrics, pretrained, args, point: dict) -> dict[str, np.ndarray]:
    """Leave-one-group-out replicates of every statistic: ``{key: [G, ...]}``."""
    from prh_lightning.functional.jackknife import jackknife_groups

    n = args.n_images
    reps = []
    for group in jackknife_groups(n, args.jackknife_groups, args.seed):
        keep = torch.ones(n, dtype=torch.bool)
        keep[group] = False
        reps.append(all_statistics(feats, metrics, pretrained, args.k, keep.nonzero().flatten()))
    return {key: np.stack([r[key] for r in reps]) for key in point}


def intervals(point: dict, replicates: dict, metrics: list[str], k: int, confidence: float) -> tuple[dict, dict]:
    """``(low, high)`` of every statistic at ``confidence``, clamped to its range."""
    from prh_lightning.functional.jackknife import jackknife_interval

    low, high = {}, {}
    for key, value in point.items():
        lo_b, hi_b = bounds_of(key, metrics, k)
        raw_low, raw_high, _ = jackknife_interval(value, replicates[key], confidence)
        low[key], high[key] = np.clip(raw_low, lo_b, hi_b), np.clip(raw_high, lo_b, hi_b)
    return low, high


# -- the run --------------------------------------------------------------------------------------
def extract(names, set_names: dict[str, str], args) -> tuple[dict[str, list[dict[str, torch.Tensor]]], dict]:
    """``feats[role][model] = {layer: [n, d]}`` for every set and model, and the data used per set."""
    flickr = common.resolve_flickr_dir(args.data_dir) if "flickr" in set_names.values() else None
    images, data = {}, {}
    for role, name in set_names.items():
        images[role], data[role] = vs.image_set(name, args.n_images, args.image_size, args.seed, flickr)
    feats = {role: [] for role in SET_ROLES}
    for i, name in enumerate(names):
        common.log(f"extracting {name}")
        model = vs.load_vision_model(name, seed=args.seed + i)
        layers = vs.tap_layers(model, args.blocks)
        for role in SET_ROLES:
            feats[role].append(vs.embed(model, images[role], layers, args.batch_size))
    return feats, data


def run(args: argparse.Namespace) -> dict:
    start = time.time()
    UNDEFINED.clear()
    names, metrics = check_args(args)
    set_names = {"in-distribution": args.in_dist, "ood": args.ood, "noise": args.noise_set}
    pretrained = [not n.endswith(vs.RANDOM_SUFFIX) for n in names]
    feats, data = extract(names, set_names, args)
    common.log("scoring")
    point = all_statistics(feats, metrics, pretrained, args.k)
    common.log(f"calibration ({args.permutations} image shufflings per metric, set and model pair)")
    perms = draw_permutations(args.n_images, args.permutations, args.seed)
    calibrated = report.calibrated_scores(feats, metrics, perms, pretrained, lambda m: metric_kwargs(m, args.k))
    common.log(f"jackknife ({args.jackknife_groups} groups)")
    replicates = jackknife(feats, metrics, pretrained, args, point)
    low, high = intervals(point, replicates, metrics, args.k, 0.95)
    claims = report.judge_claims(point, replicates, metrics, lambda conf: intervals(point, replicates, metrics, args.k, conf))
    figures = report.save_figures(args.out, point, low, high, metrics, names, set_names, calibrated)
    seconds = time.time() - start
    pairs = [f"{names[i]} vs {names[j]}" for i, j in itertools.combinations(range(len(names)), 2)]
    summary = {
        "recipe": "ood", "settings": common.settings_dict(args), "data": data,
        "models": names, "metrics": metrics, "sets": set_names, "model_pairs": pairs,
        "statistics": {key: {"value": point[key], "ci_low": low[key], "ci_high": high[key]} for key in point},
        "interval": "95% delete-a-group jackknife (normal approximation, t with G-1 df), clamped to each statistic's range",
        "calibrated": calibrated,
        "calibration": {"n_permutations": args.permutations, "seed": args.seed, "alpha": 0.05,
                        "permutations": "prh_lightning.analysis.draw_permutations(n_images, n_permutations, seed); "
                                        "each reorders the images of every layer of the second model of a pair"},
        "claims": claims, "figures": figures, "seconds": seconds,
        "undefined_scores": sorted(set(UNDEFINED)),
    }
    from prh_lightning.reporting import write_json

    write_json(args.out / "summary.json", summary)
    report.write_report(args.out, point, low, high, claims, metrics, names, set_names, args, seconds, sorted(set(UNDEFINED)),
                        calibrated)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def describe(summary: dict) -> str:
        s = summary["statistics"]
        lines = [f"{role}: metric agreement (pretrained layer pairs) "
                 f"{s[f'{role}/metric_agreement_layers_pretrained']['value']:.3f}" for role in SET_ROLES]
        return "\n".join(lines + [f"wrote {args.out}"])

    return common.run_cli("ood", run, args, describe)


if __name__ == "__main__":
    sys.exit(main())
