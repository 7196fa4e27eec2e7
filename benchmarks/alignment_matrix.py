"""Layer x layer alignment: `alignment_matrix` against a per-pair loop, side by side.

The baseline recomputes everything for every layer pair, as the platonic-rep scripts do:
L2-normalise both layers, full argsort of the Gram matrix for neighbours, HSIC with n^3
matrix products. It is timed on ``--ref-pairs`` pairs and extrapolated to all pairs (pass
``--ref-pairs 0`` to run every pair). Also prints our time over the "Gram floor": computing
each layer's Gram matrix once.

    python benchmarks/alignment_matrix.py            # 13 x 13 layers, n=1024, d=768, CPU
    python benchmarks/alignment_matrix.py --device cuda --n 10000
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from prh_lightning import alignment_matrix


# -- the per-pair baseline (platonic-rep style) -----------------------------------------------
def ref_knn(x: torch.Tensor, k: int) -> torch.Tensor:
    return (x @ x.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :k]


def ref_mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    n = a.shape[0]
    rows = torch.arange(n, device=a.device).unsqueeze(1)
    ma, mb = torch.zeros(n, n, device=a.device), torch.zeros(n, n, device=a.device)
    ma[rows, ref_knn(a, k)] = 1.0
    mb[rows, ref_knn(b, k)] = 1.0
    return float(((ma * mb).sum(dim=1) / k).mean())


def ref_hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    m = K.shape[0]
    Kt, Lt = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    value = (Kt * Lt.T).sum() + Kt.sum() * Lt.sum() / ((m - 1) * (m - 2)) - 2 * torch.mm(Kt, Lt).sum() / (m - 2)
    return value / (m * (m - 3))


def ref_unbiased_cka(a: torch.Tensor, b: torch.Tensor, eps: float) -> float:
    K, L = a @ a.T, b @ b.T
    kl, kk, ll = ref_hsic_unbiased(K, L), ref_hsic_unbiased(K, K), ref_hsic_unbiased(L, L)
    return float(kl / (torch.sqrt(kk * ll) + eps))


def ref_cknna(a: torch.Tensor, b: torch.Tensor, k: int, eps: float) -> float:
    K, L = a @ a.T, b @ b.T
    n = K.shape[0]

    def sim(P, Q):
        tp = torch.topk(P.clone().fill_diagonal_(float("-inf")), k, dim=1).indices
        tq = torch.topk(Q.clone().fill_diagonal_(float("-inf")), k, dim=1).indices
        mask = torch.zeros(n, n, device=P.device).scatter_(1, tp, 1) * torch.zeros(n, n, device=P.device).scatter_(1, tq, 1)
        return ref_hsic_unbiased(mask * P, mask * Q)

    return float(sim(K, L) / (torch.sqrt(sim(K, K) * sim(L, L)) + eps))


def reference(metric: str, a: torch.Tensor, b: torch.Tensor, k: int, eps: float) -> float:
    a, b = F.normalize(a, p=2, dim=-1), F.normalize(b, p=2, dim=-1)
    if metric == "mutual_knn":
        return ref_mutual_knn(a, b, k)
    if metric == "unbiased_cka":
        return ref_unbiased_cka(a, b, eps)
    return ref_cknna(a, b, k, eps)


# -- harness ------------------------------------------------------------------------------------
def synthetic_layers(count: int, n: int, d: int, seed: int, device: str) -> list[torch.Tensor]:
    """A drifting stack of layers: each is the previous one, mixed and perturbed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    layers = []
    for _ in range(count):
        x = torch.tanh(x @ (torch.randn(d, d, generator=g) / d**0.5)) + 0.3 * torch.randn(n, d, generator=g)
        layers.append(x.to(device))
    return layers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int = 1):
    """Run ``fn`` ``repeat`` times; return its output and the fastest wall time."""
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return out, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=13)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ref-pairs", type=int, default=13, help="baseline pairs timed (0 = all)")
    p.add_argument("--metrics", nargs="+", default=["mutual_knn", "unbiased_cka", "cknna"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs for ours and the floor")
    args = p.parse_args()

    xs = synthetic_layers(args.layers, args.n, args.d, 0, args.device)
    ys = synthetic_layers(args.layers, args.n, args.d, 1, args.device)
    print(f"{args.layers} x {args.layers} layers, n={args.n}, d={args.d}, k={args.k}, device={args.device}, "
          f"threads={torch.get_num_threads()}")

    def gram_floor():
        for x in xs + ys:
            u = F.normalize(x, dim=-1)
            u @ u.T

    gram_floor()  # warm-up
    _, floor = timed(gram_floor, args.device, args.repeat)
    print(f"Gram floor (best of {args.repeat}; normalise + x x^T once per layer, {2 * args.layers} layers): {floor:.3f} s")

    total_pairs = args.layers * args.layers
    g = torch.Generator().manual_seed(0)
    if args.ref_pairs and args.ref_pairs < total_pairs:
        chosen = torch.randperm(total_pairs, generator=g)[: args.ref_pairs].tolist()
    else:
        chosen = list(range(total_pairs))
    pairs = [divmod(c, args.layers) for c in chosen]

    print(f"{'metric':<14}{'ours [s]':>10}{'baseline [s]':>14}{'speed-up':>10}{'ours/floor':>12}{'max|diff|':>11}"
          f"{'max|diff| eps=1e-6':>20}")
    for metric in args.metrics:
        kw = {} if metric == "unbiased_cka" else {"k": args.k}
        alignment_matrix(xs[:2], ys[:2], metric=metric, **kw)  # warm-up
        ours, t_ours = timed(lambda: alignment_matrix(xs, ys, metric=metric, **kw), args.device, args.repeat)
        ref0, ref6, t_ref = [], [], 0.0
        for i, j in pairs:
            value, dt = timed(lambda: reference(metric, xs[i], ys[j], args.k, 0.0), args.device)
            ref0.append(value)
            t_ref += dt
            if metric != "mutual_knn":  # platonic-rep adds 1e-6 to the denominator
                ref6.append(reference(metric, xs[i], ys[j], args.k, 1e-6))
        t_ref_all = t_ref / len(pairs) * total_pairs
        got = torch.tensor([float(ours[i, j]) for i, j in pairs])
        diff = (got - torch.tensor(ref0)).abs().max().item()
        diff6 = (got - torch.tensor(ref6)).abs().max().item() if ref6 else float("nan")
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            alignment_matrix(xs, ys, metric=metric, **kw)
            print(f"  peak GPU memory for {metric}: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print(f"{metric:<14}{t_ours:>10.3f}{t_ref_all:>14.2f}{t_ref_all / t_ours:>9.1f}x{t_ours / floor:>11.2f}x"
              f"{diff:>11.1e}{diff6:>20.1e}")
    if len(pairs) < total_pairs:
        print(f"(baseline timed on {len(pairs)} random pairs of {total_pairs}, extrapolated; values compared on those)")


if __name__ == "__main__":
    main()
