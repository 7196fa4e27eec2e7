"""Cost of calibration: `calibrate` (K permutations of a 13 x 13 layer matrix) against the raw
`alignment_matrix` and against the per-pair loop a generic calibration package would run
(the similarity function called K times for each layer pair).

Both our sides are warmed up once and timed as the best of ``--repeat`` runs. The per-pair loop
is timed on ``--loop-pairs`` pairs (each with all K permutations) and scaled to all pairs, since
running it on all 169 pairs takes hours; the printout says so.

    python benchmarks/calibration.py                     # n=1024, d=768, 13 x 13, K=200, CPU
    python benchmarks/calibration.py --metrics cka --n 512

``--null-only`` times the permutation null alone (``permuted_scores`` of the metric's plan, as
``calibrate`` runs it) under ``--max-memory`` and prints this process's peak RSS before and after
it; run one configuration per process, since the peak is a high-water mark:

    python benchmarks/calibration.py --null-only --metrics cka                     # n=1024, 13 x 13
    python benchmarks/calibration.py --null-only --metrics cka --n 8000 --layers 5 --permutations 20 --max-memory 2GB
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from prh_lightning import alignment_matrix, calibrate
from prh_lightning.functional import METRICS
from prh_lightning.functional._plan import LayerContext, check_layers, get_plan, permuted_scores, prepare_layers


def synthetic_layers(count: int, n: int, d: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    layers = []
    for _ in range(count):
        x = torch.tanh(x @ (torch.randn(d, d, generator=g) / d**0.5)) + 0.3 * torch.randn(n, d, generator=g)
        layers.append(x)
    return layers


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_null(xs, ys, perms, metric: str, max_memory: str | None, kw: dict) -> None:
    """One permutation null as calibrate runs it (identity included), timed once after the layers
    are prepared, with the peak RSS before and after."""
    plan = get_plan(metric)
    options = plan.bind(kw)
    n, dtype, device = check_layers(xs, ys, [f"x{i}" for i in range(len(xs))], [f"y{i}" for i in range(len(ys))])
    ctx = LayerContext(dtype, None, n, len(xs) + len(ys), device, max_memory)
    sx = prepare_layers(plan, xs, [f"x{i}" for i in range(len(xs))], options, True, None, ctx)
    sy = prepare_layers(plan, ys, [f"y{i}" for i in range(len(ys))], options, True, None, ctx)
    before = peak_rss_mb()
    start = time.perf_counter()
    null = permuted_scores(plan, sx, sy, perms, options)
    elapsed = time.perf_counter() - start
    print(f"{metric} null: {tuple(null.shape)} in {elapsed:.2f} s, max_memory={max_memory}; "
          f"peak RSS {before:.0f} MB before the null, {peak_rss_mb():.0f} MB after", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=13)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--permutations", type=int, default=200)
    p.add_argument("--metrics", nargs="+", default=["mutual_knn", "cka", "cknna"])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--loop-pairs", type=int, default=1, help="pairs timed for the per-pair loop (scaled to all)")
    p.add_argument("--null-only", action="store_true", help="time the permutation null alone, with peak RSS")
    p.add_argument("--max-memory", default=None, help="max_memory for --null-only, e.g. 2GB")
    args = p.parse_args()
    xs, ys = synthetic_layers(args.layers, args.n, args.d, 0), synthetic_layers(args.layers, args.n, args.d, 1)
    perms = torch.stack([torch.randperm(args.n, generator=torch.Generator().manual_seed(i)) for i in range(args.permutations)])
    if args.null_only:
        print(f"{args.layers} x {args.layers} layers, n={args.n}, d={args.d}, K={args.permutations}, threads={torch.get_num_threads()}")
        for metric in args.metrics:
            kw = {"k": 10} if metric in ("mutual_knn", "cknna") else {}
            time_null(xs, ys, torch.cat([torch.arange(args.n)[None], perms]), metric, args.max_memory, kw)
        return
    pairs = args.layers * args.layers
    print(f"{args.layers} x {args.layers} layers, n={args.n}, d={args.d}, K={args.permutations}, "
          f"threads={torch.get_num_threads()}, best of {args.repeat} warm runs")
    print(f"{'metric':<12}{'raw [s]':>9}{'calibrated [s]':>16}{'ratio':>8}{'per-pair loop [s]':>19}{'speed-up':>10}")
    for metric in args.metrics:
        kw = {"k": 10} if metric in ("mutual_knn", "cknna") else {}
        alignment_matrix(xs[:2], ys[:2], metric=metric, **kw)
        calibrate(xs[:2], ys[:2], metric, permutations=perms[:2], **kw)
        t_raw = best_of(lambda: alignment_matrix(xs, ys, metric=metric, **kw), args.repeat)
        t_cal = best_of(lambda: calibrate(xs, ys, metric, permutations=perms, **kw), args.repeat)
        fn = METRICS[metric]
        fn(xs[0], ys[0], **kw)
        start = time.perf_counter()
        for i in range(args.loop_pairs):
            a, b = xs[i % args.layers], ys[(i * 5) % args.layers]
            fn(a, b, **kw)
            for perm in perms:
                fn(a, b[perm], **kw)
        t_loop = (time.perf_counter() - start) / args.loop_pairs * pairs
        print(f"{metric:<12}{t_raw:>9.2f}{t_cal:>16.2f}{t_cal / t_raw:>7.1f}x{t_loop:>19.0f}{t_loop / t_cal:>9.0f}x", flush=True)
    print(f"(per-pair loop timed on {args.loop_pairs} pair(s) with all {args.permutations} permutations, scaled to {pairs} pairs)")


if __name__ == "__main__":
    main()
