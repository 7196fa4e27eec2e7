"""CKNNA (Huh et al. 2024): CKA restricted to pairs that are neighbours in both spaces, and its plan.

Per layer: exact neighbour lists (as the k-NN metrics), the kernel values ``K_ij = x_i . x_j``
at those neighbours (the masked kernel is not centred, so they must not come from a float32
Gram of offset features: they are the float32 scores of the centred features, within a
certified rounding bound, plus the offset's terms in float64), back links
``K_ji`` where ``i`` is also a neighbour of ``j``, and the layer's self-similarity. A pair
is then scored from neighbour lists in ``O(n k log(n k))``: membership of ``(i, j)`` and
``K_ij`` are looked up by binary search in the sorted keys ``i n + j`` of each layer's
neighbour pairs, so no ``[n, n]`` map is ever formed (the layer's self-similarity). All layer
pairs at once, and permutation nulls: the edges of each ``x`` layer are looked up in the union
of the ``y`` layers' edges (:func:`_moved_hsic`), ``O(L_x n k)`` lookups for all pairs.
Both the unbiased (default) and the biased HSIC estimator have these batched paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._edge_null import MOVED_EDGE_BYTES, EdgeUnion, batches, layer_groups, layer_groups_of_moved_edges, moved_hits
from ._numerics import Centred, as_float64, centre, pivot_free_float32
from ._plan import MetricPlan, register_plan, score_pair
from ._validation import check_k, check_min_samples, check_positive
from .knn import _BLOCK_BYTES, _DENSE_MAX, _positions, exact_neighbours

__all__ = ["cknna"]


@dataclass
class CknnaLayer:
    """``idx [n, k]`` neighbours, ``val [n, k]`` = ``K[i, idx[i, t]]`` (float64), ``back [n, k]`` =
    ``K[j, i]`` if ``i`` is a neighbour of ``j = idx[i, t]`` else 0, ``mutual [n, k]`` (bool) whether
    it is, and ``self_sim`` = sim(K, K). :meth:`from_lists` fills the last three.

    ``keys [n k]``: the sorted ``i n + j`` of every neighbour pair, with ``sorted_val`` the
    kernel values in that order (built on first use): membership and kernel lookups by binary
    search, with no ``[n, n]`` map.
    """

    idx: torch.Tensor
    val: torch.Tensor
    back: torch.Tensor
    self_sim: torch.Tensor | None = None
    mutual: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    sorted_val: torch.Tensor | None = None
    budget: int | None = None  # max_memory in bytes (None: defaults), for the permutation null

    @classmethod
    def from_lists(cls, idx: torch.Tensor, val: torch.Tensor, unbiased: bool, name: str) -> "CknnaLayer":
        """The layer of neighbour lists ``idx [n, k]`` and kernel values ``val [n, k]`` at them:
        back links and self-similarity added; raises if that self-similarity is not positive."""
        layer = cls(idx, val, torch.zeros_like(val))
        layer.mutual, layer.back = layer._back_links()
        # against itself every listed edge is in the mask, and Q'_ji is the back link: no lookups
        layer.self_sim = _hsic_of_masked(val[None], val[None], layer.back[None], idx[None], unbiased)[0]
        check_positive(layer.self_sim, f"the CKNNA self-similarity sim(K, K) of {name}")
        return layer

    def _back_links(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mutual, back)`` ``[n, k]``: is ``i`` in ``N(j)`` for ``j = idx[i, t]``, and ``K_ji`` there
        (0 elsewhere): :meth:`lookup` of every reversed edge, through a dense ``[n, n]`` int8 map of
        list places while that is small (``n <= 8,192``), else by binary search."""
        n, k = self.idx.shape
        rows = torch.arange(n, device=self.idx.device)[:, None]
        if n * n > _DENSE_MAX or k > 127:
            return self.lookup(self.idx, rows)
        place = _positions(self.idx, torch.empty(n, n, dtype=torch.int8, device=self.idx.device))[self.idx, rows]
        mutual = place >= 0
        back = self.val[self.idx, place.long().clamp_(min=0)]
        return mutual, back.masked_fill_(~mutual, 0.0)

    def permuted(self, perm: torch.Tensor) -> "CknnaLayer":
        """Samples reordered (row ``i`` <- sample ``perm[i]``); self-similarity unchanged."""
        inverse = torch.argsort(perm)
        mutual = None if self.mutual is None else self.mutual[perm]
        return CknnaLayer(inverse[self.idx[perm]], self.val[perm], self.back[perm], self.self_sim, mutual, budget=self.budget)

    def lookup(self, i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For index tensors ``i``, ``j`` (broadcast): ``(found, value)``, ``found = j in N(i)``,
        ``value = K_ij`` there and 0 elsewhere (float64)."""
        if self.keys is None:
            n = self.idx.shape[0]
            ordered, order = torch.sort(self.idx, dim=1)  # keys of row i lie in [i n, (i + 1) n): sorted overall
            rows = torch.arange(n, device=self.idx.device)[:, None]
            self.keys = (rows * n + ordered).flatten()
            self.sorted_val = torch.gather(self.val, 1, order).flatten()
        n = self.idx.shape[0]
        query = i * n + j
        pos = torch.searchsorted(self.keys, query).clamp_(max=self.keys.numel() - 1)
        found = self.keys[pos] == query
        return found, torch.where(found, self.sorted_val[pos], 0.0)


def _masked_hsic_against(a: CknnaLayer, bs: list[CknnaLayer], unbiased: bool) -> torch.Tensor:
    """``HSIC(M∘K_a, M∘L_b)`` for layer ``a`` against every ``b``: ``[Lb]``.

    The entries of ``M`` are enumerated through ``b``'s lists (``j = idx_b[i, t]``) and looked up
    in ``a``'s sorted keys: ``P'_ij = K_ij``, ``Q'_ij = L_ij`` on ``M``, scored by
    :func:`_hsic_of_masked`. Memory ``O(L_b n k)``.
    """
    n = a.idx.shape[0]
    i = torch.arange(n, device=a.idx.device)[None, :, None]
    idx_b = torch.stack([b.idx for b in bs])  # [Lb, n, k]
    found, p = a.lookup(i, idx_b)  # P'_ij: zero unless j in N_a(i) (j in N_b(i) by construction)
    q = torch.stack([b.val for b in bs]) * found  # Q'_ij
    q_back = torch.stack([b.back for b in bs]) * a.lookup(idx_b, i)[0]  # Q'_ji: i in N_b(j) and in N_a(j)
    return _hsic_of_masked(p, q, q_back, idx_b, unbiased)


def _hsic_of_masked(p: torch.Tensor, q: torch.Tensor, q_back: torch.Tensor, idx: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """``[L]`` HSIC of masked kernels from their entries along neighbour lists ``idx [L, n, k]``:
    ``p = P'_ij``, ``q = Q'_ij`` and ``q_back = Q'_ji`` at ``j = idx[l, i, t]`` (all ``[L, n, k]``;
    every nonzero entry of ``P'`` and ``Q'`` lies on a listed edge).

    With row / column sums of ``P'``, ``Q'`` and ``tr(P'Q') = Σ P'_ij Q'_ji``:
    biased ``tr(P'Q') - (colsum P' . rowsum Q' + rowsum P' . colsum Q') / n + ΣP' ΣQ' / n^2``;
    unbiased (zero diagonals) ``[tr(P'Q') + ΣP' ΣQ' / ((n-1)(n-2)) - 2 colsum P' . rowsum Q' / (n-2)] / (n(n-3))``.
    """
    layers, n, _ = idx.shape
    trace = (p * q_back).sum(dim=(1, 2))
    flat = idx.flatten(1)
    col_p = torch.zeros(layers, n, dtype=p.dtype, device=p.device).scatter_add_(1, flat, p.flatten(1))
    row_q = q.sum(dim=-1)
    sum_p, sum_q = p.sum(dim=(1, 2)), q.sum(dim=(1, 2))
    if unbiased:
        cross = (col_p * row_q).sum(dim=-1)
        return (trace + sum_p * sum_q / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))
    col_q = torch.zeros(layers, n, dtype=q.dtype, device=q.device).scatter_add_(1, flat, q.flatten(1))
    row_p = p.sum(dim=-1)
    cross = (col_p * row_q).sum(dim=-1) + (row_p * col_q).sum(dim=-1)
    return trace - cross / n + sum_p * sum_q / n**2


def prepare_cknna(
    x64: torch.Tensor, ctx, k: int = 10, unbiased: bool = True, eps: float = 0.0, groups=None, **_
) -> CknnaLayer:
    """Per-layer work of CKNNA on conditioned float64 features ``x64 [n, d]``."""
    _check_sizes(x64.shape[0], k, unbiased)
    c = centre(x64, ctx.input_eps, ctx.dtype, ctx.name, exact_mean=False)
    return _layer(c, x64, ctx, k, unbiased, groups)


def prepare_cknna_fast(x: torch.Tensor, ctx, k: int = 10, unbiased: bool = True, eps: float = 0.0, groups=None, **_):
    """:func:`prepare_cknna` straight from float32 (fp16, bf16) features ``x [n, d]`` that need no
    common offset removed (:func:`._numerics.pivot_free_float32`); ``None`` (the float64 route)
    otherwise and for bootstrap ``groups``."""
    if groups is not None:
        return None
    _check_sizes(x.shape[0], k, unbiased)
    conditioned = pivot_free_float32(x, ctx.normalize, ctx.input_eps)
    return None if conditioned is None else _layer(*conditioned, ctx, k, unbiased, None)


def _check_sizes(n: int, k: int, unbiased: bool) -> None:
    check_k(k, n, minimum=2)
    if unbiased:
        check_min_samples(n, 4, "unbiased CKNNA")


def _layer(c: Centred, x64, ctx, k: int, unbiased: bool, groups) -> CknnaLayer:
    """The layer's lists and kernel values from its centred copy ``c`` (``x64``: the float64
    features or :class:`._numerics.ConditionedRows`)."""
    n = c.xc.shape[0]
    rows = ctx.block(n, _BLOCK_BYTES)
    # the masks need the neighbour sets only: certify the k-th / (k+1)-th boundary, not the order;
    # the kernel values come with the scores (offset carried in float64, see exact_neighbours)
    idx, val = exact_neighbours(
        c, x64, k, rows, ctx.gram(n), exclude_self=unbiased, groups=groups, ordered=False, kernel_values=True,
        name=ctx.name,
    )
    del c
    if not bool(torch.isfinite(val).all()):  # excluded entries (groups) listed as neighbours: exact products
        x64 = as_float64(x64)
        val = _gathered_products(x64, idx, ctx.block(x64.shape[1], 8))
    layer = CknnaLayer.from_lists(idx, val, unbiased, ctx.name)
    layer.budget = ctx.budget
    return layer


def _gathered_products(x64: torch.Tensor, idx: torch.Tensor, rows: int) -> torch.Tensor:
    """``[n, k]`` float64 ``x_i . x_{idx[i, t]}``, with ``rows * k`` gathered rows at a time at most.

    Blocks of at most 64 rows (``64 k`` gathered feature rows) reuse one buffer that stays in
    cache: gathering all ``n k`` rows at once is memory-bound and about 4x slower."""
    n, k = idx.shape
    step = max(1, min(64, rows // max(1, k)))
    out = torch.empty(n, k, dtype=x64.dtype, device=x64.device)
    gathered = torch.empty(min(n, step) * k, x64.shape[1], dtype=x64.dtype, device=x64.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        block = torch.index_select(x64, 0, idx[s:e].flatten(), out=gathered[: (e - s) * k])
        torch.bmm(block.view(e - s, k, -1), x64[s:e, :, None], out=out[s:e, :, None])
    return out


def _denominators(xs: list[CknnaLayer], ys: list[CknnaLayer], eps: float) -> torch.Tensor:
    """``[Lx, Ly]``: ``sqrt(sim(K, K) sim(L, L)) + eps``."""
    self_x = torch.stack([a.self_sim for a in xs])
    self_y = torch.stack([b.self_sim for b in ys])
    return torch.sqrt(self_x[:, None] * self_y[None, :]) + eps


def _cknna_pairs(xs: list[CknnaLayer], ys: list[CknnaLayer], unbiased: bool = True, eps: float = 0.0, **_):
    """``[Lx, Ly]``: the identity permutation of :func:`_moved_hsic` (every pair at once)."""
    identity = torch.arange(xs[0].idx.shape[0], device=xs[0].idx.device)[None]
    return _moved_hsic(xs, ys, identity, unbiased)[0] / _denominators(xs, ys, eps)


def _moved_hsic(xs: list[CknnaLayer], ys: list[CknnaLayer], perms: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """``[P, Lx, Ly]`` masked HSIC with every ``y`` layer permuted by each row of ``perms [P, n]``.

    ``y∘π`` has edge ``(i, j)`` with value ``L_{π(i) π(j)}`` iff ``y`` has edge ``(π(i), π(j))``,
    so the edges ``(i, j)`` of each ``x`` layer are moved by ``π`` and looked up once in the union
    of the ``y`` layers' edges (see :mod:`._edge_null`), whose table holds per ``y`` layer the
    membership, ``L_uv`` and the back link ``L_vu`` (where ``u`` in ``N(v)`` too). Each hit
    contributes to the terms of :func:`_masked_hsic_against`: ``P'_ij = K_ij``, ``Q'_ij =
    L_{π(i)π(j)}`` and, for ``tr(P'Q')``, ``K_ij [i in N_x(j)]`` times the back link.
    """
    n, k = xs[0].idx.shape
    budget = xs[0].budget
    # per moved edge: its key, slot and masks, and its share of the [B Lx n, Ly] float64 row sums
    per_edge = MOVED_EDGE_BYTES + -(-4 * 8 * len(ys) // k)
    x_groups = layer_groups_of_moved_edges(len(xs), n * k, budget, per_edge)
    if len(x_groups) > 1:
        return torch.cat([_moved_hsic(xs[g], ys, perms, unbiased) for g in x_groups], dim=1)
    groups = layer_groups(len(ys), n * k, 3, budget)
    if len(groups) > 1:  # large n or a small budget: bounded union tables
        return torch.cat([_moved_hsic(xs, ys[g], perms, unbiased) for g in groups], dim=-1)
    device = xs[0].idx.device
    columns = torch.stack([torch.stack([torch.ones_like(b.val), b.val, b.back], dim=-1) for b in ys])
    union = EdgeUnion(torch.stack([b.idx for b in ys]), columns, budget)
    idx_x = torch.stack([a.idx for a in xs])  # [Lx, n, k]
    lx, _, k = idx_x.shape
    ly = len(ys)
    rows = torch.arange(n, device=device)[:, None]
    val_x = torch.stack([a.val for a in xs]).flatten()
    # K_ij where i is also a neighbour of j in x (else 0): the x side of tr(P'Q')
    back_x = torch.stack([a.val * a.mutual for a in xs]).flatten()
    edge_row = rows.expand(n, k).flatten()
    out = []
    for block in batches(perms, lx * n * k, budget, per_edge):
        size = block.shape[0] * lx
        target, edge, slot = moved_hits(idx_x, union, block)
        hit = union.table[slot].view(-1, ly, 3)
        p = val_x[edge, None] * hit[..., 0]  # P'_ij for each y layer
        q = hit[..., 1]  # Q'_ij
        sums = torch.zeros(size, 3, ly, dtype=torch.float64, device=device)
        sums.index_add_(0, target, torch.stack([p, q, back_x[edge, None] * hit[..., 2]], dim=1))
        sum_p, sum_q, trace = sums.unbind(1)
        local = edge % (n * k)
        i = target * n + edge_row[local]
        j = target * n + idx_x.view(lx, -1)[edge // (n * k), local]
        col_p = torch.zeros(size * n, ly, dtype=torch.float64, device=device).index_add_(0, j, p)
        row_q = torch.zeros(size * n, ly, dtype=torch.float64, device=device).index_add_(0, i, q)
        cross = (col_p * row_q).view(size, n, ly).sum(dim=1)
        if unbiased:
            hsic = (trace + sum_p * sum_q / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))
        else:
            row_p = torch.zeros(size * n, ly, dtype=torch.float64, device=device).index_add_(0, i, p)
            col_q = torch.zeros(size * n, ly, dtype=torch.float64, device=device).index_add_(0, j, q)
            cross = cross + (row_p * col_q).view(size, n, ly).sum(dim=1)
            hsic = trace - cross / n + sum_p * sum_q / n**2
        out.append(hsic.view(block.shape[0], lx, ly))
    return torch.cat(out)


def _cknna_null(xs: list[CknnaLayer], ys: list[CknnaLayer], perms: torch.Tensor, unbiased: bool = True, eps: float = 0.0, **_):
    """``[P, Lx, Ly]`` CKNNA with every ``y`` layer permuted by each row of ``perms [P, n]``
    (self-similarities do not change under a permutation)."""
    return _moved_hsic(xs, ys, perms, unbiased) / _denominators(xs, ys, eps)


register_plan(
    MetricPlan(
        name="cknna",
        null=_cknna_null,
        defaults={"k": 10, "unbiased": True, "eps": 0.0},
        prepare=prepare_cknna,
        prepare_fast=prepare_cknna_fast,
        pairs=_cknna_pairs,
        bounds=lambda **_: (float("-inf"), None),  # masked kernels are not PSD: no Cauchy-Schwarz bound
        permute=CknnaLayer.permuted,
        resampling="jackknife",
        scale_invariant=True,
    )
)


def cknna(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int = 10,
    unbiased: bool = True,
    eps: float = 0.0,
    normalize: bool = True,
    clip_quantile: float | None = None,
) -> torch.Tensor:
    """Centred kernel nearest-neighbour alignment (Huh et al. 2024) of ``a [n, d_a]``, ``b [n, d_b]``; 0-dim.

    ``K = a a^T``, ``L = b b^T``. For kernels ``P, Q`` let ``M_ij = 1`` iff ``j`` is among the
    top-``k`` of row ``i`` of both ``P`` and ``Q`` (self excluded when ``unbiased``), and
    ``sim(P, Q) = HSIC(M∘P, M∘Q)`` (unbiased or biased estimator to match). Then
    ``CKNNA = sim(K, L) / (sqrt(sim(K, K) sim(L, L)) + eps)``; ``2 <= k < n``. Not exactly
    symmetric in ``(a, b)`` (the masked kernels are asymmetric), as in the reference.
    ``normalize=True`` (default in every entry point) L2-normalises rows first.

    >>> a = torch.randn(60, 8)
    >>> round(float(cknna(a, a, k=5)), 5)
    1.0
    """
    return score_pair("cknna", a, b, normalize, clip_quantile, k=k, unbiased=unbiased, eps=eps)
