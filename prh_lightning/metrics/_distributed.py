"""Sharded compute for the buffered metrics: each rank keeps its own samples, and the ``[n, d]``
union is never gathered on one device.

Row panels travel instead: for ``r = 0 .. world - 1``, rank ``r`` broadcasts its shard
``[n_r, d]`` and every rank scores its own rows against it, so a rank holds its shard and one
other panel at a time. The global order of the samples is rank-major (rank 0's rows, then
rank 1's, ...), with repeated sample ids dropped (first copy kept): the order in which a
gathering ``compute`` would see them, so the scores are the single-process ones.

* k-NN metrics (mutual, cycle, LCS, edit): each rank keeps a running top-``k + 1`` of its
  rows over the panels, in the compute dtype on centred features (as
  ``functional.knn.exact_neighbours``), re-ranks rows whose top values are within rounding of
  each other in float64 in a second round of panels, and then gathers the ``[n, k]``
  neighbour lists (small) to score them with the metric's plan.
* CKNNA: the same lists (self kept for the biased estimator) and the kernel values at them,
  from a second round of panels; both ``[n, k]``, gathered.
* kernel CKA (``cka`` / ``unbiased_cka``, linear or RBF): blocked HSIC. One round of panels
  accumulates ``Σ K_l∘K_m`` over all layer pairs and the row sums of every ``K_l``; both
  estimators follow from those (float64 sums). The RBF median-heuristic bandwidth is the
  exact median of the union's pairwise distances by the blocked selection of
  :mod:`prh_lightning.functional._bandwidth`, its counts summed over ranks.
* SVCCA: ``[d, d]`` statistics only (column moments, ``Z^T Z`` for the singular directions,
  ``U_x^T U_y``), summed over ranks.

A sharded compute must run on every rank (it is a sequence of collectives); input errors that
depend on the union (constant features, all-zero rows, ``k >= n``) are raised on every rank.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from prh_lightning.functional._bandwidth import select_ranks, squared_distance_block
from prh_lightning.functional._numerics import CONSTANT_RTOL, compute_dtype, power_of_two_scale
from prh_lightning.functional._ties import MAX_AFFECTED, AmbiguousNeighbours
from prh_lightning.functional._validation import check_k, check_min_samples, check_positive
from prh_lightning.functional.knn import Neighbours, _top_k
from prh_lightning.metrics._checks import first_occurrences

__all__ = ["SHARDED_METRICS", "ShardGroup", "sharded_matrix", "sharded_score", "shards_across_ranks"]

KNN_METRICS = ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn")
SHARDED_METRICS = KNN_METRICS + ("cknna", "cka", "unbiased_cka", "svcca")
_BLOCK = 2**24  # entries of one [rows, panel] block (64 MB in float32)
_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def shards_across_ranks(process_group: Any = None) -> bool:
    """Is there more than one process in ``process_group`` (torch.distributed initialised)?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


class ShardGroup:
    """The collectives the sharded compute needs, over one process group."""

    def __init__(self, process_group: Any = None):
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """``t`` combined over ranks (``"sum"``, ``"min"`` or ``"max"``); a new tensor."""
        out = t.clone()
        dist.all_reduce(out, op=_OPS[op], group=self.group)
        return out

    def sizes(self, n_local: int, device: torch.device) -> list[int]:
        """Rows held by every rank."""
        out = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor([n_local], dtype=torch.long, device=device), group=self.group)
        return [int(t) for t in out]

    def gather_rows(self, t: Tensor, sizes: list[int]) -> Tensor:
        """Concatenate every rank's ``t [sizes[rank], ...]`` in rank order (for small tensors:
        ids, neighbour lists); uneven sizes are padded for the transfer."""
        width = max(sizes)
        padded = t.new_zeros((width, *t.shape[1:]))
        padded[: t.shape[0]] = t
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded, group=self.group)
        return torch.cat([o[:s] for o, s in zip(out, sizes)])

    def panels(self, x: Tensor, sizes: list[int]) -> Iterator[tuple[int, Tensor]]:
        """``(offset, panel [n_r, ...])`` for every rank ``r`` in order: its rows, broadcast to all.
        Only one other rank's panel is held at a time."""
        offset = 0
        for r, size in enumerate(sizes):
            if r == self.rank:
                panel = x.contiguous()
            else:
                panel = x.new_empty((size, *x.shape[1:]))
            if size:
                dist.broadcast(panel, src=self._global(r), group=self.group)
            yield offset, panel
            offset += size


# -- the samples: de-duplication and conditioning -------------------------------------------


def deduplicate(group: ShardGroup, ids: Tensor | None, *local: Tensor) -> tuple[list[Tensor], list[int]]:
    """Drop the rows whose sample id appeared earlier in rank-major order; returns the kept
    local rows and every rank's kept count. Repeated ids must carry the same features (as in
    ``_checks.drop_duplicate_ids``): the rows involved (few: a sampler's padding) are
    gathered and compared."""
    device = local[0].device
    sizes = group.sizes(local[0].shape[0], device)
    with_ids = int(group.all_reduce(torch.tensor(int(ids is not None), device=device)))
    if with_ids == 0:
        return list(local), sizes
    if with_ids < group.world or ids.numel() != local[0].shape[0]:
        raise ValueError("pass `index` (one sample id per sample) on every rank or on none")
    everyone = group.gather_rows(ids, sizes)  # [n_total] ints: small
    keep = torch.zeros(everyone.numel(), dtype=torch.bool, device=device)
    keep[first_occurrences(everyone)] = True
    start = sum(sizes[: group.rank])
    mine = keep[start : start + sizes[group.rank]]
    repeated = torch.unique(everyone[~keep])
    if repeated.numel():  # compare every copy with the first one (rank-major order is kept by the gather)
        involved = torch.isin(ids, repeated)
        counts = group.sizes(int(involved.sum()), device)
        who = group.gather_rows(ids[involved], counts)
        first = first_occurrences(who)
        _, slot = torch.unique(who, return_inverse=True)
        source = torch.empty_like(first)
        source[slot[first]] = first
        for x in local:
            rows = group.gather_rows(x[involved], counts)
            if not torch.allclose(rows, rows[source[slot]], rtol=1e-3, atol=1e-5):
                raise ValueError(
                    "rows with the same sample id have different features; `index` must identify samples "
                    "(e.g. dataset indices), and the model must be deterministic (eval mode) while measuring"
                )
    kept = group.sizes(int(mine.sum()), device)
    return [x[mine] for x in local], kept


def condition_rows(
    group: ShardGroup, x: Tensor, name: str, normalize: bool, clip_quantile: float | None = None
) -> Tensor:
    """``x [n_r, d]`` in float64, outliers clipped and rows L2-normalised as ``_numerics.condition``
    does on the union (the clipping threshold, a mean over samples, is reduced over ranks; a
    rank may hold fewer than 2 rows). An all-zero row raises on every rank."""
    x64 = x.detach().to(torch.float64)
    if clip_quantile is not None:
        number = isinstance(clip_quantile, (int, float)) and not isinstance(clip_quantile, bool)
        if not number or not 0.0 < clip_quantile <= 1.0:
            raise ValueError(f"clip_quantile must be in (0, 1], got {clip_quantile!r}")
        if clip_quantile < 1.0:
            rows = max(1, 2**23 // max(1, x64.shape[1]))  # torch.quantile refuses inputs above 2**24 elements
            starts = range(0, x64.shape[0], rows)
            chunks = [torch.quantile(x64[s : s + rows].abs(), clip_quantile, dim=1) for s in starts]
            per_sample = torch.cat(chunks) if chunks else x64.new_zeros(0)
            total = group.all_reduce(torch.stack([per_sample.sum(), x64.new_tensor(float(x64.shape[0]))]))
            t = total[0] / total[1]
            x64 = x64.clamp(-t, t)
    if not normalize:
        return x64
    if x.dtype == torch.float64 and x64.numel():  # exact power-of-two rescale against over/underflow
        x64 = x64 * power_of_two_scale(float(x64.abs().max()))
    norms = torch.linalg.vector_norm(x64, dim=1, keepdim=True)
    zero = int(group.all_reduce(torch.tensor(int((norms == 0).sum()), device=x.device)))
    if zero:
        raise ValueError(
            f"{name} has {zero} all-zero rows; they have no direction and cannot be L2-normalised; drop such "
            "samples or pass normalize=False"
        )
    return x64 / norms


class Shard:
    """One layer's rows on this rank after conditioning: ``x64 [n_r, d]`` (float64) and the global
    facts the metrics need (total ``n``, every rank's size, this rank's offset)."""

    def __init__(
        self,
        group: ShardGroup,
        x: Tensor,
        sizes: list[int],
        name: str,
        normalize: bool,
        dtype: torch.dtype,
        clip_quantile: float | None = None,
    ):
        self.group, self.sizes, self.name, self.dtype = group, sizes, name, dtype
        self.n = sum(sizes)
        self.offset = sum(sizes[: group.rank])
        self.input_eps = float(torch.finfo(x.dtype).eps)
        self.x64 = condition_rows(group, x, name, normalize, clip_quantile)

    def centred(self, exact_mean: bool) -> tuple[Tensor, Tensor, float]:
        """``(xc [n_r, d] compute dtype, mean [d] float64, scale)`` as ``_numerics.centre`` does on
        the union: column ranges and means reduced over ranks; constant data raises."""
        x64, g = self.x64, self.group
        d = x64.shape[1]
        inf = torch.full((d,), float("inf"), dtype=torch.float64, device=x64.device)
        low = g.all_reduce(x64.amin(dim=0) if x64.shape[0] else inf, "min")
        high = g.all_reduce(x64.amax(dim=0) if x64.shape[0] else -inf, "max")
        spread = float((high - low).max())
        size = max(-float(low.min()), float(high.max()))
        if spread <= CONSTANT_RTOL * self.input_eps * size:
            raise ValueError(
                f"{self.name} is constant across its {self.n} samples (constant features: every row equals the "
                "others up to rounding), so the score is undefined; check for collapsed or all-equal representations"
            )
        mean = g.all_reduce(x64.sum(dim=0)) / self.n
        if not exact_mean:  # _numerics.grid_pivot of the union: exact subtraction, ties kept
            step = math.ldexp(1.0, math.frexp(spread)[1] - 1)
            mean = torch.round(mean / step) * step
        scale = power_of_two_scale(float(torch.maximum(high - mean, mean - low).max()))
        return ((x64 - mean) * scale).to(self.dtype), mean * scale, scale


# -- k-NN: running top-k over panels ---------------------------------------------------------


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


def sharded_cknna_layer(shard: Shard, k: int, unbiased: bool):
    """``functional.cknna.CknnaLayer`` of the union for one layer: lists and ``K_ij`` at them
    (float64, from the conditioned rows, in a second round of panels), gathered (``[n, k]``)."""
    from prh_lightning.functional.cknna import CknnaLayer, _masked_hsic_against

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
    layer = CknnaLayer(idx_all, val_all, torch.zeros_like(val_all))
    layer.back = layer.lookup(idx_all, torch.arange(shard.n, device=idx.device)[:, None])[1]
    layer.self_sim = _masked_hsic_against(layer, [layer], unbiased)[0]
    check_positive(layer.self_sim, f"the CKNNA self-similarity sim(K, K) of {shard.name}")
    return layer


# -- SVCCA: d x d statistics -------------------------------------------------------------------


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


def check_every_rank_has_samples(has: bool, process_group: Any = None) -> None:
    """Raise on every rank (no rank left waiting in a collective) unless all ranks hold samples."""
    group = ShardGroup(process_group)
    missing = group.world - int(group.all_reduce(torch.tensor(int(has))))
    if missing:
        raise RuntimeError(
            f"{missing} of {group.world} ranks hold no samples; every rank must update before a sharded compute()"
        )


def sharded_matrix(
    metric: str,
    xs: list[Tensor],
    ys: list[Tensor] | None,
    ids: Tensor | None,
    normalize: bool = True,
    clip_quantile: float | None = None,
    process_group: Any = None,
    **options: Any,
) -> Tensor:
    """``[Lx, Ly]`` float64 scores of every layer pair (``alignment_matrix``) of the union of every
    rank's layers ``xs[l] [n_r, d_l]`` (and ``ys``), repeated ``ids`` dropped, without gathering
    the features; the same on every rank."""
    from prh_lightning.functional import get_plan

    if metric not in SHARDED_METRICS:
        raise ValueError(f"sharded compute supports {SHARDED_METRICS}, not {metric!r}")
    plan = get_plan(metric)
    options = plan.bind(options)
    group = ShardGroup(process_group)
    layers = xs + (ys or [])
    dtype = compute_dtype(*layers)
    kept, sizes = deduplicate(group, ids, *layers)
    if sum(sizes) < 2:
        raise ValueError(f"{metric} needs at least 2 samples over all processes, got {sum(sizes)}")
    names = [f"xs[{i}]" for i in range(len(xs))] + [f"ys[{i}]" for i in range(len(ys or []))]
    shards = [Shard(group, x, sizes, name, normalize, dtype, clip_quantile) for x, name in zip(kept, names)]
    sx, sy = shards[: len(xs)], (None if ys is None else shards[len(xs) :])
    if metric in KNN_METRICS or metric == "cknna":
        if options.get("knn_backend", "exact") != "exact":
            raise ValueError('sharded compute finds exact neighbours only; use knn_backend="exact"')
        if metric == "cknna":
            states = [sharded_cknna_layer(shard, options["k"], options["unbiased"]) for shard in shards]
        else:
            states = []
            for shard in shards:
                idx = group.gather_rows(sharded_neighbours(shard, options["k"]), sizes)  # [n, k] ints: small
                check_copies_sharded(shard, idx)
                states.append(Neighbours(idx))
        lx = len(xs)
        return plan.pairs(states[:lx], states if ys is None else states[lx:], **options).double()
    if metric == "svcca":
        return sharded_svcca(sx, sy, options["dim"])
    if options.get("eps", 0.0):
        raise ValueError("sharded CKA does not take eps; leave it at 0")
    unbiased = metric == "unbiased_cka" or bool(options.get("unbiased", False))
    return sharded_cka(sx, sy, options["kernel"], unbiased, options["sigma"])


def sharded_score(
    metric: str,
    a: Tensor,
    b: Tensor,
    ids: Tensor | None,
    normalize: bool,
    process_group: Any = None,
    **options: Any,
) -> Tensor:
    """``functional.METRICS[metric]`` of the union of every rank's ``a [n_r, d_a]``, ``b [n_r, d_b]``
    (repeated ``ids`` dropped), computed without gathering the features; 0-dim, the same on
    every rank, in the compute dtype (float64 for float64 input, else float32)."""
    scores = sharded_matrix(metric, [a], [b], ids, normalize, None, process_group, **options)
    return scores[0, 0].to(compute_dtype(a, b))
