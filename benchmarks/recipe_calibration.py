"""What calibration adds to the recipes: `calibrate` at each recipe's default shapes against the
raw `alignment_matrix` of the same layers, both timed in this process (best of ``--repeat``).

- fashion-mnist: FashionCNN 3 x ResNet-18 6 layers, n = 1,000, the 4 heatmaps, K = 200;
- ood (full): one model pair, 4 x 4 layers, n = 250, the 9 metrics, K = 200 (the recipe does
  this for 10 pairs x 3 sets);
- training-dynamics (full): one run pair at one step, 6 x 6 layers, n = 1,000, mutual k-NN.

Features are synthetic (random layers of the recipe's widths); costs depend on shapes only.

    python benchmarks/recipe_calibration.py
    python benchmarks/recipe_calibration.py --only fashion --repeat 3
"""

from __future__ import annotations

import argparse
import time

import torch

from prh_lightning import alignment_matrix, calibrate
from prh_lightning.analysis.calibrated import draw_permutations

KNN = ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cknna")


def layers(widths: list[int], n: int, gen: torch.Generator) -> list[torch.Tensor]:
    shared = torch.randn(n, 16, generator=gen)
    return [shared @ torch.randn(16, d, generator=gen) + torch.randn(n, d, generator=gen) for d in widths]


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cases(gen: torch.Generator):
    fashion = (layers([32, 64, 64], 1000, gen), layers([64, 64, 128, 256, 512, 512], 1000, gen))
    yield "fashion", "rsa (euclidean)", fashion, {"distance": "euclidean", "normalize": False}
    yield "fashion", "rsa (cosine)", fashion, {"distance": "cosine", "normalize": False}
    yield "fashion", "cka", fashion, {}
    yield "fashion", "mutual_knn", fashion, {"k": 10}
    ood = (layers([40, 80, 112, 1280], 250, gen), layers([40, 80, 112, 1280], 250, gen))
    for metric in ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cka", "unbiased_cka", "cknna", "svcca", "rsa"):
        yield "ood", metric, ood, ({"k": 10} if metric in KNN else {})
    yield "dynamics", "mutual_knn", (layers([64] * 6, 1000, gen), layers([64] * 6, 1000, gen)), {"k": 10}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--permutations", type=int, default=200)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--only", choices=("fashion", "ood", "dynamics"), help="one recipe's shapes")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    totals: dict[str, list[float]] = {}
    print(f"K = {args.permutations}, {torch.get_num_threads()} threads; seconds (best of {args.repeat})")
    print(f"{'recipe':<10} {'metric':<18} {'raw':>8} {'calibrated':>11} {'ratio':>7}")
    for recipe, label, (xs, ys), options in cases(gen):
        if args.only and recipe != args.only:
            continue
        metric = label.split(" ")[0]
        perms = draw_permutations(xs[0].shape[0], args.permutations, seed=0)
        run_raw = lambda: alignment_matrix(xs, ys, metric=metric, **options)  # noqa: E731
        run_cal = lambda: calibrate(xs, ys, metric, permutations=perms, **options)  # noqa: E731
        run_raw(), run_cal()  # warm-up
        raw, cal = best_of(run_raw, args.repeat), best_of(run_cal, args.repeat)
        totals.setdefault(recipe, [0.0, 0.0])
        totals[recipe][0] += raw
        totals[recipe][1] += cal
        print(f"{recipe:<10} {label:<18} {raw:8.3f} {cal:11.3f} {cal / raw:6.1f}x", flush=True)
    for recipe, (raw, cal) in totals.items():
        print(f"{recipe:<10} {'all of the above':<18} {raw:8.3f} {cal:11.3f} {cal / raw:6.1f}x")


if __name__ == "__main__":
    main()
