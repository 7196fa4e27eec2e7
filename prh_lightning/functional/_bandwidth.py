"""The median-heuristic RBF bandwidth at any ``n``, exactly, without an ``[n, n]`` matrix.

``median_{i<j} ||x_i - x_j||`` needs the ``(m + 1) // 2``-th and ``m // 2 + 1``-th smallest of
``m = n (n - 1) / 2`` distances. A dense ``[n, n]`` matrix holds them all (10 GB in float32 at
n = 50,000). Here the distances are streamed in row blocks of the upper triangle, and each
pass counts them into ``bins`` buckets of the interval known to hold the wanted ranks; the
bucket holding them becomes the next interval. Once the interval holds at most ``cap``
distances they are collected and selected exactly. A pass costs one ``n x n x d`` product, and
each narrows the interval by about ``bins`` (typically 2-3 passes).

Selection is on squared distances (``sqrt`` is monotone, so the k-th root is the root of the
k-th square), each computed by the same formula as ``kernels._squared_distances``.

The passes are written against a *source* of distance blocks, with optional reductions, so
:mod:`prh_lightning.metrics._distributed` reuses them across ranks (each rank streams its
rows' blocks; counts are summed, the final candidates gathered).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["median_bandwidth", "select_ranks", "triangle_blocks", "squared_distance_block"]

BINS = 4096
CAP = 2**22  # distances collected at once for the exact selection (16-32 MB)
_DENSE = 4096  # up to this n the whole matrix is small (64 MB in float32): select from it directly

Source = Callable[[], Iterable[torch.Tensor]]  # each call streams every distance once (1-D blocks)


def squared_distance_block(left: torch.Tensor, right: torch.Tensor, sq_left: torch.Tensor, sq_right: torch.Tensor) -> torch.Tensor:
    """``[r, c]`` squared distances ``|l_i|^2 + |r_j|^2 - 2 l_i . r_j`` between ``left [r, d]`` and
    ``right [c, d]``; entries below the formula's rounding error are exact zeros (as in
    ``kernels._squared_distances``)."""
    total = sq_left[:, None] + sq_right[None, :]
    d2 = total - 2.0 * (left @ right.T)
    return d2.masked_fill_(d2 <= 16 * torch.finfo(left.dtype).eps * total, 0.0)


def triangle_blocks(x: torch.Tensor, rows: int) -> Source:
    """A source streaming the ``n (n - 1) / 2`` squared distances ``i < j`` of ``x [n, d]`` in
    blocks of ``rows`` rows against the columns to their right."""
    sq = (x * x).sum(dim=1)
    n = x.shape[0]

    def stream() -> Iterable[torch.Tensor]:
        for s in range(0, n - 1, rows):
            e = min(n, s + rows)
            block = squared_distance_block(x[s:e], x[s + 1 :], sq[s:e], sq[s + 1 :])
            # row s + i keeps columns j > s + i, i.e. block columns >= i
            keep = torch.arange(n - s - 1, device=x.device)[None, :] >= torch.arange(e - s, device=x.device)[:, None]
            yield block[keep]

    return stream


def _identity(t: torch.Tensor, op: str) -> torch.Tensor:
    return t


def select_ranks(
    source: Source,
    ranks: tuple[int, ...],
    span: tuple[float, float],
    dtype: torch.dtype,
    device: torch.device,
    bins: int = BINS,
    cap: int = CAP,
    reduce: Callable[[torch.Tensor, str], torch.Tensor] = _identity,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    total: int | None = None,
) -> list[torch.Tensor]:
    """The ``ranks``-th smallest values (1-based, ascending, close together) streamed by ``source``.

    ``span``: where most values lie (buckets are spread over it on the first pass; values
    outside it fall in the end buckets, so it need not be exact). ``reduce(t, op)`` combines
    ``t`` over the processes that share the work (``op`` is ``"sum"``, ``"min"`` or ``"max"``);
    ``gather(t)`` concatenates 1-D tensors over them; neither is called while ``source`` streams.
    ``total``: how many values the source streams, when known (at most ``cap``: no counting
    pass). Returns 0-dim tensors in ``dtype``.
    """
    ranks = tuple(sorted(ranks))
    lo = torch.tensor(float("-inf"), dtype=dtype, device=device)  # the interval [lo, hi) holds the ranks
    hi = torch.tensor(float("inf"), dtype=dtype, device=device)
    low, high = (torch.tensor(v, dtype=dtype, device=device) for v in span)  # where the buckets go
    below, inside = 0, total  # values < lo; values in [lo, hi) (None: unknown before the first pass)
    while True:
        if inside is not None and inside <= cap:
            chosen = gather(torch.cat([v[(v >= lo) & (v < hi)] for v in source()] or [lo.new_empty(0)]))
            ordered = torch.sort(chosen).values
            return [ordered[r - below - 1] for r in ranks]
        edges = _inner_edges(low, high, bins)
        counts, vmin, vmax = _histogram(source, lo, hi, edges, bins, reduce)
        streamed = int(counts.sum())
        if inside is None and streamed < ranks[-1]:
            raise ValueError(f"asked for the {ranks[-1]}-th smallest of {streamed} values")
        if bool(vmin == vmax):  # every value left is the same
            return [vmin.clone() for _ in ranks]
        cumulative = torch.cumsum(counts, 0)
        first = int(torch.searchsorted(cumulative, torch.tensor(ranks[0] - below, device=device)))
        last = int(torch.searchsorted(cumulative, torch.tensor(ranks[-1] - below, device=device)))
        new_below = below + (int(cumulative[first - 1]) if first > 0 else 0)
        new_inside = int(cumulative[last]) - (new_below - below)
        if inside is not None and new_inside >= inside:  # rounding left no narrower bucket: collect
            inside = min(inside, cap)
            continue
        lo = edges[first - 1] if first > 0 else lo
        hi = edges[last] if last < bins - 1 else hi
        # the next buckets span the new interval, or the values' range on an open side
        low = lo if torch.isfinite(lo) else vmin
        high = hi if torch.isfinite(hi) else vmax
        below, inside = new_below, new_inside


def _histogram(source: Source, lo, hi, edges: torch.Tensor, bins: int, reduce):
    """Counts ``[bins]`` of the values in ``[lo, hi)`` (bucket ``i`` holds ``edges[i - 1] <= v <
    edges[i]``), with the min and max of those values, reduced over processes at the end."""
    counts = torch.zeros(bins, dtype=torch.long, device=edges.device)
    vmin = torch.tensor(float("inf"), dtype=edges.dtype, device=edges.device)
    vmax = torch.tensor(float("-inf"), dtype=edges.dtype, device=edges.device)
    for v in source():
        v = v[(v >= lo) & (v < hi)]
        if v.numel() == 0:
            continue
        counts += torch.bincount(torch.bucketize(v, edges, right=True), minlength=bins)
        low, high = torch.aminmax(v)
        vmin, vmax = torch.minimum(vmin, low), torch.maximum(vmax, high)
    return reduce(counts, "sum"), reduce(vmin, "min"), reduce(vmax, "max")


def _inner_edges(low: torch.Tensor, high: torch.Tensor, bins: int) -> torch.Tensor:
    """``bins - 1`` increasing edges spread over ``[low, high]`` (a unit span if it is empty)."""
    a, b = float(low), float(high)
    if not b > a:
        b = a + 1.0
    return torch.linspace(a, b, bins + 1, dtype=torch.float64, device=low.device)[1:-1].to(low.dtype)


def median_bandwidth(x: torch.Tensor, rows: int | None = None, bins: int = BINS, cap: int = CAP) -> torch.Tensor:
    """``median_{i<j} ||x_i - x_j||`` of ``x [n, d]`` (two middle values averaged for an even
    count, as ``numpy.median``), 0-dim in ``x.dtype``; never forms an ``[n, n]`` matrix.

    ``rows``: rows per streamed block (default: blocks of about 16M distances). Up to
    ``n = 4096`` the distances are few and selected in one go.

    >>> x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])  # distances 1, 2, 3, 4, 6, 7
    >>> median_bandwidth(x)
    tensor(3.5000)
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"the median pairwise distance needs >= 2 samples, got {n}")
    m = n * (n - 1) // 2
    rows = rows or max(1, 2**24 // max(1, n))
    if n <= _DENSE:
        cap = max(cap, m)
    source = triangle_blocks(x, rows)
    span = (0.0, 4.0 * float((x * x).sum(dim=1).max()))  # |x_i - x_j|^2 <= (|x_i| + |x_j|)^2
    low, high = select_ranks(source, ((m + 1) // 2, m // 2 + 1), span, x.dtype, x.device, bins, cap, total=m)
    return (low.sqrt() + high.sqrt()) / 2
