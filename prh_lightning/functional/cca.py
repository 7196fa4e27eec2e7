"""SVCCA (Raghu et al. 2017) with an exact, deterministic SVD, and its plan.

Per layer: standardise each feature (centred in float64, constant features dropped) and keep
the top-``dim`` left singular vectors ``U [n, dim]``. Their columns are orthonormal and
centred, so the canonical correlations of two layers are the singular values of
``U_a^T U_b``: every layer pair is one small ``[dim, dim]`` SVD, batched.
"""

from __future__ import annotations

import torch

from ._plan import MetricPlan, register_plan, score_pair
from ._validation import check_pair

__all__ = ["svcca"]


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Centre each feature and divide by its standard deviation; constant features become 0."""
    x = x - x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, keepdim=True)
    scale = float(x.abs().max()) if x.numel() else 0.0
    keep = std > 16 * torch.finfo(x.dtype).eps * max(scale, 1e-300)
    return torch.where(keep, x / torch.where(keep, std, 1.0), 0.0)


def top_singular_directions(x: torch.Tensor, dim: int, name: str = "x", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Top-``dim`` left singular vectors ``[n, dim]`` of the standardised ``x [n, d]``.

    Standardisation runs in float64; the SVD in ``dtype`` (default: ``x``'s). Raises if ``x``
    has numerical rank below ``dim`` (too few samples or features, or constant features),
    where those directions would be arbitrary.
    """
    z = _standardise(x.double()).to(dtype or x.dtype)
    U, S, _ = torch.linalg.svd(z, full_matrices=False)
    tol = S[0] * max(z.shape) * torch.finfo(z.dtype).eps if S.numel() else 0.0
    rank = int((S > tol).sum()) if S.numel() else 0
    if rank < dim:
        raise ValueError(
            f"svcca dim={dim} exceeds the rank {rank} of the standardised {name} (shape {tuple(x.shape)}, "
            "constant features removed); lower dim or use more samples / features"
        )
    return U[:, :dim]


def canonical_correlations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Canonical correlations of ``a [n, p]`` and ``b [n, q]`` (columns centred here).

    ``rho = singular values of Q_a^T Q_b`` with ``Q`` orthonormal bases of the centred
    columns (QR); returns ``[min(p, q)]`` in decreasing order, clamped to ``[0, 1]``.

    >>> a = torch.randn(30, 2, dtype=torch.float64)
    >>> canonical_correlations(a, a @ torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)).round(decimals=6)
    tensor([1., 1.], dtype=torch.float64)
    """
    qa = torch.linalg.qr(a - a.mean(dim=0, keepdim=True)).Q
    qb = torch.linalg.qr(b - b.mean(dim=0, keepdim=True)).Q
    return torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)


def _check_dim(dim) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")


def _prepare(x64: torch.Tensor, ctx, dim: int = 10, **_) -> torch.Tensor:
    return top_singular_directions(x64, dim, ctx.name, ctx.dtype)


def _pairs(xs: list[torch.Tensor], ys: list[torch.Tensor], **_) -> torch.Tensor:
    ux, uy = torch.stack(xs), torch.stack(ys)  # [Lx, n, dim], [Ly, n, dim]
    m = torch.einsum("xnd,yne->xyde", ux.double(), uy.double())
    return torch.linalg.svdvals(m).clamp(0.0, 1.0).mean(dim=-1)


register_plan(
    MetricPlan(
        name="svcca",
        defaults={"dim": 10},
        prepare=_prepare,
        pairs=_pairs,
        bounds=lambda **_: (0.0, 1.0),
        permute=lambda u, perm: u[perm],
        resampling="plain",
        option_checks={"dim": _check_dim},
    )
)


def svcca(
    a: torch.Tensor, b: torch.Tensor, dim: int = 10, normalize: bool = True, clip_quantile: float | None = None
) -> torch.Tensor:
    """Singular-vector CCA of ``a [n, d_a]``, ``b [n, d_b]``; returns 0-dim in ``[0, 1]``.

    Standardise each feature (constant ones dropped), keep the top-``dim`` left singular
    vectors ``U_a, U_b [n, dim]`` (exact SVD, so deterministic; platonic-rep uses a
    randomized one), then ``svcca = mean of the dim canonical correlations of U_a, U_b``.
    ``normalize=True`` (default in every entry point) L2-normalises rows first.

    >>> a = torch.randn(80, 12)
    >>> round(float(svcca(a, a, dim=4)), 4)
    1.0
    """
    check_pair(a, b)
    _check_dim(dim)
    return score_pair("svcca", a, b, normalize, clip_quantile, dim=dim)
