"""Representational similarity analysis: RDMs and their rank / linear correlation, and its plan.

Per layer: one condensed RDM (``n (n - 1) / 2`` pairs ``i < j``), ranked once (Spearman),
centred and scaled to unit norm in float64; every layer pair is then one dot product, so the
whole ``[Lx, Ly]`` matrix is a single matrix product. Distances are formed from rows centred
in float64 (all three distances are functions of ``||u_i - u_j||`` for some row transform
``u``, which is translation invariant), so common offsets do not cost precision.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ._numerics import centre
from ._plan import MetricPlan, register_plan, score_pair
from ._ties import row_copies
from ._validation import check_choice, check_features, check_min_samples, check_pair, check_positive

__all__ = ["rsa"]

DISTANCES = ("correlation", "cosine", "euclidean")
COMPARISONS = ("spearman", "pearson", "kendall")


def _unit_rows(x: torch.Tensor, what: str) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    zero = (norms.squeeze(1) == 0).nonzero().flatten()
    if zero.numel():
        raise ValueError(
            f"{what} distance is undefined for samples with a zero-norm{' centred' if what == 'correlation' else ''} "
            f"row (e.g. sample {int(zero[0])}); use distance='euclidean' or drop those samples"
        )
    return x / norms


def rdm(x: torch.Tensor, distance: str = "correlation") -> torch.Tensor:
    """Representational dissimilarity matrix ``[n, n]`` of ``x [n, d]`` (zero diagonal).

    ``correlation``: ``1 - corr(x_i, x_j)`` (rows centred); ``cosine``: ``1 - cos(x_i, x_j)``;
    ``euclidean``: ``||x_i - x_j||``. Same definitions as ``scipy.spatial.distance.pdist``.
    """
    check_features(x, "x")
    check_choice(distance, DISTANCES, "distance")
    if distance == "euclidean":
        return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").fill_diagonal_(0.0)
    rows = x - x.mean(dim=1, keepdim=True) if distance == "correlation" else x
    unit = _unit_rows(rows, distance)
    return (1.0 - unit @ unit.T).fill_diagonal_(0.0)


def condensed(square: torch.Tensor) -> torch.Tensor:
    """Upper triangle (``i < j``, row-major, as ``scipy.spatial.distance.squareform``) -> ``[n(n-1)/2]``."""
    n = square.shape[0]
    iu = torch.triu_indices(n, n, offset=1, device=square.device)
    return square.reshape(-1).index_select(0, iu[0] * n + iu[1])


def rankdata(v: torch.Tensor) -> torch.Tensor:
    """Ranks ``1..m`` of a 1-D tensor, ties get their average rank (``scipy.stats.rankdata``).

    >>> rankdata(torch.tensor([0.5, 0.1, 0.5, 0.9]))
    tensor([2.5000, 1.0000, 2.5000, 4.0000])
    """
    if v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64) and v.numel() > 1:
        return _rankdata_numpy(v.contiguous())
    sorted_v, order = torch.sort(v)  # ties in any order: each tie group gets its average rank below
    ranks = torch.empty_like(v)
    if not bool((sorted_v[1:] == sorted_v[:-1]).any()):  # no ties (the usual case): ranks are positions
        ranks[order] = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
        return ranks
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(v.dtype)
    group_rank = ends - (counts.to(v.dtype) - 1) / 2
    ranks[order] = group_rank[inverse]
    return ranks


def _rankdata_numpy(v: torch.Tensor) -> torch.Tensor:
    """:func:`rankdata` on CPU through numpy's argsort (about 4x faster than ``torch.sort`` on
    1e5 float64 values here)."""
    return torch.from_numpy(_ranks_numpy(v.numpy(), None)[0])


def _ranks_numpy(a: np.ndarray, no_ties: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """``(ranks, ties)`` of a 1-D array (average ranks for ties). Without ties, the entry of
    sorted position ``p`` is ``no_ties[p]`` when given (e.g. standardised ranks), else ``p + 1``."""
    order = np.argsort(a)  # not stable: tie groups get their average rank, so their order does not matter
    sorted_a = a[order]
    ranks = np.empty(a.shape, dtype=a.dtype)
    same = sorted_a[1:] == sorted_a[:-1]
    if not same.any():
        ranks[order] = np.arange(1, a.size + 1, dtype=a.dtype) if no_ties is None else no_ties
        return ranks, False
    starts = np.flatnonzero(np.concatenate(([True], ~same)))  # first position of each tie group
    counts = np.diff(np.append(starts, a.size))
    group_rank = starts + (counts + 1) / 2.0  # positions start..start+count-1 -> ranks start+1..start+count
    ranks[order] = np.repeat(group_rank, counts).astype(a.dtype, copy=False)
    return ranks, True


@functools.lru_cache(maxsize=1)
def _standard_ranks(m: int) -> np.ndarray:
    """Ranks ``1..m`` centred and scaled to unit norm (float64): a tie-free RDM's ranked state."""
    r = np.arange(1, m + 1, dtype=np.float64) - (m + 1) / 2.0
    return r / np.linalg.norm(r)


def _check_spread(u: torch.Tensor, name: str) -> None:
    if bool((u == u[0]).all()):
        raise ValueError(
            f"all dissimilarities equal in the RDM of {name}, so its correlation with another RDM is undefined "
            "(0/0); check for collapsed representations"
        )


def _row_transform(x64: torch.Tensor, distance: str, name: str) -> torch.Tensor:
    """Rows ``u`` with ``distance(x_i, x_j)`` a function of ``||u_i - u_j||`` (float64)."""
    if distance == "euclidean":
        return x64
    rows = x64 - x64.mean(dim=1, keepdim=True) if distance == "correlation" else x64
    return _unit_rows(rows, distance if distance == "correlation" else "cosine")


def _upper_flat(n: int, device: torch.device) -> torch.Tensor:
    """``[n(n-1)/2]`` flat positions ``i * n + j`` of the pairs ``i < j`` (row-major)."""
    if n <= _CACHED_N:
        return _upper_flat_cached(n, str(device))
    iu = torch.triu_indices(n, n, offset=1, device=device)
    return iu[0] * n + iu[1]


_CACHED_N = 2048  # up to 16 MB of indices kept between calls


@functools.lru_cache(maxsize=2)
def _upper_flat_cached(n: int, device: str) -> torch.Tensor:
    iu = torch.triu_indices(n, n, offset=1, device=device)
    return iu[0] * n + iu[1]


def _condensed_distances(x64: torch.Tensor, distance: str, ctx) -> torch.Tensor:
    """Condensed RDM ``[m]`` (float64) of conditioned features ``x64 [n, d]``."""
    u = _row_transform(x64, distance, ctx.name)
    c = centre(u, ctx.input_eps, ctx.dtype, ctx.name, exact_mean=False)
    sq = (c.xc.double() ** 2).sum(dim=1)
    n = sq.shape[0]
    flat = _upper_flat(n, sq.device)
    gram = c.xc @ c.xc.T
    copies = row_copies(u)
    if copies is not None:
        # identical rows must give exactly equal dissimilarities (Spearman ties), but a GEMM may round
        # the same row differently at different offsets: read every pair from its representatives'
        # entry of the upper triangle, and copies of one row are at distance 0
        gram = torch.triu(gram) + torch.triu(gram, 1).T
        gram, sq = gram[copies][:, copies], sq[copies]
    gram = gram.view(-1).index_select(0, flat).double()  # only the m = n (n - 1) / 2 pairs i < j
    v = (sq[:, None] + sq[None, :]).view(-1).index_select(0, flat).sub_(gram, alpha=2.0)
    v = v.clamp_min_(0.0).div_(c.scale**2)
    if copies is not None:
        v[copies[flat // n] == copies[flat % n]] = 0.0
    if distance == "euclidean":
        return v.sqrt_()
    return v.div_(2.0)  # 1 - cos(u_i, u_j) = ||u_i - u_j||^2 / 2 for unit rows


def _prepare(x64: torch.Tensor, ctx, distance: str = "correlation", compare: str = "spearman", **_) -> torch.Tensor:
    """Per-layer work of RSA: the condensed RDM, ranked (Spearman), centred, unit norm: ``[m]`` float64."""
    check_min_samples(x64.shape[0], 3, "rsa")
    v = _condensed_distances(x64, distance, ctx)
    _check_spread(v, ctx.name)
    if compare == "kendall":
        return v
    if compare == "spearman":
        if v.device.type == "cpu" and v.numel() <= _CACHED_N * (_CACHED_N - 1) // 2:
            ranks, ties = _ranks_numpy(v.numpy(), _standard_ranks(v.numel()))
            if not ties:  # already centred, unit norm
                return torch.from_numpy(ranks)
            v = torch.from_numpy(ranks)
        else:
            v = rankdata(v)
    v = v - v.mean()
    norm = v.norm()
    check_positive(norm, f"the spread of the RDM of {ctx.name}")
    return v / norm


def _pairs(xs: list[torch.Tensor], ys: list[torch.Tensor], compare: str = "spearman", **_) -> torch.Tensor:
    if compare == "kendall":
        return torch.tensor([[float(_kendall(u, v)) for v in ys] for u in xs], dtype=torch.float64, device=xs[0].device)
    return (torch.stack(xs) @ torch.stack(ys).T).clamp(-1.0, 1.0)  # rounding can leave |r| a hair above 1


def _kendall(u: torch.Tensor, v: torch.Tensor) -> float:
    from .._optional import require

    kendalltau = require("scipy.stats", extra="stats", purpose="rsa(compare='kendall')").kendalltau  # tau-b, CPU

    return float(kendalltau(u.detach().double().cpu().numpy(), v.detach().double().cpu().numpy()).statistic)


def condensed_positions(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(iu [2, m], pos [n * n])``: the ``m = n(n-1)/2`` pairs ``i < j`` and, for any ``(i, j)``,
    ``pos[i * n + j]`` = index of the unordered pair in the condensed vector (diagonal unused)."""
    iu = torch.triu_indices(n, n, offset=1, device=device)
    slot = torch.arange(iu.shape[1], device=device)
    pos = torch.zeros(n, n, dtype=torch.long, device=device)
    pos[iu[0], iu[1]] = slot
    pos[iu[1], iu[0]] = slot
    return iu, pos.flatten()


def _permute(v: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Condensed vector of the RDM with samples reordered: entry ``(i, j)`` <- ``(perm[i], perm[j])``."""
    m = v.shape[-1]
    n = int(round((1 + (1 + 8 * m) ** 0.5) / 2))
    iu, pos = condensed_positions(n, v.device)
    return v[pos[perm[iu[0]] * n + perm[iu[1]]]]


register_plan(
    MetricPlan(
        name="rsa",
        defaults={"distance": "correlation", "compare": "spearman"},
        prepare=_prepare,
        pairs=_pairs,
        bounds=lambda **_: (-1.0, 1.0),
        permute=_permute,
        resampling="jackknife",
        option_checks={
            "distance": lambda d: check_choice(d, DISTANCES, "distance"),
            "compare": lambda c: check_choice(c, COMPARISONS, "compare"),
        },
    )
)


def rsa(
    a: torch.Tensor,
    b: torch.Tensor,
    distance: str = "correlation",
    compare: str = "spearman",
    normalize: bool = True,
    clip_quantile: float | None = None,
) -> torch.Tensor:
    """RSA score of ``a [n, d_a]``, ``b [n, d_b]``; returns 0-dim in ``[-1, 1]``.

    ``score = compare(condensed(rdm(a)), condensed(rdm(b)))`` over the ``n(n-1)/2`` pairs
    ``i < j``: ``spearman`` (Pearson of average-tie ranks), ``pearson``, or ``kendall``
    (tau-b via ``scipy.stats.kendalltau``, computed on CPU). Symmetric in ``a, b``; ``n >= 3``.
    ``normalize=True`` (default in every entry point) L2-normalises rows first (no effect on
    correlation and cosine RDMs; pass ``normalize=False`` for Euclidean RDMs of raw features).

    >>> a = torch.randn(30, 5)
    >>> round(float(rsa(a, 2 * a + 7)), 5)
    1.0
    """
    check_pair(a, b)
    return score_pair("rsa", a, b, normalize, clip_quantile, distance=distance, compare=compare)
