"""Sharded buffered metrics: two CPU processes (gloo), each holding half of n samples, compute
mutual k-NN and RBF CKA with ``sharded=True`` (row panels passed between ranks) and with the
default gathering sync (every rank gathers all n x d features and computes on them).

Prints, per metric and mode: the seconds of ``compute()`` on rank 0, the most bytes one
collective delivered to a rank (a broadcast panel, or all the pieces of an all_gather), and rank
0's peak RSS rise during ``compute()``; then the ratios.
Each (metric, mode) runs in fresh processes so the peaks are its own. Data: random features
with a shared low-rank signal, d = 256 by default. Both modes give the same score (printed).

    python benchmarks/sharded.py                  # n = 8,000
    python benchmarks/sharded.py --n 20000 --d 768
    python benchmarks/sharded.py --world 4          # on a machine with 4+ cores
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2  # --world


def features(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(n, 16, generator=g)
    a = signal @ torch.randn(16, d, generator=g) + torch.randn(n, d, generator=g)
    b = torch.tanh(signal @ torch.randn(16, d, generator=g)) + torch.randn(n, d, generator=g)
    return a, b


def _worker(rank: int, init: str, out: str, metric: str, sharded: bool, n: int, d: int, world: int) -> None:
    from prh_lightning.metrics import CKA, MutualKNN

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    largest = [0]
    originals = {name: getattr(dist, name) for name in ("broadcast", "all_gather")}

    def counting(name):
        def call(*args, **kwargs):
            pieces = [args[0]] if name == "broadcast" else args[0]
            received = sum(t.numel() * t.element_size() for t in pieces)
            largest[0] = max(largest[0], received)
            return originals[name](*args, **kwargs)

        return call

    a, b = features(n, d)
    rows = torch.arange(n)[rank::world]
    make = {"mutual_knn": lambda: MutualKNN(k=10, max_samples=n, sharded=sharded),
            "rbf_cka": lambda: CKA(kernel="rbf", max_samples=n, sharded=sharded)}[metric]
    m = make()
    for chunk in rows.split(512):
        m.update(a[chunk], b[chunk])
    del a, b
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name in originals:
        setattr(dist, name, counting(name))
    start = time.perf_counter()
    value = float(m.compute())
    seconds = time.perf_counter() - start
    rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    torch.save({"value": value, "seconds": seconds, "largest": largest[0], "rss_mb": rise / 1024}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def run(metric: str, sharded: bool, n: int, d: int, world: int) -> dict:
    folder = tempfile.mkdtemp()
    args = (f"{folder}/init", folder, metric, sharded, n, d, world)
    mp.start_processes(_worker, args=args, nprocs=world, start_method="spawn")
    return torch.load(f"{folder}/rank0.pt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--metrics", nargs="+", default=["mutual_knn", "rbf_cka"])
    parser.add_argument("--world", type=int, default=WORLD, help="processes (one thread each)")
    args = parser.parse_args(argv)
    print(f"n = {args.n}, d = {args.d}, {args.world} gloo processes, 1 thread each")
    print(f"{'metric':<12} {'mode':<9} {'score':>10} {'seconds':>8} {'largest received B':>19} {'peak RSS rise MB':>17}")
    for metric in args.metrics:
        results = {}
        for sharded in (True, False):
            r = results[sharded] = run(metric, sharded, args.n, args.d, args.world)
            mode = "sharded" if sharded else "gathered"
            print(f"{metric:<12} {mode:<9} {r['value']:>10.6f} {r['seconds']:>8.2f} {r['largest']:>19,} {r['rss_mb']:>17.0f}")
        s, g = results[True], results[False]
        print(
            f"{metric:<12} sharded / gathered: time {s['seconds'] / g['seconds']:.2f}x, largest received "
            f"{s['largest'] / max(1, g['largest']):.2f}x, peak RSS rise {s['rss_mb'] / max(1.0, g['rss_mb']):.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
