"""Alignment at scale: time and peak memory of `alignment_matrix(..., max_memory=...)` at growing n,
against the straightforward computation (whole n x n float32 Gram matrices kept in memory).

Data: random features with planted structure (a low-rank signal shared by every layer of both
models, a random projection per layer, plus noise), d = 768,
5 x 5 layers, rows L2-normalised (the PRH protocol, the default in both columns). Each cell runs
in its own child process, so its peak RSS (ru_maxrss) is its own; "extra" is the peak minus
the RSS after the input features were made (what the computation itself needed).

Straightforward baseline, as far as it fits in memory (it keeps every layer's n x n float32
Gram: 10 x 400 MB at n = 10k, 10 x 3.6 GB at n = 30k, so by default it runs at n = 10k only):
  * mutual_knn: G = x x^T, diagonal -inf, top-k per row, neighbour sets compared per pair;
  * cknna: the same neighbour lists, dense masked kernels and the unbiased HSIC per pair;
  * cka (linear): H K H per layer, Frobenius inner products per pair.

    python benchmarks/scale.py                              # n = 10k, 30k (CPU); baseline at 10k
    python benchmarks/scale.py --sizes 10000 30000 100000 --metrics cka
    python benchmarks/scale.py --sizes 2000 --baseline-max-n 2000 --layers 2   # a quick look
    python benchmarks/scale.py --sizes 100000 --metrics mutual_knn --impls faiss --layers 1   # approximate

``--impls lists`` (with mutual_knn in ``--metrics``): exact neighbour lists once, then the pair
scoring of each k-NN metric (mutual, cycle, LCS, edit) timed alone on them: what each metric adds.

``--impls faiss``: a k-NN metric from FAISS lists (`approximate_alignment_matrix`; HNSW (m = 32)
with ef_search tuned to a sample recall of 0.95, or with ``--faiss-index ivf`` IVF-Flat with
nlist = 4 sqrt(n) and nprobe tuned the same way; the tuned value is printed), with the recall of
the lists against exact float64 search on
1,000 rows (needs faiss-cpu). ``--dtype bfloat16`` halves the input features' memory at n = 1M.

The k-NN metrics (mutual, cycle, LCS, edit) and CKNNA have a straightforward baseline only for
mutual k-NN and CKNNA (cycle, LCS and edit distance run ours only).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import subprocess
import sys
import time

import torch


def features(n: int, d: int, layers: int, seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    signal = torch.randn(n, 32, generator=torch.Generator().manual_seed(1234))  # shared by both models
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        x = signal @ torch.randn(32, d, generator=g)
        for s in range(0, n, 65_536):  # noise added in place, block by block (no second [n, d] copy)
            x[s : s + 65_536] += 2.0 * torch.randn(min(n, s + 65_536) - s, d, generator=g)
        out.append(x.to(dtype))
    return out


# -- the straightforward computation ---------------------------------------------------------


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _knn(gram: torch.Tensor, k: int) -> torch.Tensor:
    return gram.fill_diagonal_(float("-inf")).topk(k, dim=1).indices


def baseline_mutual_knn(xs, ys, k):
    ix = [_knn(_unit(x) @ _unit(x).T, k) for x in xs]
    iy = [_knn(_unit(y) @ _unit(y).T, k) for y in ys]
    out = torch.empty(len(xs), len(ys), dtype=torch.float64)
    for i, a in enumerate(ix):
        for j, b in enumerate(iy):
            out[i, j] = float((a[:, :, None] == b[:, None, :]).any(dim=2).sum()) / a.numel()
    return out


def baseline_cka(xs, ys):
    def centred(x):
        gram = _unit(x) @ _unit(x).T
        return gram - gram.mean(dim=0, keepdim=True) - gram.mean(dim=1, keepdim=True) + gram.mean()

    cx, cy = [centred(x) for x in xs], [centred(y) for y in ys]
    out = torch.empty(len(xs), len(ys), dtype=torch.float64)
    for i, a in enumerate(cx):
        for j, b in enumerate(cy):
            out[i, j] = float((a * b).sum(dtype=torch.float64) / (a.norm() * b.norm()))
    return out


def _hsic_u(p, q):
    n = p.shape[0]
    p, q = p.clone().fill_diagonal_(0), q.clone().fill_diagonal_(0)
    trace = (p * q.T).sum(dtype=torch.float64)
    sums = p.sum(dtype=torch.float64) * q.sum(dtype=torch.float64) / ((n - 1) * (n - 2))
    cross = p.sum(dim=0).double() @ q.sum(dim=1).double()
    return (trace + sums - 2.0 / (n - 2) * cross) / (n * (n - 3))


def baseline_cknna(xs, ys, k):
    def layer(x):
        gram = _unit(x) @ _unit(x).T
        mask = torch.zeros_like(gram, dtype=torch.bool)
        mask[torch.arange(len(x))[:, None], _knn(gram.clone(), k)] = True
        return gram, mask

    lx, ly = [layer(x) for x in xs], [layer(y) for y in ys]
    sim = lambda a, b: _hsic_u(a[0] * (a[1] & b[1]), b[0] * (a[1] & b[1]))  # noqa: E731
    out = torch.empty(len(xs), len(ys), dtype=torch.float64)
    for i, a in enumerate(lx):
        for j, b in enumerate(ly):
            out[i, j] = float(sim(a, b) / math.sqrt(sim(a, a) * sim(b, b)))
    return out


BASELINES = {"mutual_knn": baseline_mutual_knn, "cknna": baseline_cknna, "cka": baseline_cka}
KNN_METRICS = ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cknna")


# -- one cell, in a child process ---------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _lists_once(xs, ys, args):
    """Exact ordered neighbour lists of every layer once (as LCS / edit distance need; the sets
    mutual and cycle k-NN read are the same), then each k-NN metric's pair scoring timed alone:
    the cost a metric adds once the lists exist. Returns the four score matrices and the times."""
    from prh_lightning.functional._plan import LayerContext, get_plan, prepare_layers

    ctx = LayerContext(torch.float32, None, args.n, len(xs) + len(ys), torch.device("cpu"), args.max_memory)
    plan = get_plan("lcs_knn")
    options = plan.bind({"k": args.k})
    t0 = time.perf_counter()
    sx = prepare_layers(plan, xs, [f"x{i}" for i in range(len(xs))], options, True, None, ctx)
    sy = prepare_layers(plan, ys, [f"y{i}" for i in range(len(ys))], options, True, None, ctx)
    times = {"lists": time.perf_counter() - t0}
    scores = []
    for name in KNN_METRICS[:4]:
        metric = get_plan(name)
        t0 = time.perf_counter()
        scores.append(metric.pairs(sx, sy, **metric.bind({"k": args.k})).double())
        times[name] = time.perf_counter() - t0
    return torch.stack(scores), times


def child(args) -> None:
    from prh_lightning import alignment_matrix

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    xs = features(args.n, args.d, args.layers, 0, dtype)
    ys = features(args.n, args.d, args.layers, 1, dtype)
    options = {"k": args.k} if args.metric in KNN_METRICS else {}
    alignment_matrix([x[:64] for x in xs[:1]], [y[:64] for y in ys[:1]], metric=args.metric, **options)  # warm up
    start_rss = _rss()
    t0 = time.perf_counter()
    recall = None
    if args.impl == "ours":
        scores = alignment_matrix(xs, ys, metric=args.metric, max_memory=args.max_memory, **options).double()
    elif args.impl == "faiss":
        import prh_lightning.functional._faiss as approximate
        from prh_lightning.alignment import approximate_alignment_matrix

        approximate.INDEX = args.faiss_index
        logging.basicConfig(level=logging.INFO, format="  %(message)s")  # the tuned nprobe, on stderr
        out = approximate_alignment_matrix(xs, ys, metric=args.metric, **options)
        scores, recall = out.scores, float(torch.cat([out.recall_x, out.recall_y]).min())
    elif args.impl == "lists":
        scores, recall = _lists_once(xs, ys, args)
    else:
        scores = BASELINES[args.metric](xs, ys, **options)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak": peak, "extra": peak - start_rss, "scores": scores.flatten().tolist(), "recall": recall}))


def run_cell(args, metric: str, n: int, impl: str) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--metric", metric, "--n", str(n), "--impl", impl]
    cmd += ["--d", str(args.d), "--layers", str(args.layers), "--k", str(args.k), "--threads", str(args.threads)]
    cmd += ["--max-memory", args.max_memory, "--dtype", args.dtype, "--faiss-index", args.faiss_index]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        print(f"  {metric} n={n} {impl}: failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    for line in out.stderr.splitlines():
        if "IVF-Flat" in line or "HNSW" in line:  # the tuned nprobe / ef_search
            print(line, flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000])
    parser.add_argument("--metrics", nargs="+", default=["mutual_knn", "cknna", "cka"])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--layers", type=int, default=5, help="layers per model (layers x layers pairs)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-memory", default="4GB")
    parser.add_argument("--impls", nargs="+", default=["ours"], choices=["ours", "faiss", "lists"],
                        help="our columns: exact and/or FAISS; lists: exact k-NN lists once, then each k-NN metric's pairs")
    parser.add_argument("--baseline-max-n", type=int, default=10_000, help="largest n for the n x n baseline")
    parser.add_argument("--lists-max-n", type=int, default=30_000, help="largest n for --impls lists")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="input features")
    parser.add_argument("--faiss-index", default="hnsw", choices=["hnsw", "ivf"], help="the FAISS index of --impls faiss")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--metric", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    gib = 2**30
    print(f"d={args.d}, {args.layers} x {args.layers} layers, k={args.k}, max_memory={args.max_memory}, threads={args.threads}, "
          f"inputs {args.dtype} (random features with planted structure)")
    print(f"{'metric':<11} {'n':>7} | {'ours s':>8} {'peak GiB':>8} {'extra GiB':>9} | {'n x n s':>8} {'peak GiB':>8} {'extra GiB':>9} | {'max |diff|':>10}")
    for metric in args.metrics:
        times = []
        for n in args.sizes:
            if "faiss" in args.impls:
                approx = run_cell(args, metric, n, "faiss")
                if approx is not None:
                    print(f"{metric:<11} {n:>7} | faiss {args.faiss_index} {approx['seconds']:.1f} s, peak {approx['peak'] / gib:.2f} GiB, "
                          f"extra {approx['extra'] / gib:.2f} GiB, min recall {approx['recall']:.3f}, "
                          f"scores[:3] {[round(v, 4) for v in approx['scores'][:3]]}", flush=True)
            if "lists" in args.impls and metric == "mutual_knn" and n <= args.lists_max_n:
                once = run_cell(args, metric, n, "lists")
                if once is not None:
                    t = once["recall"]
                    print(f"{'k-NN lists':<11} {n:>7} | once {t['lists']:.1f} s (peak {once['peak'] / gib:.2f} GiB, extra "
                          f"{once['extra'] / gib:.2f} GiB); then pairs: " + ", ".join(f"{m} {t[m]:.2f} s" for m in KNN_METRICS[:4]),
                          flush=True)
            if "ours" not in args.impls:
                continue
            ours = run_cell(args, metric, n, "ours")
            base = run_cell(args, metric, n, "baseline") if n <= args.baseline_max_n and metric in BASELINES else None
            if ours is None:
                continue
            times.append((n, ours["seconds"]))
            cols = f"{ours['seconds']:8.1f} {ours['peak'] / gib:8.2f} {ours['extra'] / gib:9.2f}"
            if base is not None:
                diff = max(abs(a - b) for a, b in zip(ours["scores"], base["scores"]))
                cols += f" | {base['seconds']:8.1f} {base['peak'] / gib:8.2f} {base['extra'] / gib:9.2f} | {diff:10.2e}"
            else:
                cols += f" | {'-':>8} {'-':>8} {'-':>9} | {'-':>10}"
            print(f"{metric:<11} {n:>7} | {cols} | scores[:3] {[round(v, 4) for v in ours['scores'][:3]]}", flush=True)
        for (n0, t0), (n1, t1) in zip(times, times[1:]):
            print(f"{metric:<11} growth exponent n={n0}->{n1}: {math.log(t1 / t0) / math.log(n1 / n0):.2f}")


if __name__ == "__main__":
    main()
