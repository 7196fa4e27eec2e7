"""Layer x layer alignment: `alignment_matrix` against a per-pair loop, side by side, for every metric.

Baseline: every layer pair scored from scratch. For mutual k-NN, unbiased CKA and CKNNA it is
the platonic-rep protocol (L2-normalise both layers, full argsort of the Gram matrix, HSIC with
n^3 matrix products; its code as published); for the other metrics, and for all of them with
``--baseline functional``, it is this library's functional metric called once per pair (which
redoes each layer's work for every pair, so the speed-up is bounded by about the layer count). Both sides are warmed up once and timed the
same way (best of ``--repeat`` runs) over ALL pairs (no extrapolation). Also prints our time
over each metric's floor: the per-layer work no method can skip (normalise + Gram for k-NN,
CKA, CKNNA; + sorting the condensed RDM for RSA; one SVD for SVCCA).

    python benchmarks/alignment_matrix.py            # 13 x 13 layers, n=1024, d=768, CPU, all metrics
    python benchmarks/alignment_matrix.py --metrics mutual_knn cka --repeat 3
    python benchmarks/alignment_matrix.py --metrics mutual_knn --baseline functional
    python benchmarks/alignment_matrix.py --device cuda --n 10000
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from prh_lightning import alignment_matrix
from prh_lightning.functional import METRICS


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


OPTIONS = {
    "mutual_knn": {"k": 10},
    "cycle_knn": {"k": 10},
    "lcs_knn": {"k": 10},
    "edit_distance_knn": {"k": 10},
    "cka": {},
    "unbiased_cka": {},
    "cknna": {"k": 10},
    "svcca": {"dim": 10},
    "rsa": {},
}


PAPER_CODE = ("mutual_knn", "unbiased_cka", "cknna")  # metrics with a platonic-rep per-pair function


def reference(metric: str, a: torch.Tensor, b: torch.Tensor, k: int, eps: float = 0.0, paper: bool = True) -> float:
    """One pair from scratch: platonic-rep code where it exists (``paper``), else the functional metric."""
    if metric not in PAPER_CODE or not paper:
        return float(METRICS[metric](a, b, **OPTIONS[metric]))
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


def floors(xs, ys, device: str, repeat: int) -> dict[str, float]:
    """Per-layer work no method can skip, timed like ours (warm, best of ``repeat``)."""

    def gram():
        for x in xs + ys:
            u = F.normalize(x, dim=-1)
            u @ u.T

    def rdm_ranks():
        n = xs[0].shape[0]
        iu = torch.triu_indices(n, n, offset=1, device=xs[0].device)
        for x in xs + ys:
            u = F.normalize(x - x.mean(dim=1, keepdim=True), dim=-1)
            torch.sort((u @ u.T)[iu[0], iu[1]])

    def svd():
        for x in xs + ys:
            torch.linalg.svd(x - x.mean(dim=0), full_matrices=False)

    out = {}
    for name, fn in (("gram", gram), ("rdm", rdm_ranks), ("svd", svd)):
        fn()
        out[name] = timed(fn, device, repeat)[1]
    return out


FLOOR_OF = {"rsa": "rdm", "svcca": "svd"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=13)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--metrics", nargs="+", default=list(OPTIONS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=2, help="best of this many warm runs, on both sides")
    p.add_argument(
        "--baseline",
        choices=("paper", "functional"),
        default="paper",
        help="per-pair baseline for mutual_knn, unbiased_cka, cknna: platonic-rep's code (paper, the issue's "
        "baseline) or this library's functional metric called once per pair (functional); other metrics always "
        "use the functional metric",
    )
    args = p.parse_args()
    paper = args.baseline == "paper"

    xs = synthetic_layers(args.layers, args.n, args.d, 0, args.device)
    ys = synthetic_layers(args.layers, args.n, args.d, 1, args.device)
    print(f"{args.layers} x {args.layers} layers, n={args.n}, d={args.d}, k={args.k}, device={args.device}, "
          f"threads={torch.get_num_threads()}, best of {args.repeat} warm runs on both sides, all pairs, "
          f"baseline: {'platonic-rep code for ' + ', '.join(PAPER_CODE) + ', else ' if paper else ''}functional per pair")
    floor = floors(xs, ys, args.device, args.repeat)
    print("floors [s]: " + ", ".join(f"{k} {v:.3f}" for k, v in floor.items()))
    pairs = [(i, j) for i in range(args.layers) for j in range(args.layers)]

    print(f"{'metric':<18}{'ours [s]':>10}{'per-pair [s]':>14}{'speed-up':>10}{'ours/floor':>12}{'max|diff|':>11}")
    for metric in args.metrics:
        kw = dict(OPTIONS[metric], **({"k": args.k} if "k" in OPTIONS[metric] else {}))
        alignment_matrix(xs[:2], ys[:2], metric=metric, **kw)  # warm-up
        ours, t_ours = timed(lambda: alignment_matrix(xs, ys, metric=metric, **kw), args.device, args.repeat)

        def baseline():
            return [reference(metric, xs[i], ys[j], args.k, paper=paper) for i, j in pairs]

        reference(metric, xs[0], ys[0], args.k, paper=paper)  # warm-up
        ref, t_ref = timed(baseline, args.device, args.repeat)
        got = torch.tensor([float(ours[i, j]) for i, j in pairs], dtype=torch.float64)
        diff = (got - torch.tensor(ref, dtype=torch.float64)).abs().max().item()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            alignment_matrix(xs, ys, metric=metric, **kw)
            print(f"  peak GPU memory for {metric}: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        f = floor[FLOOR_OF.get(metric, "gram")]
        print(f"{metric:<18}{t_ours:>10.3f}{t_ref:>14.2f}{t_ref / t_ours:>9.1f}x{t_ours / f:>11.2f}x{diff:>11.1e}", flush=True)


if __name__ == "__main__":
    main()
