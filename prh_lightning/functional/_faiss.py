"""Approximate neighbour lists with FAISS (optional: ``pip install faiss-cpu``), and their recall.

Used by the k-NN metrics with ``knn_backend="faiss"``. The ranking is the exact metrics' own:
for centred features ``xc`` and mean ``m`` the score ``x_i . x_j`` ranks row ``i`` like
``xc_i . xc_j + m . xc_j``, an inner product of the query ``[xc_i, 1]`` with the stored vector
``[xc_j, m . xc_j]``, so a large common offset costs no precision. The index is HNSW (graph
search, inner-product metric); its lists are approximate, so :func:`neighbour_recall`
measures them against exact search on a random subsample of rows, to be reported beside the
score.
"""

from __future__ import annotations

import torch

from ._numerics import Centred

__all__ = ["faiss_neighbours", "neighbour_recall"]


def _faiss():
    from .._optional import require

    return require("faiss", extra="faiss", purpose='knn_backend="faiss"')


def faiss_neighbours(c: Centred, k: int, exclude_self: bool = True, m: int = 32, ef_search: int = 128) -> torch.Tensor:
    """``[n, k]`` approximate neighbours (most similar first) of the layer centred in ``c``.

    ``m``: HNSW graph degree; ``ef_search``: search breadth (higher: better recall, slower).
    """
    faiss = _faiss()
    xc = c.xc.detach().to("cpu", torch.float32)
    shift = (c.xc.double() @ c.mean.to(c.xc.device)).to("cpu", torch.float32)
    n, d = xc.shape
    base = torch.cat([xc, shift[:, None]], dim=1).contiguous().numpy()
    query = torch.cat([xc, torch.ones(n, 1)], dim=1).contiguous().numpy()
    index = faiss.IndexHNSWFlat(d + 1, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = max(ef_search, k + 1)
    index.add(base)
    want = min(n, k + 1) if exclude_self else k
    _, found = index.search(query, want)
    found = torch.from_numpy(found).long()
    if not exclude_self:
        return found.to(c.xc.device)
    rows = torch.arange(n)[:, None]
    keep = found != rows  # drop the sample itself where it was found; else drop the last
    keep[:, -1] &= ~keep.all(dim=1)
    missing = (found < 0).any(dim=1)
    if bool(missing.any()):
        raise RuntimeError(f"FAISS returned fewer than {want} neighbours for {int(missing.sum())} rows; raise ef_search")
    return found[keep].view(n, k).to(c.xc.device)


def neighbour_recall(
    x64: torch.Tensor, idx: torch.Tensor, sample: int = 1000, generator: torch.Generator | None = None, exclude_self: bool = True
) -> float:
    """Mean ``|N_approx(i) ∩ N_exact(i)| / k`` over ``sample`` random rows ``i`` of ``x64 [n, d]``
    (exact lists by float64 inner products, self excluded), for approximate lists ``idx [n, k]``."""
    n, k = idx.shape
    rows = torch.randperm(n, generator=generator)[: min(sample, n)].to(x64.device)
    sims = x64[rows] @ x64.T
    if exclude_self:
        sims[torch.arange(rows.numel(), device=x64.device), rows] = float("-inf")
    exact = torch.topk(sims, k, dim=1).indices
    hits = (idx[rows].unsqueeze(-1) == exact.unsqueeze(-2)).any(dim=-1)
    return float(hits.double().mean())
