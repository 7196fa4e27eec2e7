"""Sharded neighbour search: a running top-``k + 1`` of each rank's rows over the panels of
every rank, float64 re-ranking of rows within rounding of a tie, the identical-copies check
across ranks, and CKNNA's per-layer state (lists and kernel values at them)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from prh_lightning.functional._ties import MAX_AFFECTED, AmbiguousNeighbours
from prh_lightning.functional._validation import check_k, check_min_samples
from prh_lightning.functional.knn import _top_k
from prh_lightning.metrics._shards import _BLOCK, Shard


def _merge(values: Tensor, index: Tensor, new_values: Tensor, new_index: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """The best ``keep`` of two candidate sets per row, larger value first, then lower index."""
    v, i = torch.cat([values, new_values], dim=1), torch.cat([index, new_index], dim=1)
    order = torch.sort(i, dim=1, stable=True).indices
    v, i = torch.gather(v, 1, order), torch.gather(i, 1, order)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.gather(v, 1, order), torch.gather(i, 1, order)


def _scan(
    shard: Shard, rows: Tensor, keep: int, panel_input: Tensor, score, exclude_self: bool = True
) -> tuple[Tensor, Tensor]:
    """Top-``keep`` (values, global indices) of ``score(s, e, panel) -> [e - s, n_p]`` for local
    ``rows[s:e]`` over every rank's panel of ``panel_input``, self excluded; ties: lower index first."""
    c = rows.numel()
    values = torch.full((c, keep), float("-inf"), dtype=torch.float64, device=rows.device)
    index = torch.full((c, keep), shard.n, dtype=torch.long, device=rows.device)
    step = max(1, _BLOCK // max(1, max(shard.sizes)))
    for offset, panel in shard.group.panels(panel_input, shard.sizes):
        if panel.shape[0] == 0:
            continue
        for s in range(0, c, step):
            e = min(c, s + step)
            block = score(s, e, panel)
            own = rows[s:e] + shard.offset - offset  # column of the row itself in this panel
            inside = (own >= 0) & (own < panel.shape[0]) & exclude_self
            block[torch.arange(e - s, device=block.device)[inside], own[inside]] = float("-inf")
            width = min(keep, panel.shape[0])
            if width < panel.shape[0]:
                top = _top_k(block, width)[0]
            else:
                top = torch.arange(width, device=block.device).expand(e - s, width)
            merged = _merge(values[s:e], index[s:e], torch.gather(block, 1, top).double(), top + offset, keep)
            values[s:e], index[s:e] = merged
    return values, index


def _rounding_bound(xc: Tensor, shift_max: float, norm_max: float) -> tuple[Tensor, float]:
    """``(base [n_r], rel)``: ``|fl(r_ij) - r_ij| <= base_i + rel |fl(r_ij)|`` for the compute-dtype
    scores ``r_ij = xc_i . xc_j + shift_j`` in any summation order (``gamma_d`` bound of a dot
    product, the casts of ``xc`` and ``shift``, the final addition); ``norm_max`` is the union's
    largest ``|xc_j|``, already inflated by :func:`_inflated_norms`."""
    d = xc.shape[1]
    unit = float(torch.finfo(xc.dtype).eps) / 2
    gamma = (d + 3) * unit / (1 - (d + 3) * unit)
    return gamma * _inflated_norms(xc) * norm_max + 3 * unit * shift_max, 4 * unit


def _inflated_norms(xc: Tensor) -> Tensor:
    """``|xc_i|`` in float64, raised by the relative error a compute-dtype norm may carry."""
    unit = float(torch.finfo(xc.dtype).eps) / 2
    d = xc.shape[1]
    return torch.linalg.vector_norm(xc, dim=1).double() * (1 + (d + 2) * unit / (1 - (d + 2) * unit))


def sharded_neighbours(shard: Shard, k: int, exclude_self: bool = True) -> Tensor:
    """``[n_r, k]`` global neighbour lists of this rank's rows among the union's: the exact ranking
    by ``x_i . x_j`` (ties: lower index first), as ``functional.knn.exact_neighbours`` gives on the
    gathered features.

    First round: scores ``r_ij = xc_i . xc_j + m . xc_j`` in the compute dtype, a running
    top-``k + 1``. Rows whose top gaps are within twice the rounding bound are ranked again in
    float64 in a second round, among their candidates only (columns whose compute-dtype score is
    within three bounds of the ``k``-th), each product an elementwise product summed in one fixed
    order so that identical rows score identically.
    """
    check_k(k, shard.n)
    xc, mean, scale = shard.centred(exact_mean=False)
    g = shard.group
    x_scaled = shard.x64 * scale
    shift = (x_scaled - mean) @ mean
    # r_ij as one product of [xc_i, 1] with [xc_j, m . xc_j]
    left = torch.cat([xc, torch.ones_like(xc[:, :1])], dim=1)
    right = torch.cat([xc, shift.to(xc.dtype)[:, None]], dim=1)
    rows = torch.arange(xc.shape[0], device=xc.device)
    values, index = _scan(shard, rows, k + 1, right, lambda s, e, panel: left[rows[s:e]] @ panel.T, exclude_self)
    idx = index[:, :k].clone()
    if xc.dtype == torch.float64:
        return idx
    zero = torch.zeros((), dtype=torch.float64, device=xc.device)
    norm_max = float(g.all_reduce(_inflated_norms(xc).max() if xc.shape[0] else zero, "max"))
    shift_max = float(g.all_reduce(shift.to(xc.dtype).double().abs().max() if xc.shape[0] else zero, "max"))
    base, rel = _rounding_bound(xc, shift_max, norm_max)
    finite = torch.isfinite(values)
    tol = base + rel * values.abs().where(finite, 0.0).amax(dim=1)
    gaps = (values[:, :-1] - values[:, 1:]).where(finite[:, 1:], float("inf"))
    redo = (gaps <= 2 * tol[:, None]).any(dim=1).nonzero().flatten()
    if not int(g.all_reduce(torch.tensor(redo.numel(), device=xc.device))):
        return idx
    floor = values[redo, k - 1] - 3 * tol[redo]

    def exact_scores(s: int, e: int, panel: Tensor) -> Tensor:
        """Float64 products of rows ``redo[s:e]`` with their candidates in ``panel`` (rescaled
        float64 rows, from which the compute-dtype scores are formed again: ``xc_j`` exactly)."""
        r = redo[s:e]
        centred = panel - mean
        right_p = torch.cat([centred.to(xc.dtype), (centred @ mean).to(xc.dtype)[:, None]], dim=1)
        approx = (left[r] @ right_p.T).double()
        candidates = approx >= floor[s:e, None]
        r_pos, cols = candidates.nonzero(as_tuple=True)
        out = torch.full_like(approx, float("-inf"))
        out[r_pos, cols] = (x_scaled[r[r_pos]] * panel[cols]).sum(dim=1)
        return out

    idx[redo] = _scan(shard, redo, k, x_scaled, exact_scores, exclude_self)[1]
    return idx


def check_copies_sharded(shard: Shard, idx_all: Tensor, exclude_self: bool = True) -> None:
    """``_ties.check_copies_at_boundary`` over the union: refuse neighbour lists ``idx_all [n, k]``
    that cut through groups of identical rows. Only rows whose random projection collides with
    another's (identical rows do) are gathered."""
    g, x64 = shard.group, shard.x64
    probe = torch.randn(x64.shape[1], generator=torch.Generator().manual_seed(0), dtype=x64.dtype).to(x64.device)
    projections = g.gather_rows(x64 @ probe, shard.sizes)
    _, inverse, counts = torch.unique(projections, return_inverse=True, return_counts=True)
    suspects = counts[inverse] > 1
    if not bool(suspects.any()):
        return
    local = suspects[shard.offset : shard.offset + x64.shape[0]]
    rows = g.gather_rows(x64[local], g.sizes(int(local.sum()), x64.device))
    _, copy_group, copy_counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    n = shard.n
    group = torch.arange(n, device=x64.device) + copy_counts.numel()  # singletons: their own group
    group[suspects] = copy_group
    counts = torch.ones(n + copy_counts.numel(), dtype=torch.long, device=x64.device)
    counts[: copy_counts.numel()] = copy_counts
    kth = group[idx_all[:, -1]]
    inside = (group[idx_all] == kth[:, None]).sum(dim=1)
    split = inside < counts[kth] - (exclude_self & (group == kth)).long()
    affected = int(split.sum())
    if 0 < affected <= MAX_AFFECTED * n:
        warnings.warn(
            f"{shard.name}: a few samples have identical copies at the k-th neighbour place; their neighbour sets "
            "follow the order of the rows (each moves the score by at most 1/n of its range)",
            stacklevel=3,
        )
    elif affected:
        raise AmbiguousNeighbours(
            f"{shard.name}: for {affected} of {n} samples the k-th neighbour has identical copies both inside and "
            "outside the neighbour list, so the neighbour sets would depend on the order of the samples; remove "
            "duplicate rows or use a metric without neighbour lists such as cka"
        )


# -- kernel CKA: blocked HSIC ------------------------------------------------------------------




def sharded_cknna_layer(shard: Shard, k: int, unbiased: bool):
    """``functional.cknna.CknnaLayer`` of the union for one layer: lists and ``K_ij`` at them
    (float64, from the conditioned rows, in a second round of panels), gathered (``[n, k]``)."""
    from prh_lightning.functional.cknna import CknnaLayer

    check_k(k, shard.n, minimum=2)
    if unbiased:
        check_min_samples(shard.n, 4, "unbiased CKNNA")
    g, x64 = shard.group, shard.x64
    idx = sharded_neighbours(shard, k, exclude_self=unbiased)
    val = torch.zeros(idx.shape, dtype=torch.float64, device=idx.device)
    for offset, panel in g.panels(x64, shard.sizes):
        there = (idx >= offset) & (idx < offset + panel.shape[0])
        r, t = there.nonzero(as_tuple=True)
        val[r, t] = (x64[r] * panel[idx[r, t] - offset]).sum(dim=1)
    idx_all = g.gather_rows(idx, shard.sizes)
    check_copies_sharded(shard, idx_all, exclude_self=unbiased)
    val_all = g.gather_rows(val, shard.sizes)
    return CknnaLayer.from_lists(idx_all, val_all, unbiased, shard.name)


# -- SVCCA: d x d statistics -------------------------------------------------------------------


