"""Permutation nulls of neighbour-list metrics (mutual k-NN, CKNNA) without moving any layer.

Permuting the samples of a layer ``y`` by ``π`` (row ``i`` <- sample ``π(i)``) turns the question
"is ``(i, j)`` an edge of ``y∘π``" into "is ``(π(i), π(j))`` an edge of ``y``". So instead of
permuting every ``y`` layer and rescoring, each neighbour edge ``(i, j)`` of each ``x`` layer is
moved to ``(π(i), π(j))`` and looked up once in the union of the edges of all ``y`` layers
(:class:`EdgeUnion`); a hit returns one row of per-layer columns (membership, kernel values).
With ``k`` of ``n`` neighbours per row, only about ``L_y k / n`` of the moved edges hit anything,
so a permutation costs ``O(L_x n k)`` lookups plus work on the hits, for all ``L_x x L_y`` pairs.

Memory: the union tables, the slot map and each batch of moved edges stay within fixed caps
(256 MB, 64 MB, ``2^21`` edges), or within a share of ``budget`` bytes (``max_memory`` of
``calibrate`` / ``permutation_test``, carried by the prepared states): half for a union table,
an eighth for the slot map, a quarter for a batch of moved edges. A table never holds fewer than
one ``y`` layer (``O(n k)`` entries, the size of that layer's own neighbour lists).
"""

from __future__ import annotations

import torch

__all__ = ["EdgeUnion", "batches", "layer_groups", "layer_groups_of_moved_edges", "moved_hits", "mutual_knn_null"]

_DENSE_MAP_BYTES = 2**26  # an int32 [n * n] slot map (64 MB) up to n = 4,096; beyond, binary search
_QUERY_BUDGET = 2**21  # moved edges per batch of permutations
_TABLE_BYTES = 2**28  # union tables of at most 256 MB: y layers in groups beyond
MOVED_EDGE_BYTES = 64  # working memory per moved edge of a batch (gathered index, key, slot, masks)
_UNION_KEY_BYTES = 32  # per edge while the union is formed (keys, their sort and inverse)


class EdgeUnion:
    """The union of the directed edges ``(u, v)``, ``v`` in ``N_l(u)``, of layers ``l < L``.

    Args:
        idx: ``[L, n, k]`` neighbour lists.
        columns: ``[L, n, k, c]`` float64 values per edge and layer (``None``: one column of ones,
            membership).

    ``table [S + 1, L * c]``: row ``s`` holds, for union edge ``s``, the ``c`` columns of every
    layer that has it (zeros for layers that do not); row ``S`` is all zeros (a miss). Lookups
    go through a dense ``int32 [n * n]`` slot map for ``n`` up to 4,096, else by binary search in
    the sorted union keys ``u n + v``.
    """

    def __init__(self, idx: torch.Tensor, columns: torch.Tensor | None = None, budget: int | None = None):
        layers, n, k = idx.shape
        device = idx.device
        if columns is None:
            columns = torch.ones(layers, n, k, 1, dtype=torch.float64, device=device)
        c = columns.shape[-1]
        keys = (torch.arange(n, device=device)[:, None] * n + idx).reshape(layers, n * k)
        union, inverse = torch.unique(keys, return_inverse=True)
        self.n, self.size, self.layers, self.width = n, union.numel(), layers, c
        table = torch.zeros(self.size + 1, layers, c, dtype=torch.float64, device=device)
        table[inverse, torch.arange(layers, device=device)[:, None]] = columns.reshape(layers, n * k, c).double()
        self.table = table.view(self.size + 1, layers * c)
        map_bytes = _DENSE_MAP_BYTES if budget is None else min(_DENSE_MAP_BYTES, budget // 8)
        if n * n * 4 <= map_bytes:
            self.map = torch.full((n * n,), self.size, dtype=torch.int32, device=device)
            self.map[union] = torch.arange(self.size, dtype=torch.int32, device=device)
            self.union = None
        else:
            self.map, self.union = None, union

    def slots(self, keys: torch.Tensor) -> torch.Tensor:
        """Slot of each key ``u n + v`` (any shape, int64); ``size`` where no layer has that edge."""
        if self.map is not None:
            return self.map[keys].long()
        pos = torch.searchsorted(self.union, keys).clamp_(max=self.size - 1)
        return torch.where(self.union[pos] == keys, pos, self.size)


def layer_groups(count: int, edges: int, width: int, budget: int | None = None) -> list[slice]:
    """Groups of ``count`` y layers with ``edges`` edges each whose union table (at most
    ``g^2 edges width`` float64 entries for ``g`` layers, plus the keys while it is formed) stays
    within ``_TABLE_BYTES``, or within half of ``budget`` bytes; one layer per group at least.

    >>> layer_groups(5, edges=1000, width=1, budget=2 * (4 * 1000 * 8 + 2 * 1000 * 32))
    [slice(0, 2, None), slice(2, 4, None), slice(4, 6, None)]
    """
    limit = _TABLE_BYTES if budget is None else budget // 2
    edges = max(1, edges)
    g = 1
    while g < count and (g + 1) ** 2 * edges * width * 8 + (g + 1) * edges * _UNION_KEY_BYTES <= limit:
        g += 1
    return [slice(s, s + g) for s in range(0, count, g)]


def batches(perms: torch.Tensor, edges: int, budget: int | None = None, bytes_per_edge: int = MOVED_EDGE_BYTES):
    """Blocks of rows of ``perms [P, n]`` with about ``_QUERY_BUDGET`` moved edges each, or as many
    as ``bytes_per_edge`` each fit in a quarter of ``budget`` bytes (one permutation at least)."""
    limit = _QUERY_BUDGET if budget is None else budget // 4 // max(1, bytes_per_edge)
    step = max(1, limit // max(1, edges))
    for s in range(0, perms.shape[0], step):
        yield perms[s : s + step]


def layer_groups_of_moved_edges(count: int, edges: int, budget: int | None, bytes_per_edge: int = MOVED_EDGE_BYTES) -> list[slice]:
    """Groups of ``count`` x layers whose ``edges`` edges each, moved by one permutation, fit in
    a quarter of ``budget`` bytes (all layers in one group without a budget)."""
    if budget is None:
        return [slice(0, count)]
    g = max(1, budget // 4 // max(1, edges * bytes_per_edge))
    return [slice(s, s + g) for s in range(0, count, g)]


def moved_hits(idx_x: torch.Tensor, union: EdgeUnion, perms: torch.Tensor):
    """The edges of the ``x`` layers that land on an edge of the union under each permutation.

    Args:
        idx_x: ``[Lx, n, k]`` neighbour lists of the ``x`` layers.
        perms: ``[B, n]`` permutations.

    Returns ``(target, edge, slot)``, one entry per hit: ``target = b * Lx + l`` (permutation,
    x layer), ``edge`` the flat index ``l n k + i k + t`` of the edge ``(i, idx_x[l, i, t])``
    and ``slot`` its row in ``union.table``.
    """
    lx, n, k = idx_x.shape
    b = perms.shape[0]
    moved_j = perms.index_select(1, idx_x.reshape(-1)).view(b, lx, n, k)
    keys = (perms * n)[:, None, :, None] + moved_j  # [B, Lx, n, k]: π(i) n + π(j)
    slots = union.slots(keys).view(-1)
    hit = (slots != union.size).nonzero().squeeze(1)
    return hit // (n * k), hit % (lx * n * k), slots[hit]


def mutual_knn_null(xs: list, ys: list, perms: torch.Tensor, k: int = 10, **_) -> torch.Tensor:
    """``[P, Lx, Ly]`` float64 mutual k-NN with every ``y`` layer permuted by each row of
    ``perms [P, n]``: the shared-neighbour count of ``(x, y∘π)`` is the number of edges of ``x``
    that ``π`` moves onto edges of ``y``. States carry ``idx [n, k]`` and ``budget`` (bytes or
    ``None``, see the module's notes on memory)."""
    n, kk = xs[0].idx.shape
    budget = xs[0].budget
    x_groups = layer_groups_of_moved_edges(len(xs), n * kk, budget)
    if len(x_groups) > 1:
        return torch.cat([mutual_knn_null(xs[g], ys, perms) for g in x_groups], dim=1)
    groups = layer_groups(len(ys), n * kk, 1, budget)
    if len(groups) > 1:
        return torch.cat([mutual_knn_null(xs, ys[g], perms) for g in groups], dim=-1)
    idx_x = torch.stack([s.idx for s in xs])
    lx = idx_x.shape[0]
    union = EdgeUnion(torch.stack([s.idx for s in ys]), budget=budget)
    out = []
    for block in batches(perms, lx * n * kk, budget):
        target, _, slot = moved_hits(idx_x, union, block)
        counts = torch.zeros(block.shape[0] * lx, union.layers, dtype=torch.float64, device=idx_x.device)
        counts.index_add_(0, target, union.table[slot])
        out.append(counts.view(block.shape[0], lx, union.layers) / (n * kk))
    return torch.cat(out)
