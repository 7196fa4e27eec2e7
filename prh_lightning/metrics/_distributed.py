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
* kernel CKA (``cka`` / ``unbiased_cka``, linear or RBF): blocked HSIC. One round of panels
  accumulates ``Σ K∘L``, ``Σ K∘K``, ``Σ L∘L`` and the row sums of ``K`` and ``L``; both
  estimators follow from those (float64 sums). The RBF median-heuristic bandwidth is the
  exact median of the union's pairwise distances by the blocked selection of
  :mod:`prh_lightning.functional._bandwidth`, its counts summed over ranks.
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

__all__ = ["SHARDED_METRICS", "ShardGroup", "sharded_score", "shards_across_ranks"]

KNN_METRICS = ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn")
SHARDED_METRICS = KNN_METRICS + ("cka", "unbiased_cka")
_BLOCK = 2**24  # entries of one [rows, panel] block (64 MB in float32)


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
        dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op], group=self.group)
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


def condition_rows(group: ShardGroup, x: Tensor, name: str, normalize: bool) -> Tensor:
    """``x [n_r, d]`` in float64, rows L2-normalised when ``normalize`` (as ``_numerics.condition``;
    a rank may hold fewer than 2 rows). An all-zero row raises on every rank."""
    x64 = x.detach().to(torch.float64)
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

    def __init__(self, group: ShardGroup, x: Tensor, sizes: list[int], name: str, normalize: bool, dtype: torch.dtype):
        self.group, self.sizes, self.name, self.dtype = group, sizes, name, dtype
        self.n = sum(sizes)
        self.offset = sum(sizes[: group.rank])
        self.input_eps = float(torch.finfo(x.dtype).eps)
        self.x64 = condition_rows(group, x, name, normalize)

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


def _scan(shard: Shard, rows: Tensor, keep: int, panel_input: Tensor, score) -> tuple[Tensor, Tensor]:
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
            inside = (own >= 0) & (own < panel.shape[0])
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


def sharded_neighbours(shard: Shard, k: int) -> Tensor:
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
    values, index = _scan(shard, rows, k + 1, right, lambda s, e, panel: left[rows[s:e]] @ panel.T)
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
    d = xc.shape[1]
    packed = torch.cat([x_scaled, right.double()], dim=1)  # float32 -> float64 -> float32 is exact

    def exact_scores(s: int, e: int, panel: Tensor) -> Tensor:
        r = redo[s:e]
        approx = (left[r] @ panel[:, d:].to(xc.dtype).T).double()
        candidates = approx >= floor[s:e, None]
        r_pos, cols = candidates.nonzero(as_tuple=True)
        out = torch.full_like(approx, float("-inf"))
        out[r_pos, cols] = (x_scaled[r[r_pos]] * panel[cols, :d]).sum(dim=1)
        return out

    idx[redo] = _scan(shard, redo, k, packed, exact_scores)[1]
    return idx


def check_copies_sharded(shard: Shard, idx_all: Tensor) -> None:
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
    split = inside < counts[kth] - (group == kth).long()
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
            self.sigma = float(sharded_median_distance(shard, self.x, self.sq)) if sigma is None else float(sigma) * scale
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
            yield x.new_empty(0)  # every rank yields at least once per panel (collectives stay in step)
            for s in range(0, x.shape[0], step):
                e = min(x.shape[0], s + step)
                block = squared_distance_block(x[s:e], panel[:, :-1], sq[s:e], panel[:, -1])
                upper = torch.arange(offset, offset + panel.shape[0], device=x.device)[None, :] > (
                    torch.arange(s, e, device=x.device) + shard.offset
                )[:, None]
                yield block[upper]

    m = n * (n - 1) // 2
    gather = lambda t: g.gather_rows(t, g.sizes(t.numel(), t.device))  # noqa: E731
    low, high = select_ranks(stream, ((m + 1) // 2, m // 2 + 1), x.dtype, x.device, reduce=g.all_reduce, gather=gather)
    return (low.sqrt() + high.sqrt()) / 2


def sharded_cka(a: Shard, b: Shard, kernel: str = "linear", unbiased: bool = False, sigma: float | None = None) -> Tensor:
    """Kernel CKA of the union (``functional.cka``) from blocked HSIC sums; float64 0-dim."""
    n = a.n
    if unbiased:
        check_min_samples(n, 4, "unbiased CKA")
    sides = [_KernelSide(a, kernel, sigma), _KernelSide(b, kernel, sigma)]
    g, device = a.group, a.x64.device
    rows_local = a.x64.shape[0]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # Σ K∘L, Σ K∘K, Σ L∘L
    row_sums = torch.zeros(2, rows_local, dtype=torch.float64, device=device)
    step = max(1, _BLOCK // max(1, max(a.sizes)))
    packed = torch.cat([sides[0].x, sides[0].sq[:, None], sides[1].x, sides[1].sq[:, None]], dim=1)
    da = sides[0].x.shape[1]
    for offset, panel in g.panels(packed, a.sizes):
        pa, pa_sq, pb, pb_sq = panel[:, :da], panel[:, da], panel[:, da + 1 : -1], panel[:, -1]
        for s in range(0, rows_local, step):
            e = min(rows_local, s + step)
            K, L = sides[0].block(slice(s, e), pa, pa_sq), sides[1].block(slice(s, e), pb, pb_sq)
            own = torch.arange(s, e, device=device) + a.offset - offset
            inside = (own >= 0) & (own < panel.shape[0])
            local = torch.arange(e - s, device=device)[inside]
            if unbiased:  # zero diagonals
                K[local, own[inside]] = 0.0
                L[local, own[inside]] = 0.0
            sums += torch.stack([(K * L).sum(), (K * K).sum(), (L * L).sum()])
            row_sums[0, s:e] += K.sum(dim=1)
            row_sums[1, s:e] += L.sum(dim=1)
    r_k, r_l = row_sums
    totals = g.all_reduce(torch.cat([sums, torch.stack([r_k @ r_l, r_k @ r_k, r_l @ r_l, r_k.sum(), r_l.sum()])]))
    s_kl, s_kk, s_ll, c_kl, c_kk, c_ll, t_k, t_l = totals

    def hsic(s_xy, c_xy, t_x, t_y):
        if unbiased:
            return (s_xy + t_x * t_y / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * c_xy) / (n * (n - 3))
        return s_xy - 2.0 / n * c_xy + t_x * t_y / n**2

    self_a, self_b = hsic(s_kk, c_kk, t_k, t_k), hsic(s_ll, c_ll, t_l, t_l)
    for value in (self_a, self_b):
        check_positive(value, "the centred kernel's self-similarity HSIC(K, K)")
    return hsic(s_kl, c_kl, t_k, t_l) / torch.sqrt(self_a * self_b)


# -- entry point -----------------------------------------------------------------------------


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
    from prh_lightning.functional import get_plan

    if metric not in SHARDED_METRICS:
        raise ValueError(f"sharded compute supports {SHARDED_METRICS}, not {metric!r}")
    group = ShardGroup(process_group)
    dtype = compute_dtype(a, b)
    (a, b), sizes = deduplicate(group, ids, a, b)
    if sum(sizes) < 2:
        raise ValueError(f"{metric} needs at least 2 samples over all processes, got {sum(sizes)}")
    sa = Shard(group, a, sizes, "a", normalize, dtype)
    sb = Shard(group, b, sizes, "b", normalize, dtype)
    plan = get_plan(metric)
    options = plan.bind(options)
    if metric in KNN_METRICS:
        if options.get("knn_backend", "exact") != "exact":
            raise ValueError('sharded compute finds exact neighbours only; use knn_backend="exact"')
        k = options["k"]
        lists = []
        for shard in (sa, sb):
            idx = group.gather_rows(sharded_neighbours(shard, k), sizes)  # [n, k] ints: small
            check_copies_sharded(shard, idx)
            lists.append(Neighbours(idx))
        score = plan.pairs([lists[0]], [lists[1]], **options)[0, 0]
    else:
        if options.get("eps", 0.0):
            raise ValueError("sharded CKA does not take eps; leave it at 0")
        unbiased = metric == "unbiased_cka" or bool(options.get("unbiased", False))
        score = sharded_cka(sa, sb, options["kernel"], unbiased, options["sigma"])
    return score.to(dtype)
