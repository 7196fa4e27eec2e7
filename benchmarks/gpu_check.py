"""A few-minute check for a lent GPU: exact alignment at n = 100,000 with 13 x 13 layers.

Runs `alignment_matrix` for exact mutual k-NN, linear CKA (feature-space path) and, with
``--kernel-cka``, linear CKA through the streamed n x n centred kernels (the blocked HSIC path
every kernel CKA takes), on random features with planted structure made on the device. For
each: wall time (synchronised), peak device memory (torch.cuda.max_memory_allocated) next to
what one n x n float32 matrix would take, and the first cells. Then a consistency check: the
same metrics on the first ``--check-n`` samples on the device and on the CPU must agree.

    python benchmarks/gpu_check.py                       # cuda, n=100000, 13 x 13 layers, d=768
    python benchmarks/gpu_check.py --device cpu --n 3000 --layers 2 --d 64 --kernel-cka   # here
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from prh_lightning import alignment_matrix
from prh_lightning.functional._plan import score_layers


def features(n, d, layers, seed, device):
    signal = torch.randn(n, 32, generator=torch.Generator(device=device).manual_seed(1234), device=device)  # shared
    g = torch.Generator(device=device).manual_seed(seed)
    return [signal @ torch.randn(32, d, generator=g, device=device) + 2.0 * torch.randn(n, d, generator=g, device=device) for _ in range(layers)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run(name, fn, device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    scores = fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"metric": name, "seconds": round(seconds, 2), "peak_bytes": _peak(device), "scores": scores.double().cpu()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-memory", default="16GB", help="alignment_matrix budget for streamed blocks")
    parser.add_argument("--kernel-cka", action="store_true", help="also linear CKA through the n x n kernel blocks")
    parser.add_argument("--check-n", type=int, default=2000, help="samples for the device-vs-CPU check (0: skip)")
    args = parser.parse_args()
    device = torch.device(args.device)
    xs = features(args.n, args.d, args.layers, 0, device)
    ys = features(args.n, args.d, args.layers, 1, device)
    input_bytes = sum(x.numel() * x.element_size() for x in xs + ys)
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), n={args.n}, "
          f"d={args.d}, {args.layers} x {args.layers} layers, inputs {input_bytes / 2**30:.2f} GiB, "
          f"one n x n float32 matrix {args.n**2 * 4 / 2**30:.1f} GiB, max_memory={args.max_memory}", flush=True)
    jobs = [
        ("mutual_knn", lambda: alignment_matrix(xs, ys, metric="mutual_knn", k=args.k, max_memory=args.max_memory)),
        ("cka (linear)", lambda: alignment_matrix(xs, ys, metric="cka", max_memory=args.max_memory)),
    ]
    if args.kernel_cka:
        jobs.append(("cka (kernel blocks)", lambda: score_layers("cka", xs, ys, True, None, None)))
    results = []
    for name, fn in jobs:
        out = run(name, fn, device)
        peak = "-" if out["peak_bytes"] is None else f"{out['peak_bytes'] / 2**30:.2f} GiB (inputs included)"
        print(f"{name:<20} {out['seconds']:8.1f} s   peak {peak}   scores[0, :3] = {out['scores'][0, :3].tolist()}", flush=True)
        results.append(out)
    if args.check_n:
        m = min(args.check_n, args.n)
        sub_x, sub_y = [x[:m] for x in xs[:2]], [y[:m] for y in ys[:2]]
        for name, kw in (("mutual_knn", {"k": args.k}), ("cka", {}), ("cknna", {"k": args.k})):
            here = alignment_matrix(sub_x, sub_y, metric=name, **kw).double().cpu()
            cpu = alignment_matrix([x.cpu() for x in sub_x], [y.cpu() for y in sub_y], metric=name, **kw).double()
            diff = float((here - cpu).abs().max())
            print(f"check n={m} {name:<11} {device} vs cpu: max |diff| = {diff:.2e} {'ok' if diff < 1e-4 else 'MISMATCH'}")
    print(json.dumps([{k: v for k, v in r.items() if k != "scores"} for r in results]))


if __name__ == "__main__":
    main()
