"""Sharded kernel statistics: blocked HSIC sums of kernel CKA (linear or RBF, biased or
unbiased, with the exact median bandwidth of the union) and SVCCA from ``[d, d]`` statistics
summed over ranks."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from prh_lightning.functional._bandwidth import select_ranks, squared_distance_block
from prh_lightning.functional._validation import check_min_samples, check_positive
from prh_lightning.metrics._shards import _BLOCK, Shard


class _KernelSide:
    """One side of kernel CKA on this rank: centred, rescaled rows, and the RBF bandwidth."""

    def __init__(self, shard: Shard, kernel: str, sigma: float | None):
        self.shard, self.kernel = shard, kernel
        self.x, _, scale = shard.centred(exact_mean=True)
        self.sq = (self.x * self.x).sum(dim=1)
        if kernel == "rbf":
            if sigma is None:
                self.sigma = float(sharded_median_distance(shard, self.x, self.sq))
            else:
                self.sigma = float(sigma) * scale
            if not self.sigma > 0:
                raise ValueError(
                    "the median pairwise distance is 0 (more than half the samples are identical), so the "
                    "median-heuristic RBF bandwidth is undefined; pass sigma= explicitly"
                )

    def block(self, rows: slice, panel: Tensor, panel_sq: Tensor) -> Tensor:
        """Kernel values ``[rows, panel rows]`` in float64."""
        if self.kernel == "linear":
            return (self.x[rows] @ panel.T).double()
        d2 = squared_distance_block(self.x[rows], panel, self.sq[rows], panel_sq).clamp_min_(0.0)
        return torch.exp(d2.double() * (-0.5 / self.sigma**2))


def sharded_median_distance(shard: Shard, x: Tensor, sq: Tensor) -> Tensor:
    """The median of the union's ``n (n - 1) / 2`` pairwise distances (as ``kernels.median_distance``)."""
    g, n = shard.group, shard.n
    step = max(1, _BLOCK // max(1, max(shard.sizes)))
    panel_input = torch.cat([x, sq[:, None]], dim=1)

    def stream() -> Iterator[Tensor]:
        for offset, panel in g.panels(panel_input, shard.sizes):
            for s in range(0, x.shape[0], step):
                e = min(x.shape[0], s + step)
                block = squared_distance_block(x[s:e], panel[:, :-1], sq[s:e], panel[:, -1])
                upper = torch.arange(offset, offset + panel.shape[0], device=x.device)[None, :] > (
                    torch.arange(s, e, device=x.device) + shard.offset
                )[:, None]
                yield block[upper]

    m = n * (n - 1) // 2
    gather = lambda t: g.gather_rows(t, g.sizes(t.numel(), t.device))  # noqa: E731
    largest = g.all_reduce(sq.max() if sq.numel() else sq.new_zeros(()), "max")
    span = (0.0, 4.0 * float(largest))  # |x_i - x_j|^2 <= (|x_i| + |x_j|)^2
    ranks = ((m + 1) // 2, m // 2 + 1)
    low, high = select_ranks(stream, ranks, span, x.dtype, x.device, reduce=g.all_reduce, gather=gather)
    return (low.sqrt() + high.sqrt()) / 2


def sharded_cka(
    xs: list[Shard], ys: list[Shard] | None, kernel: str = "linear", unbiased: bool = False, sigma: float | None = None
) -> Tensor:
    """``[Lx, Ly]`` kernel CKA of the union (``functional.cka``) from blocked HSIC sums, float64.

    One round of panels: for every layer ``l`` the kernel block ``K_l [rows, panel]`` (zero
    diagonal when ``unbiased``); ``Σ K_l∘K_m`` for all layer pairs in one GEMM, and the row sums
    ``r_l``. Then, with ``t_l = Σ r_l``, biased ``HSIC = Σ K∘L - 2 r_K.r_L / n + t_K t_L / n^2``
    (``tr(KHLH)``) and unbiased ``[Σ K~∘L~ + t_K t_L / ((n-1)(n-2)) - 2 r_K.r_L / (n-2)] / (n(n-3))``.
    """
    layers = xs + (ys or [])
    first = layers[0]
    n, g, device = first.n, first.group, first.x64.device
    if unbiased:
        check_min_samples(n, 4, "unbiased CKA")
    sides = [_KernelSide(shard, kernel, sigma) for shard in layers]
    rows_local, count = first.x64.shape[0], len(sides)
    inner = torch.zeros(count, count, dtype=torch.float64, device=device)
    row_sums = torch.zeros(count, rows_local, dtype=torch.float64, device=device)
    step = max(1, _BLOCK // max(1, count * max(first.sizes)))
    packed = torch.cat([torch.cat([side.x, side.sq[:, None]], dim=1) for side in sides], dim=1)
    bounds = torch.tensor([0] + [side.x.shape[1] + 1 for side in sides]).cumsum(0).tolist()
    for offset, panel in g.panels(packed, first.sizes):
        for s in range(0, rows_local, step):
            e = min(rows_local, s + step)
            own = torch.arange(s, e, device=device) + first.offset - offset
            inside = (own >= 0) & (own < panel.shape[0])
            local = torch.arange(e - s, device=device)[inside]
            blocks = []
            for side, lo, hi in zip(sides, bounds[:-1], bounds[1:]):
                K = side.block(slice(s, e), panel[:, lo : hi - 1], panel[:, hi - 1])
                if unbiased:
                    K[local, own[inside]] = 0.0
                blocks.append(K.flatten())
            stacked = torch.stack(blocks)
            inner += stacked @ stacked.T
            row_sums[:, s:e] += stacked.view(count, e - s, -1).sum(dim=2)
    inner = g.all_reduce(inner)
    cross = g.all_reduce(row_sums @ row_sums.T)
    totals = g.all_reduce(row_sums.sum(dim=1))
    if unbiased:
        hsic = (inner + torch.outer(totals, totals) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))
    else:
        hsic = inner - 2.0 / n * cross + torch.outer(totals, totals) / n**2
    selfs = hsic.diagonal()
    for value in selfs:
        check_positive(value, "the centred kernel's self-similarity HSIC(K, K)")
    scores = hsic / torch.sqrt(selfs[:, None] * selfs[None, :])
    lx = len(xs)
    return scores[:lx, :lx] if ys is None else scores[:lx, lx:]


# -- CKNNA: neighbour lists plus kernel values at the neighbours -------------------------------




def sharded_svcca_basis(shard: Shard, dim: int) -> tuple[Tensor, Tensor]:
    """This rank's rows of the union's top-``dim`` left singular vectors ``U [n_r, dim]`` of the
    standardised layer (``functional.cca``), from the ``[d, d]`` Gram ``Z^T Z = V S^2 V^T``
    summed over ranks: ``U = Z V S^-1``. Returns ``(U_local, S)``."""
    g, x64 = shard.group, shard.x64
    n = shard.n
    mean = g.all_reduce(x64.sum(dim=0)) / n
    z = x64 - mean
    std = torch.sqrt(g.all_reduce((z * z).sum(dim=0)) / (n - 1))
    scale = float(g.all_reduce(z.abs().amax() if z.numel() else z.new_zeros(()), "max"))
    keep = std > 16 * torch.finfo(torch.float64).eps * max(scale, 1e-300)
    z = torch.where(keep, z / torch.where(keep, std, 1.0), 0.0)
    eigenvalues, vectors = torch.linalg.eigh(g.all_reduce(z.T @ z))
    order = torch.argsort(eigenvalues, descending=True)
    singular = eigenvalues[order].clamp_min(0.0).sqrt()
    tol = singular[0] * max(n, z.shape[1]) * torch.finfo(shard.dtype).eps
    rank = int((singular > tol).sum())
    if rank < dim:
        raise ValueError(
            f"svcca dim={dim} exceeds the rank {rank} of the standardised {shard.name} (shape ({n}, {z.shape[1]}), "
            "constant features removed); lower dim or use more samples / features"
        )
    return z @ vectors[:, order[:dim]] / singular[:dim], singular[:dim]


def sharded_svcca(xs: list[Shard], ys: list[Shard] | None, dim: int) -> Tensor:
    """``[Lx, Ly]`` SVCCA: mean singular value of ``U_x^T U_y`` (``[dim, dim]``, summed over ranks)."""
    bases = [sharded_svcca_basis(shard, dim)[0] for shard in xs + (ys or [])]
    ux, uy = bases[: len(xs)], (bases if ys is None else bases[len(xs) :])
    g = xs[0].group
    m = g.all_reduce(torch.einsum("xnd,yne->xyde", torch.stack(ux), torch.stack(uy)))
    return torch.linalg.svdvals(m).clamp(0.0, 1.0).mean(dim=-1)


# -- entry points ------------------------------------------------------------------------------


