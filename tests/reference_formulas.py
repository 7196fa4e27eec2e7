"""Textbook reference formulas for the metric-class tests, written independently of
prh_lightning (float64, explicit centring matrix, explicit neighbour sets)."""

from __future__ import annotations

import torch


def ref_linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA of ``a [n, d_a]``, ``b [n, d_b]``: <HKH, HLH>_F / (||HKH||_F ||HLH||_F), H = I - 11^T/n."""
    n = a.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k = h @ a.double() @ a.double().T @ h
    l = h @ b.double() @ b.double().T @ h
    return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))


def ref_mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean over samples of |N_a(i) & N_b(i)| / k, neighbours by inner product, self excluded."""

    def neighbours(x):
        sims = x.double() @ x.double().T
        sims.fill_diagonal_(-float("inf"))
        return [set(row.tolist()) for row in sims.topk(k, dim=1).indices]

    return sum(len(p & q) for p, q in zip(neighbours(a), neighbours(b))) / (k * a.shape[0])
