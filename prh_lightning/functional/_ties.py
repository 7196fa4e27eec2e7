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

__all__ = ["AmbiguousNeighbours", "check_copies_at_boundary", "MAX_AFFECTED"]

MAX_AFFECTED = 0.005  # fraction of samples whose neighbour set may depend on row order


class AmbiguousNeighbours(ValueError):
    """Neighbour lists that would depend on the order of the samples (many identical rows)."""


def check_copies_at_boundary(x64: torch.Tensor, idx: torch.Tensor, name: str, exclude_self: bool = True) -> None:
    """Raise if any sample's neighbour list ``idx [n, k]`` cuts through a group of identical rows of
    ``x64 [n, d]``: some copies of its k-th neighbour are in the list and others are not."""
    # cheap screen first: identical rows have identical random projections
    probe = torch.randn(x64.shape[1], generator=torch.Generator().manual_seed(0), dtype=x64.dtype).to(x64.device)
    if torch.unique(x64 @ probe).numel() == x64.shape[0]:
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
