"""Neighbour sets that depend on sample order are refused, not scored.

When a layer holds identical rows (e.g. 1,000 probe images compared with 10 class-name
embeddings), a sample's k-th neighbour can be one of many exact copies, and which copies make
it into the list is decided by the tie rule (lower index first), i.e. by the order of the rows:
reordering them moved a mutual k-NN score from 0.413 to 0.456. Ties between distinct rows
with equal similarity are left to the documented rule (they are rare in real features).

Each affected sample can move a score by at most ``1 / n`` of its range, so a few duplicates
(two identical captions among 1,024) are tolerated with a warning; above ``MAX_AFFECTED`` of the
samples the metric raises.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["AmbiguousNeighbours", "check_copies_at_boundary", "row_copies", "MAX_AFFECTED"]

MAX_AFFECTED = 0.005  # fraction of samples whose neighbour set may depend on row order


class AmbiguousNeighbours(ValueError):
    """Neighbour lists that would depend on the order of the samples (many identical rows)."""


def row_copies(x: torch.Tensor) -> torch.Tensor | None:
    """``[n]`` index of the first row exactly equal to each row of ``x [n, d]`` (itself when it has no
    earlier copy), or ``None`` when all rows differ.

    Screen: a float64 random projection of every row (one matrix-vector product). A BLAS kernel
    may round the same row differently at different offsets, so rows whose projections lie
    within the proven rounding bound of each other (``gamma_d max|x| ||w||_1``, twice) are
    candidates, and only candidates are compared exactly.

    >>> row_copies(torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]]))
    tensor([0, 1, 0])
    >>> row_copies(torch.eye(3)) is None
    True
    """
    n, d = x.shape
    x64 = x if x.dtype == torch.float64 else x.double()
    w = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x.device)
    h, order = torch.sort(x64 @ w)
    unit = float(torch.finfo(torch.float64).eps) / 2
    gamma = (d + 2) * unit / (1 - (d + 2) * unit)
    low, high = torch.aminmax(x64)
    tol = 2 * gamma * max(-float(low), float(high)) * float(w.abs().sum()) + 4 * unit * float(h.abs().max())
    close = (h[1:] - h[:-1]) <= tol
    if not bool(close.any()):
        return None
    candidate = torch.zeros(n, dtype=torch.bool, device=x.device)
    candidate[order[1:][close]] = True
    candidate[order[:-1][close]] = True
    rows = candidate.nonzero().flatten()  # ascending
    _, group = torch.unique(x64[rows], dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), n, dtype=torch.long, device=x.device).scatter_reduce_(
        0, group, rows, reduce="amin"
    )
    rep = torch.arange(n, device=x.device)
    rep[rows] = first[group]
    return None if bool((rep[rows] == rows).all()) else rep


def check_copies_at_boundary(x64: torch.Tensor, idx: torch.Tensor, name: str, exclude_self: bool = True) -> None:
    """Raise if any sample's neighbour list ``idx [n, k]`` cuts through a group of identical rows of
    ``x64 [n, d]``: some copies of its k-th neighbour are in the list and others are not."""
    if row_copies(x64) is None:  # cheap screen first (one projection, rounding-safe)
        return
    _, group, counts = torch.unique(x64, dim=0, return_inverse=True, return_counts=True)
    if int(counts.max()) < 2:
        return
    kth = group[idx[:, -1]]  # [n] copy group of each k-th neighbour
    inside = (group[idx] == kth[:, None]).sum(dim=1)
    available = counts[kth] - (exclude_self & (group == kth)).long()
    split = inside < available
    if bool(split.any()):
        rows = int(split.sum())
        if rows <= MAX_AFFECTED * x64.shape[0]:
            warnings.warn(
                f"{name}: a few samples have identical copies at the k-th neighbour place; their neighbour sets "
                "follow the order of the rows (each moves the score by at most 1/n of its range)",
                stacklevel=2,
            )
            return
        raise AmbiguousNeighbours(
            f"{name}: for {rows} of {x64.shape[0]} samples the k-th neighbour has identical copies both inside and "
            f"outside the neighbour list (up to {int(counts.max())} identical rows), so the neighbour sets would depend "
            "on the order of the samples; remove duplicate rows (e.g. compare class centroids, or one row per distinct "
            "input) or use a metric without neighbour lists such as cka"
        )
