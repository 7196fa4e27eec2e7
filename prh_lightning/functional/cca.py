"""SVCCA (Raghu et al. 2017) with an exact, deterministic SVD."""

from __future__ import annotations

import torch

from ._validation import check_pair

__all__ = ["canonical_correlations", "svcca", "top_singular_directions"]


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Centre each feature and divide by its standard deviation; constant features become 0."""
    x = x - x.mean(dim=0, keepdim=True)
    std = x.std(dim=0, keepdim=True)
    return torch.where(std > 0, x / torch.where(std > 0, std, 1.0), 0.0)


def top_singular_directions(x: torch.Tensor, dim: int, name: str = "x") -> torch.Tensor:
    """Top-``dim`` left singular vectors ``[n, dim]`` of the standardised ``x [n, d]``.

    Raises if ``x`` has numerical rank below ``dim`` (too few samples or features, or
    constant features), where those directions would be arbitrary.
    """
    z = _standardise(x)
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
    """
    qa = torch.linalg.qr(a - a.mean(dim=0, keepdim=True)).Q
    qb = torch.linalg.qr(b - b.mean(dim=0, keepdim=True)).Q
    return torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)


def svcca(a: torch.Tensor, b: torch.Tensor, dim: int = 10) -> torch.Tensor:
    """Singular-vector CCA of ``a [n, d_a]``, ``b [n, d_b]``; returns 0-dim.

    Standardise each feature (constant ones dropped), keep the top-``dim`` left singular
    vectors ``U_a, U_b [n, dim]`` (exact SVD, so deterministic; platonic-rep uses a
    randomized one), then ``svcca = mean of the dim canonical correlations of U_a, U_b``.
    """
    check_pair(a, b)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    ua = top_singular_directions(a, dim, "a")
    ub = top_singular_directions(b, dim, "b")
    return canonical_correlations(ua, ub).mean()
