"""k-nearest-neighbour metrics (platonic-rep definitions) and their plan.

Neighbours are found by inner product on the (by default L2-normalised) features. A sample
is never its own neighbour. Ties are broken deterministically: larger similarity first, then
lower index first (what a stable descending sort gives).

Numerics: for a fixed row ``i`` the ranking by ``x_i . x_j`` equals the ranking by
``x_i . (x_j - m)`` for any ``m``, and ``x_i . (x_j - m) = (x_i - m).(x_j - m) + m.(x_j - m)``.
With ``m`` the column mean both terms are formed from centred features, so a large common
offset does not swamp the float32 Gram. Rows whose float32 top-``k + 1`` values are closer
than the rounding error bound are ranked again exactly in float64 from the features, so
float32 input gives the float64 neighbour lists.

Building blocks (also in :mod:`prh_lightning.functional.utils`): :func:`knn_indices`,
:func:`knn_from_gram` and the ``*_from_indices`` scorers, which broadcast over leading batch
dimensions so many layer pairs can be scored at once.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ._edge_null import mutual_knn_null
from ._numerics import Centred, ConditionedRows, as_float64, centre, pivot_free_float32
from ._plan import MetricPlan, register_plan, score_pair
from ._ties import check_copies_at_boundary
from ._validation import check_features, check_k

__all__ = ["mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"]

_BUDGET = 2**26  # elements per streamed block (256 MB in float32)
_WHOLE_GRAM = 2**27  # up to this many elements (512 MB in float32, n <= 11,585) a whole Gram is kept


# -- ranking rows of a similarity matrix ---------------------------------------------------


def _top_k(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` columns of each row of ``g [c, n]`` (excluded entries already ``-inf``).

    Returns ``(index [c, k], values [c, k + 1])`` (the ``k + 1``-th value, or ``-inf`` when
    ``k = n``, tells how far the last kept neighbour is from the first left out). Ties:
    larger value first, then lower index.
    """
    c, n = g.shape
    values, index = torch.topk(g, min(k + 1, n), dim=1, sorted=True)
    if k >= n:
        values = torch.cat([values, values.new_full((c, 1), float("-inf"))], dim=1)
    # Only rows whose k-th value is tied with the one left out are arbitrary in topk: redo them
    # with a stable sort (lower index first).
    ambiguous = values[:, k] == values[:, k - 1]
    index = index[:, :k]
    if bool(ambiguous.any()):
        redo = ambiguous.nonzero().flatten()
        index[redo] = torch.sort(g[redo], dim=1, descending=True, stable=True).indices[:, :k]
    # topk orders by value; rows with tied values inside the list need (value desc, index asc).
    kept = values[:, : index.shape[1]]  # the values at index (a stable sort keeps the same values)
    tied = (kept[:, 1:] == kept[:, :-1]).any(dim=1)
    if bool(tied.any()):
        rows = tied.nonzero().flatten()
        sub_index, order = torch.sort(index[rows], dim=1)
        sub_values = torch.gather(kept[rows], 1, order)
        order = torch.sort(sub_values, dim=1, descending=True, stable=True).indices
        index[rows] = torch.gather(sub_index, 1, order)
    return index, values


def knn_from_gram(
    gram_rows: torch.Tensor,
    k: int,
    row_offset: int = 0,
    groups: torch.Tensor | None = None,
    exclude_self: bool = True,
    overwrite: bool = False,
) -> torch.Tensor:
    """Ordered top-``k`` neighbours from rows of a similarity matrix.

    Args:
        gram_rows: ``[c, n]`` rows ``row_offset .. row_offset + c`` of an ``[n, n]`` similarity
            matrix (e.g. ``x[rows] @ x.T``).
        k: neighbours per row, ``1 <= k < n``.
        row_offset: index of the first row, so the self-similarity entry can be excluded.
        groups: optional ``[n]`` ids; samples sharing an id are never neighbours of each other
            (used for bootstrap resamples, where copies of one sample share an id).
        exclude_self: if False the sample itself may be among its neighbours (biased CKNNA).
        overwrite: allow writing ``-inf`` into ``gram_rows`` (saves a copy); else it is untouched.

    Returns:
        ``[c, k]`` long indices, most similar first; ties: lower index first.

    >>> knn_from_gram(torch.tensor([[9.0, 1.0, 3.0, 3.0]]), k=2)
    tensor([[2, 3]])
    """
    c, n = gram_rows.shape
    g = gram_rows if overwrite else gram_rows.clone()
    _exclude(g, row_offset, groups, exclude_self, k)
    return _top_k(g, k)[0]


def _exclude(g: torch.Tensor, row_offset: int, groups: torch.Tensor | None, exclude_self: bool, k: int) -> None:
    c, n = g.shape
    if exclude_self:
        g.diagonal(row_offset).fill_(float("-inf"))  # entries (i, i + row_offset)
    if groups is not None:
        g.masked_fill_(groups[row_offset : row_offset + c, None] == groups[None, :], float("-inf"))
        available = n - torch.bincount(groups)[groups[row_offset : row_offset + c]]
        if bool((available < k).any()):
            raise ValueError(f"k={k} exceeds the number of distinct other samples ({int(available.min())})")


def _auto_rows(n: int, budget_elements: int = 2**25) -> int:
    return max(1, min(n, budget_elements // max(n, 1)))


def knn_indices(
    x: torch.Tensor, k: int = 10, groups: torch.Tensor | None = None, batch_size: int | None = None
) -> torch.Tensor:
    """Top-``k`` neighbours of each row of ``x [n, d]`` by inner product ``x @ x.T``, as given.

    Self excluded; ties: lower index first. Computed in row chunks of ``batch_size`` rows
    (default: chunks of at most ~32M similarity entries), so memory stays ``O(batch_size * n)``.
    A building block: the metrics use the exact, offset-robust search of :class:`Neighbours`.

    Returns:
        ``[n, k]`` long indices, most similar first.

    >>> knn_indices(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), k=1)
    tensor([[1],
            [0],
            [1]])
    """
    check_features(x, "x")
    n = x.shape[0]
    check_k(k, n)
    step = batch_size or _auto_rows(n)
    out = [knn_from_gram(x[s : s + step] @ x.T, k, s, groups, overwrite=True) for s in range(0, n, step)]
    return torch.cat(out)


# -- exact neighbour search on conditioned features ----------------------------------------


@dataclass
class Neighbours:
    """Per-layer state of the k-NN metrics: ``idx [n, k]`` neighbour lists (most similar first).

    ``x64 [n, d]`` (float64, the conditioned features, possibly rescaled by a power of two)
    is kept only when a caller needs kernel values at the neighbours (CKNNA).
    """

    idx: torch.Tensor
    x64: torch.Tensor | None = None
    recall: float | None = None  # approximate lists only: recall against exact search on a subsample
    budget: int | None = None  # max_memory in bytes (None: defaults), for the permutation null


def _symmetric_gram_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [n, n] = x x^T`` for ``x [n, d]``, multiplying only the upper triangle.

    Row block ``s:e`` is multiplied against columns ``s:n`` only and then mirrored into the
    lower triangle, so 8 blocks cost 9/16 of a full product; the result is exactly symmetric.
    """
    n = x.shape[0]
    rows = max(64, -(-n // 8))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        torch.mm(x[s:e], x[s:].T, out=out[s:e, s:])
        out[e:, s:e].copy_(out[s:e, e:].T)
    return out


def gram_buffer(n: int, block_rows: int | None, like: torch.Tensor) -> torch.Tensor | None:
    """One ``[n, n]`` buffer reused for every layer's whole Gram matrix, or ``None`` to stream
    row blocks (when ``block_rows`` asks for streaming or ``n^2`` exceeds 512 MB)."""
    if block_rows is not None or n * n > _WHOLE_GRAM:
        return None
    return torch.empty(n, n, dtype=like.dtype, device=like.device)


# bytes per entry of a streamed [rows, n] block: the block, and the copy, values and int64
# indices a stable sort of its ambiguous rows may need
_BLOCK_BYTES = 24


def _scaled_rows(x64: torch.Tensor, scale: float, r: torch.Tensor | slice) -> torch.Tensor:
    return x64[r] * scale


def _shift(c: Centred, x64: torch.Tensor, rows: int) -> torch.Tensor | None:
    """``[n]`` float64 ``m . xc_j`` with ``xc_j = x_j * scale - m`` (exact), in row blocks; ``None``
    when the pivot ``m`` is 0 (no common offset to carry: the usual case for normalised rows)."""
    if not bool(c.mean.any()):
        return None
    n = x64.shape[0]
    return torch.cat([(_scaled_rows(x64, c.scale, slice(s, s + rows)) - c.mean) @ c.mean for s in range(0, n, rows)])


def rounding_bound(xc: torch.Tensor, shift: torch.Tensor | None, roundings: int = 1) -> tuple[torch.Tensor, float]:
    """Bound on the rounding error of the float32 scores ``r_ij = xc_i . xc_j + shift_j``.

    Returns ``(base [n], rel)``: ``|fl(r_ij) - r_ij| <= base_i + rel * |fl(r_ij)|`` for every ``j``.
    From the standard bound for a dot product in any summation order
    (``|fl(u . v) - u . v| <= gamma_d |u| |v|``, ``gamma_d = d u / (1 - d u)``, ``u = eps / 2``)
    plus the ``roundings`` (``Centred.roundings``) between each entry of ``xc`` and its exact
    value (``u`` each, for ``xc_i`` and ``xc_j``: ``2 roundings u``), the rounding of ``shift`` to
    float32 and of the final addition.
    """
    n, d = xc.shape
    unit = float(torch.finfo(xc.dtype).eps) / 2
    terms = d + 1 + 2 * roundings  # dot product (gamma_d) + the entries' roundings (+ 1 u of slack)
    gamma = terms * unit / (1 - terms * unit)
    norms = torch.linalg.vector_norm(xc, dim=1).double()
    # the float32 norms themselves may be low by a relative (d + 2) u: inflate them
    norms = norms * (1 + (d + 2) * unit / (1 - (d + 2) * unit))
    big = float(norms.max())
    base = gamma * norms * big
    # gradual underflow: each rounding below float32's normal range errs by up to tiny * u in
    # absolute terms (d products; casting the entries of xc_i, xc_j: at most sqrt(d) |xc| each)
    tiny = float(torch.finfo(xc.dtype).tiny) * unit
    base = base + tiny * (d + 2 * d**0.5 * big + 1)
    if shift is not None:
        base = base + unit * float(shift.abs().max()) * 3  # shift rounded to float32, then added
    return base, 4 * unit  # the rounding of the sum itself, with slack for |r| vs |fl(r)|


def _candidates(
    block: torch.Tensor, redo: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, floor: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of rows ``redo [R]`` of ``block [c, n]`` (float32 scores, excluded entries
    ``-inf``) scoring at least ``floor [R]`` (float32), ascending, with their scores:
    ``(columns [R, w], scores [R, w])``, scores float64; padding: column 0, score ``-inf``.

    ``idx [c, k]`` and ``values [c, k + 1]`` (float64) are the rows' float32 top lists: a row whose
    ``k + 1``-th score is below its floor has exactly its top ``k`` as candidates (most rows);
    only the others are scanned.
    """
    cols, order = torch.sort(idx[redo], dim=1)
    listed = torch.gather(values[redo, :k], 1, order)  # [R, k]: the top k, by column
    scan = (values[redo, k] >= floor.double()).nonzero().flatten()  # positions in redo
    if not scan.numel():
        return cols, listed
    r_pos, more = (block[redo[scan]] >= floor[scan, None]).nonzero(as_tuple=True)  # row-major: ascending
    counts = torch.bincount(r_pos, minlength=scan.numel())
    slot = torch.arange(more.numel(), device=more.device) - (torch.cumsum(counts, 0) - counts)[r_pos]
    width = max(k, int(counts.max()))
    cand = torch.zeros(redo.numel(), width, dtype=torch.long, device=block.device)
    scores = torch.full((redo.numel(), width), float("-inf"), dtype=torch.float64, device=block.device)
    cand[:, :k], scores[:, :k] = cols, listed
    cand[scan], scores[scan] = 0, float("-inf")
    cand[scan[r_pos], slot] = more
    scores[scan[r_pos], slot] = block[redo[scan][r_pos], more].double()
    return cand, scores


def _rerank(
    c: Centred,
    x64: torch.Tensor,
    shift: torch.Tensor | None,
    rows: torch.Tensor,
    cand: torch.Tensor,
    mixed: torch.Tensor,
    tol: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``[R, k]`` exact neighbours of ``rows [R]`` among their candidates ``cand [R, w]`` (column
    ascending; see :func:`_candidates`) with float32 scores ``mixed [R, w]`` (as float64, ``-inf``
    padding; overwritten), whose rounding error is at most ``tol [R]``, ``[R, k]`` float64 their
    scores (exact where they were recomputed, else the float32 ones), and whether any row's
    ``k``-th and ``k + 1``-th scores are exactly tied.

    Candidates are the columns scoring at least a floor (a superset of the exact top ``k``).
    A candidate whose float32 score is more than ``2 tol`` from every other candidate's keeps
    its place whatever the rounding; the others get their score ``xc_i . xc_j + shift_j`` in
    float64 (``xc = x64 * scale - mean``, exact; each product summed in one fixed order, so
    identical rows score identically and exact ties stay exact). Ranking by these mixed scores
    is the exact ranking; ties: lower index first.
    """
    # which candidates sit within 2 tol of another one (in float32 order)
    ranked, where = torch.sort(mixed, dim=1, descending=True)
    close = (ranked[:, :-1] - ranked[:, 1:]) <= 2 * tol[:, None]  # False beside -inf padding
    need_ranked = torch.zeros_like(ranked, dtype=torch.bool)
    need_ranked[:, :-1] |= close
    need_ranked[:, 1:] |= close
    needed = torch.zeros_like(need_ranked).scatter_(1, where, need_ranked)
    r_need, s_need = needed.nonzero(as_tuple=True)
    if r_need.numel():
        cols_need = cand[r_need, s_need]
        # each re-ranked row is formed once in float64, then repeated for its candidates
        left = x64.index_select(0, rows)
        centred = c.scale != 1.0 or shift is not None  # centred, rescaled copies (exact operations)
        if centred:
            left = left.mul_(c.scale).sub_(c.mean)
        exact = _pair_products(c, x64, left, r_need, cols_need, centred)
        mixed[r_need, s_need] = exact if shift is None else exact + shift[cols_need]
    # a few candidates per row: one stable sort gives the order and the tie rule (lower column first)
    values, order = torch.sort(mixed, dim=1, descending=True, stable=True)
    boundary_tie = values.shape[1] > k and bool((values[:, k - 1] == values[:, k]).any())  # -inf padding: no tie
    return torch.gather(cand, 1, order[:, :k]), values[:, :k], boundary_tie


_PAIR_STEP = 256  # float64 products formed per chunk ([256, d]: temporaries small enough to stay in cache)


def _pair_products(
    c: Centred,
    x64: torch.Tensor | ConditionedRows,
    left: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    centred: bool,
) -> torch.Tensor:
    """``[P]`` float64 ``left[rows[p]] . xc_{cols[p]}`` for ``left [R, d]`` (float64) and ``rows``,
    ``cols`` ``[P]``, with ``xc = x64 * scale - mean`` formed (exactly) when ``centred``, else
    ``x64`` itself. Each product is summed over ``d`` in the same order (chunking does not change
    it); chunks of ``_PAIR_STEP`` pairs keep the float64 temporaries small."""
    out = []
    for s in range(0, cols.numel(), _PAIR_STEP):
        right = x64.index_select(0, cols[s : s + _PAIR_STEP])
        if centred:
            right = right.mul_(c.scale).sub_(c.mean)
        out.append(right.mul_(left.index_select(0, rows[s : s + _PAIR_STEP])).sum(dim=1))
    return torch.cat(out)


def exact_neighbours(
    c: Centred,
    x64: torch.Tensor | ConditionedRows,
    k: int,
    rows: int,
    gram: torch.Tensor | None = None,
    exclude_self: bool = True,
    groups: torch.Tensor | None = None,
    ordered: bool = True,
    kernel_values: bool = False,
    name: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``[n, k]`` neighbours of ``x64`` by inner product, from its centred copy ``c``.

    Scores are ``r_ij = (xc_i . xc_j) + (m . xc_j)`` in the compute dtype (same ranking per row
    as ``x_i . x_j``). In float32 a certificate decides, row by row, whether the float32 order is
    the exact one: every gap between the top ``k + 1`` scores must exceed twice the rounding
    bound of :func:`rounding_bound`. Rows without it are ranked again with float64 scores from
    the centred ``x64 * c.scale - c.mean`` (exact power-of-two rescaling: same ranking, no
    overflow), but only among their candidates (columns whose float32 score is within three
    times the bound of the ``k``-th; every other column is provably below the exact ``k``-th
    score), and only for the candidates that sit within twice the bound of another one.

    ``ordered=False``: only the neighbour *sets* must be exact (mutual and cycle k-NN, CKNNA's
    masks), so only the gap between the ``k``-th and ``k + 1``-th scores is certified; the order
    inside a list is then the float32 one.

    ``kernel_values=True``: also return ``[n, k]`` float64 ``x64_i . x64_{idx[i, t]}`` from the
    same scores, ``(r_ij + m . xc_i + m . m) / scale^2``, at no extra pass: each is within the
    certified rounding bound of its score (``tol_i / scale^2``) of the exact value, so a large
    common offset costs no precision (it sits in the float64 terms).

    ``name``: refuse lists that cut through a group of identical rows
    (:func:`._ties.check_copies_at_boundary`, which names the layer), unless ``groups`` keeps
    copies apart. Identical rows have equal exact scores, so in float32 they can cut a list only
    where the boundary gap was not certified and the float64 re-ranking, which scores identical
    rows identically, found an exact tie there: the check runs only then (always for float64 input).

    Memory: the whole ``[n, n]`` ``gram`` buffer when given, else ``[rows, n]`` blocks; float64
    work only on the rows re-ranked and their candidates (``x64`` may be
    :class:`._numerics.ConditionedRows`, which forms just those rows).
    """
    xc = c.xc
    n, d = xc.shape
    exact = xc.dtype == torch.float64
    shift = _shift(c, x64, rows)
    shift_c = None if shift is None else shift.to(xc.dtype)
    if not exact:
        base, rel = rounding_bound(xc, shift, c.roundings)
    idx_blocks, value_blocks = [], []
    tied_at_boundary = False  # an exact tie between a row's k-th and k + 1-th scores (after re-ranking)
    for s in range(0, n, n if gram is not None else rows):
        e = n if gram is not None else min(n, s + rows)
        if gram is not None:
            block = _symmetric_gram_into(xc, gram)
        else:
            block = xc[s:e] @ xc.T
        if shift_c is not None:
            block.add_(shift_c[None, :])
        _exclude(block, s, groups, exclude_self, k)
        idx, values = _top_k(block, k)
        if not exact:
            finite = torch.isfinite(values)
            values = values.double()
            # error bound of every score down to the candidates' floor below (|fl r| <= max + 3 tol)
            tol = (base[s:e] + rel * values.abs().where(finite, 0.0).amax(dim=1)) * (1 + 4 * rel)
            gaps = (values[:, :-1] - values[:, 1:]).where(finite[:, 1:], float("inf"))
            if not ordered:
                gaps = gaps[:, k - 1 :]  # the set boundary only
            redo = (gaps <= 2 * tol[:, None]).any(dim=1).nonzero().flatten()
            if redo.numel():
                # candidates: every column whose exact score can reach the exact k-th one (see _rerank)
                floor = values[redo, k - 1] - 3 * tol[redo]
                floor_c = floor.to(block.dtype)
                floor_c = torch.where(floor_c.double() > floor, torch.nextafter(floor_c, floor_c.new_tensor(-torch.inf)), floor_c)
                cand, scores = _candidates(block, redo, idx, values, floor_c, k)
                idx[redo], redone, tie = _rerank(c, x64, shift, redo + s, cand, scores, tol[redo], k)
                values[redo, :k] = redone
                tied_at_boundary |= tie
        del block
        idx_blocks.append(idx)
        if kernel_values:
            value_blocks.append(values[:, :k].double())
    idx = torch.cat(idx_blocks)
    if name is not None and groups is None and (exact or tied_at_boundary):
        check_copies_at_boundary(as_float64(x64), idx, name, exclude_self=exclude_self)
    if not kernel_values:
        return idx
    scores = torch.cat(value_blocks)
    if shift is not None:  # r_ij + m . xc_i + m . m: x_i . x_j of the rescaled features
        scores = scores + shift[:, None] + c.mean @ c.mean
    return idx, scores / c.scale**2


# -- scorers on neighbour lists (broadcast over leading dims) ------------------------------


def _shared(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """``[..., n, k]`` bool: is ``idx_a[..., i, s]`` also in the list ``idx_b[..., i, :]``."""
    return (idx_a.unsqueeze(-1) == idx_b.unsqueeze(-2)).any(dim=-1)


def mutual_knn_from_indices(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """``mean_i |N_a(i) ∩ N_b(i)| / k`` from ``[..., n, k]`` neighbour lists; returns float64 ``[...]``.

    Below: overlaps 1, 2 and 2 of ``k = 2``, so ``5 / 6``.

    >>> mutual_knn_from_indices(torch.tensor([[1, 2], [0, 2], [0, 1]]), torch.tensor([[1, 0], [2, 0], [1, 0]]))
    tensor(0.8333, dtype=torch.float64)
    """
    n, k = idx_a.shape[-2:]
    return _shared(idx_a, idx_b).sum(dim=(-2, -1)).double() / (n * k)


def cycle_knn_from_indices(
    idx_a: torch.Tensor, idx_b: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_i 1[i ∈ N_a(N_b(i))]`` from ``[..., n, k]`` lists; returns float64 ``[...]``.

    With ``groups`` (``[n]`` ids), reaching any sample with ``i``'s id counts as a return.
    """
    n, k = idx_a.shape[-2:]
    hops = _second_hop(idx_a, idx_b)  # [..., n, k, k]
    target = torch.arange(n, device=idx_a.device) if groups is None else groups
    ids = hops if groups is None else groups[hops]
    hit = (ids == target.view(n, 1, 1)).flatten(-2).any(dim=-1)
    return hit.sum(dim=-1).double() / n


def _second_hop(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """``[..., n, k, k]``: the a-neighbours of each b-neighbour of every sample."""
    idx_a, idx_b = torch.broadcast_tensors(idx_a, idx_b)
    *lead, n, k = idx_b.shape
    flat_b = idx_b.reshape(*lead, n * k, 1).expand(*lead, n * k, k)
    return torch.gather(idx_a, -2, flat_b).reshape(*lead, n, k, k)


def lcs_lengths(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """Longest-common-subsequence length of each pair of ordered lists ``[..., k]`` -> ``[...]``.

    >>> lcs_lengths(torch.tensor([1, 2, 3]), torch.tensor([2, 9, 3]))
    tensor(2)
    """
    equal = idx_a.unsqueeze(-1) == idx_b.unsqueeze(-2)  # [..., k, k]
    ka, kb = equal.shape[-2:]
    table = [[torch.zeros(equal.shape[:-2], dtype=torch.long, device=idx_a.device)] * (kb + 1)]
    for i in range(1, ka + 1):
        row = [table[0][0]]
        for j in range(1, kb + 1):
            row.append(
                torch.where(equal[..., i - 1, j - 1], table[i - 1][j - 1] + 1, torch.maximum(table[i - 1][j], row[j - 1]))
            )
        table.append(row)
    return table[ka][kb]


def edit_distances(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """Levenshtein distance (unit insert/delete/substitute) of ordered lists ``[..., k]`` -> ``[...]``.

    >>> edit_distances(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4]))
    tensor(2)
    """
    equal = idx_a.unsqueeze(-1) == idx_b.unsqueeze(-2)
    ka, kb = equal.shape[-2:]
    zero = torch.zeros(equal.shape[:-2], dtype=torch.long, device=idx_a.device)
    prev = [zero + j for j in range(kb + 1)]
    for i in range(1, ka + 1):
        row = [zero + i]
        for j in range(1, kb + 1):
            substitute = prev[j - 1] + (~equal[..., i - 1, j - 1]).long()
            row.append(torch.minimum(substitute, torch.minimum(prev[j], row[j - 1]) + 1))
        prev = row
    return prev[kb]


def lcs_knn_from_indices(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """``mean_i LCS(N_a(i), N_b(i))`` (a length in ``[0, k]``) from ``[..., n, k]`` lists."""
    return lcs_lengths(idx_a, idx_b).sum(dim=-1).double() / idx_a.shape[-2]


def edit_distance_knn_from_indices(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """``1 - mean_i Levenshtein(N_a(i), N_b(i)) / k`` from ``[..., n, k]`` lists."""
    n, k = idx_a.shape[-2:]
    return 1.0 - edit_distances(idx_a, idx_b).sum(dim=-1).double() / (n * k)


_SCORERS = {
    "mutual_knn": mutual_knn_from_indices,
    "cycle_knn": cycle_knn_from_indices,
    "lcs_knn": lcs_knn_from_indices,
    "edit_distance_knn": edit_distance_knn_from_indices,
}


# -- the plan: neighbour lists once per layer, pairs scored in batches ----------------------


KNN_BACKENDS = ("exact", "faiss", "faiss_ivf")  # faiss: HNSW graph; faiss_ivf: IVF-Flat cells
RECALL_SAMPLE = 1000  # rows checked against exact search when neighbour lists are approximate


def prepare_neighbours(
    x64: torch.Tensor,
    ctx,
    k: int = 10,
    groups: torch.Tensor | None = None,
    knn_backend: str = "exact",
    ordered: bool = True,
    faiss_options: Mapping[str, Any] | None = None,
) -> Neighbours:
    """Per-layer work of the k-NN metrics: ``[n, k]`` neighbour lists of ``x64 [n, d]``, exact, or
    approximate with ``knn_backend="faiss"`` (HNSW) or ``"faiss_ivf"`` (IVF-Flat, for clustered
    features; see :mod:`._faiss`), then with their recall on a subsample of rows.
    ``faiss_options``: the index's settings for the approximate backends (``m``, ``ef_search``
    for HNSW; ``nlist``, ``nprobe`` for IVF-Flat; see :func:`._faiss.faiss_neighbours`).
    ``ordered=False``: exact neighbour sets, listed in float32 order (see :func:`exact_neighbours`)."""
    n = x64.shape[0]
    _check_search(n, k, groups, knn_backend, faiss_options)
    c = centre(x64, ctx.input_eps, ctx.dtype, ctx.name, exact_mean=False)
    return _neighbours(c, x64, ctx, k, groups, knn_backend, ordered, faiss_options)


def prepare_neighbours_fast(
    x: torch.Tensor,
    ctx,
    k: int = 10,
    groups: torch.Tensor | None = None,
    knn_backend: str = "exact",
    ordered: bool = True,
    faiss_options: Mapping[str, Any] | None = None,
) -> Neighbours | None:
    """:func:`prepare_neighbours` straight from float32 (fp16, bf16) features ``x [n, d]`` when
    they need no common offset removed (:func:`._numerics.pivot_free_float32`): the same lists
    without a float64 copy of the layer (only the rows re-ranked, or sampled for the recall of
    approximate lists, are formed in float64). ``None`` (take the float64 route) for bootstrap
    ``groups`` and features the float32 route declines."""
    if groups is not None:
        return None
    _check_search(x.shape[0], k, groups, knn_backend, faiss_options)
    conditioned = pivot_free_float32(x, ctx.normalize, ctx.input_eps)
    if conditioned is None:
        return None
    return _neighbours(*conditioned, ctx, k, None, knn_backend, ordered, faiss_options)


def _check_search(n: int, k: int, groups, knn_backend: str, faiss_options: Mapping[str, Any] | None) -> None:
    check_k(k, n)
    if faiss_options and knn_backend == "exact":
        raise ValueError(f'faiss_options={dict(faiss_options)!r} apply to knn_backend="faiss" or "faiss_ivf", not "exact"')
    if faiss_options:
        from . import _faiss

        index = "ivf" if knn_backend == "faiss_ivf" else _faiss.INDEX
        other = set(faiss_options) - set(_INDEX_OPTIONS[index])
        if other:
            raise ValueError(f"faiss_options {sorted(other)} do not apply to the {index} index (its options: {_INDEX_OPTIONS[index]})")
    if knn_backend != "exact" and groups is not None:
        raise ValueError(f'knn_backend="{knn_backend}" cannot keep groups apart (bootstrap); use knn_backend="exact"')


def _neighbours(
    c: Centred, x64: torch.Tensor | ConditionedRows, ctx, k: int, groups, knn_backend: str, ordered: bool, faiss_options
) -> Neighbours:
    """The lists of the layer centred in ``c`` (``x64``: its float64 rows, or
    :class:`._numerics.ConditionedRows` forming them on demand)."""
    n = c.xc.shape[0]
    if knn_backend != "exact":
        from ._faiss import faiss_neighbours, neighbour_recall

        idx = faiss_neighbours(c, k, index="ivf" if knn_backend == "faiss_ivf" else None, **(faiss_options or {}))
        generator = torch.Generator().manual_seed(0)
        return Neighbours(idx, recall=neighbour_recall(x64, idx, RECALL_SAMPLE, generator), budget=ctx.budget)
    rows = ctx.block(n, _BLOCK_BYTES)
    idx = exact_neighbours(c, x64, k, rows, ctx.gram(n), groups=groups, ordered=ordered, name=ctx.name)
    return Neighbours(idx, budget=ctx.budget)


def permute_neighbours(state: Neighbours, perm: torch.Tensor) -> Neighbours:
    """Neighbour lists of the layer with its samples reordered (row ``i`` <- sample ``perm[i]``):
    ``N_{x∘π}(i) = π^{-1}(N_x(π(i)))``. ``perm`` may be ``[P, n]`` (many at once)."""
    inverse = torch.argsort(perm, dim=-1)
    moved = state.idx[perm]  # [..., n, k]
    if perm.ndim == 1:
        return Neighbours(inverse[moved], budget=state.budget)
    return Neighbours(torch.gather(inverse, 1, moved.flatten(1)).reshape(moved.shape), budget=state.budget)


def _mutual_knn_matrix(idx_x: list[torch.Tensor], idx_y: list[torch.Tensor]) -> torch.Tensor:
    """``|N_x(i) ∩ N_y(i)|`` summed over samples, by binary search of ``y``'s neighbours in the
    sorted lists of ``x`` (row by row): ``O(L n k log k)`` time, no ``[n, n]`` mask; rows in
    blocks of at most ~16M lookups."""
    n, k = idx_x[0].shape[-2:]
    stacked = torch.stack(idx_y).permute(1, 0, 2).reshape(n, -1)  # [n, Ly * k]
    ly = len(idx_y)
    step = max(1, min(n, 2**24 // max(1, ly * k)))
    out = []
    for idx in idx_x:
        ordered = torch.sort(idx, dim=1).values
        hits = torch.zeros(ly, dtype=torch.long, device=idx.device)
        for s in range(0, n, step):
            queries = stacked[s : s + step]
            pos = torch.searchsorted(ordered[s : s + step], queries).clamp_(max=k - 1)
            found = torch.gather(ordered[s : s + step], 1, pos) == queries
            hits += found.view(-1, ly, k).sum(dim=(0, 2))
        out.append(hits.double() / (n * k))
    return torch.stack(out)


def _pairwise(idx_x: list[torch.Tensor], idx_y: list[torch.Tensor], scorer, cost: int) -> torch.Tensor:
    step = max(1, _BUDGET // max(1, cost))
    stacked = torch.stack(idx_y)
    return torch.stack(
        [torch.cat([scorer(i, stacked[j : j + step]) for j in range(0, len(idx_y), step)]) for i in idx_x]
    )


# -- all layer pairs at once from a dense position map (n^2 bytes per layer of x) -------------

_DENSE_MAX = 2**26  # position maps up to this many entries (64 MB, n <= 8,192); beyond: sorted lookups
_BIT_K = 62  # bit-parallel LCS / edit distance keep a list in one int64


def _positions(idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [n, n]`` int8: ``out[i, j]`` = place of ``j`` in the list ``idx[i]`` (``[n, k]``), else -1."""
    n, k = idx.shape
    out.fill_(-1)
    return out.scatter_(1, idx, torch.arange(k, dtype=torch.int8, device=idx.device).expand(n, k))


def lcs_from_matches(matches: torch.Tensor, ka: int) -> torch.Tensor:
    """LCS lengths from bit masks ``matches [..., kb]`` (bit ``p`` of entry ``j``: ``a_p == b_j``;
    ``ka <= 62``), bit-parallel over ``a`` (Allison-Dix / Crochemore et al.): ``kb`` steps of
    a few integer operations for all pairs at once.

    >>> a, b = [1, 2, 3], [2, 9, 3]
    >>> m = torch.tensor([sum(1 << p for p, x in enumerate(a) if x == y) for y in b])
    >>> lcs_from_matches(m, 3)
    tensor(2)
    """
    return _lcs_from_steps(matches.movedim(-1, 0).contiguous(), ka)


def _lcs_from_steps(steps: torch.Tensor, ka: int) -> torch.Tensor:
    """:func:`lcs_from_matches` on step-major masks ``steps [kb, ...]`` (one contiguous slice per
    element of ``b``); returns long ``[...]``. Each step is ``v = (v + (v & m)) | (v & ~m)``."""
    full = (1 << ka) - 1
    v = torch.full(steps.shape[1:], full, dtype=steps.dtype, device=steps.device)
    for m in steps:
        matched = v & m
        carried = v + matched
        v = carried.bitwise_or_(v.sub_(matched)).bitwise_and_(full)  # v - (v & m) == v & ~m
    return ka - _popcount(v, ka)


def edit_from_matches(matches: torch.Tensor, ka: int) -> torch.Tensor:
    """Levenshtein distances from bit masks ``matches [..., kb]`` (as in :func:`lcs_from_matches`),
    bit-parallel over ``a`` (Myers 1999, in Hyyro's form for the whole-string distance).

    >>> a, b = [1, 2, 3], [2, 3, 4]
    >>> m = torch.tensor([sum(1 << p for p, x in enumerate(a) if x == y) for y in b])
    >>> edit_from_matches(m, 3)
    tensor(2)
    """
    return _edit_from_steps(matches.movedim(-1, 0).contiguous(), ka)


def _edit_from_steps(steps: torch.Tensor, ka: int) -> torch.Tensor:
    """:func:`edit_from_matches` on step-major masks ``steps [kb, ...]``; returns ``[...]`` in
    the masks' integer type."""
    full, last = (1 << ka) - 1, ka - 1
    pv = torch.full(steps.shape[1:], full, dtype=steps.dtype, device=steps.device)
    mv = torch.zeros_like(pv)
    score = torch.full_like(pv, ka)
    for eq in steps:
        xv = eq | mv
        xh = (eq & pv).add_(pv).bitwise_and_(full).bitwise_xor_(pv).bitwise_or_(eq)
        ph = (xh | pv).bitwise_not_().bitwise_and_(full).bitwise_or_(mv)  # horizontal +1
        mh = xh.bitwise_and_(pv)  # horizontal -1
        score += ph >> last  # bits above ka - 1 are clear: the top bit's value
        score -= mh >> last
        ph = ph.bitwise_left_shift_(1).bitwise_or_(1).bitwise_and_(full)  # row 0 grows by 1 per step
        mh = mh.bitwise_left_shift_(1).bitwise_and_(full)
        pv = (xv | ph).bitwise_not_().bitwise_and_(full).bitwise_or_(mh)
        mv = ph.bitwise_and_(xv)
    return score


_TABLE_BITS = 16  # popcount table: one entry per 16-bit value (64K long counts, 512 KB)


@functools.lru_cache(maxsize=8)
def _bit_counts(bits: int, device: torch.device) -> torch.Tensor:
    """``[2**bits]`` long: the number of set bits of each ``bits``-bit value."""
    values = torch.arange(1 << bits, device=device)
    return sum((values >> p) & 1 for p in range(bits))


def _popcount(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Set bits of each entry of ``v [...]`` (non-negative, below ``2**bits``) as long ``[...]``: one
    table lookup per 16-bit piece."""
    width = min(bits, _TABLE_BITS)
    table = _bit_counts(width, v.device)
    if bits <= width:
        return table[v.long()]
    low = (1 << width) - 1
    return sum(table[((v >> shift) & low).long()] for shift in range(0, bits, width))


def _dense_matrix(name: str, idx_x: list[torch.Tensor], idx_y: list[torch.Tensor]) -> torch.Tensor:
    """``[Lx, Ly]`` float64 scores of every layer pair from one ``[n, n]`` int8 position map per
    layer of ``x``: each score is a gather of ``n k`` entries (mutual: is ``y``'s neighbour in
    ``x``'s list; cycle: is ``i`` in ``x``'s list of each ``y``-neighbour; LCS / edit: bit masks
    of the matching places, then bit-parallel dynamic programmes over many pairs at once)."""
    n, k = idx_x[0].shape
    ly = len(idx_y)
    stacked = torch.stack(idx_y)  # [Ly, n, k]
    pos = torch.empty(n, n, dtype=torch.int8, device=stacked.device)
    if name in _ORDERED:
        return _ordered_matrix(name, idx_x, stacked, pos)
    by_row = stacked.permute(1, 0, 2).reshape(n, ly * k)  # row i: the y-lists of sample i
    rows = torch.arange(n, device=stacked.device)
    out = []
    for idx in idx_x:
        _positions(idx, pos)
        if name == "cycle_knn":  # pos[j, i] >= 0: i is in x's list of j, for j in y's list of i
            found = pos.view(-1)[stacked * n + rows[:, None]] >= 0  # [Ly, n, k]
            out.append(found.any(dim=2).sum(dim=1).double() / n)
        else:  # mutual_knn: is y's neighbour in x's list
            place = torch.gather(pos, 1, by_row)  # [n, Ly * k]
            out.append((place.view(n, ly, k) >= 0).sum(dim=(0, 2)).double() / (n * k))
    return torch.stack(out)


_BITS_BATCH = 2**21  # bit masks per bit-parallel batch (16 MB as int64)


def _bits_dtype(k: int) -> torch.dtype:
    """Integer type of the bit masks of lists of ``k``: the narrowest of int16, int32 and int64
    with ``k + 1`` bits beside the sign (narrower masks: less memory traffic per step)."""
    if k <= 14:
        return torch.int16
    return torch.int32 if k <= 30 else torch.long


def _ordered_matrix(name: str, idx_x: list[torch.Tensor], stacked: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[Lx, Ly]`` LCS or edit-distance scores of the lists ``idx_x`` (each ``[n, k]``) against
    ``stacked [Ly, n, k]``: bit masks of every pair laid out step-major, ``[k, B, Ly, n]`` (step
    ``j``: the places in ``x``'s list of ``y``'s ``j``-th neighbour), for ``B`` layers of ``x``
    at a time, then one bit-parallel programme per batch. ``pos [n, n]`` int8: scratch."""
    ly, n, k = stacked.shape
    by_step = stacked.permute(1, 2, 0).reshape(n, k * ly)  # row i: the j-th neighbours of i, j-major
    per_layer = k * ly * n
    batch = max(1, _BITS_BATCH // per_layer)
    one = torch.ones((), dtype=_bits_dtype(k), device=stacked.device)
    out = []
    for start in range(0, len(idx_x), batch):
        chunk = idx_x[start : start + batch]
        bits = torch.empty(k, len(chunk), ly, n, dtype=one.dtype, device=stacked.device)
        for b, idx in enumerate(chunk):
            _positions(idx, pos)
            place = torch.gather(pos, 1, by_step).T.reshape(k, ly, n)  # -1: not in x's list
            bits[:, b] = (one << (place + 1).to(one.dtype)) >> 1  # 1 << place, 0 for -1
        out.append(_ordered_scores(name, bits, n, k))
    return torch.cat(out)


def _ordered_scores(name: str, steps: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``[B, Ly]`` LCS or edit-distance scores from step-major bit masks ``steps [k, B, Ly, n]``."""
    if name == "lcs_knn":
        return _lcs_from_steps(steps, k).sum(dim=2).double() / n
    return 1.0 - _edit_from_steps(steps, k).sum(dim=2).double() / (n * k)


def _knn_pairs(name: str):
    def pairs(xs: list[Neighbours], ys: list[Neighbours], k: int = 10, groups: torch.Tensor | None = None, **_) -> torch.Tensor:
        ix, iy = [s.idx for s in xs], [s.idx for s in ys]
        n = ix[0].shape[0]
        if n * n <= _DENSE_MAX and k <= _BIT_K and not (name == "cycle_knn" and groups is not None):
            return _dense_matrix(name, ix, iy)
        if name == "mutual_knn":
            return _mutual_knn_matrix(ix, iy)
        if name == "cycle_knn" and groups is not None:
            return torch.stack([torch.stack([cycle_knn_from_indices(a, b, groups) for b in iy]) for a in ix])
        n = ix[0].shape[0]
        cost = n * k * k * (16 if name in ("lcs_knn", "edit_distance_knn") else 1)
        return _pairwise(ix, iy, _SCORERS[name], cost)

    return pairs


_RANGES = {
    "mutual_knn": lambda k=10, **_: (0.0, 1.0),
    "cycle_knn": lambda k=10, **_: (0.0, 1.0),
    "lcs_knn": lambda k=10, **_: (0.0, float(k)),
    "edit_distance_knn": lambda k=10, **_: (0.0, 1.0),
}

def _check_backend(value) -> None:
    if value not in KNN_BACKENDS:
        raise ValueError(f"knn_backend must be one of {KNN_BACKENDS}, got {value!r}")


_INDEX_OPTIONS = {"hnsw": ("m", "ef_search"), "ivf": ("nlist", "nprobe")}
FAISS_OPTIONS = _INDEX_OPTIONS["hnsw"] + _INDEX_OPTIONS["ivf"]


def _check_faiss_options(value) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ValueError(f"faiss_options must be a dict such as {{'ef_search': 256}}, got {value!r}")
    for key, option in value.items():
        if key not in FAISS_OPTIONS:
            raise ValueError(f"faiss_options: unknown option {key!r}; known: {FAISS_OPTIONS}")
        if option is not None and (isinstance(option, bool) or not isinstance(option, int) or option < 1):
            raise ValueError(f"faiss_options[{key!r}] must be a positive int or None (tuned), got {option!r}")


_ORDERED = ("lcs_knn", "edit_distance_knn")  # scores that read the order inside each list

for _name in _SCORERS:
    register_plan(
        MetricPlan(
            name=_name,
            defaults={"k": 10, "knn_backend": "exact", "faiss_options": None},
            option_checks={"knn_backend": _check_backend, "faiss_options": _check_faiss_options},
            # mutual and cycle k-NN depend on the neighbour sets only
            prepare=functools.partial(prepare_neighbours, ordered=_name in _ORDERED),
            prepare_fast=functools.partial(prepare_neighbours_fast, ordered=_name in _ORDERED),
            pairs=_knn_pairs(_name),
            bounds=_RANGES[_name],
            permute=permute_neighbours,
            null=mutual_knn_null if _name == "mutual_knn" else None,
            resampling="groups",
        )
    )


def mutual_knn(
    a: torch.Tensor, b: torch.Tensor, k: int = 10, normalize: bool = True, clip_quantile: float | None = None
) -> torch.Tensor:
    """Mutual k-NN alignment of paired features ``a [n, d_a]``, ``b [n, d_b]``; 0-dim.

    ``score = (1/n) Σ_i |N_a(i) ∩ N_b(i)| / k`` with ``N_x(i)`` the top-``k`` rows of
    ``x @ x.T`` (self excluded). 1 for identical neighbourhoods, about ``k/(n-1)`` by chance.
    ``normalize=True`` (default in every entry point, the PRH protocol) L2-normalises rows
    first, so neighbours are by cosine similarity.

    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.randn(50, 8, generator=g)
    >>> float(mutual_knn(a, 3 * a @ torch.linalg.qr(torch.randn(8, 8, generator=g)).Q, k=5))
    1.0
    """
    return score_pair("mutual_knn", a, b, normalize, clip_quantile, k=k)


def cycle_knn(
    a: torch.Tensor, b: torch.Tensor, k: int = 10, normalize: bool = True, clip_quantile: float | None = None
) -> torch.Tensor:
    """Cycle k-NN: fraction of samples ``i`` found among the a-neighbours of their b-neighbours; 0-dim.

    ``score = (1/n) Σ_i 1[i ∈ ∪_{j ∈ N_b(i)} N_a(j)]`` (platonic-rep ``knn_A[knn_B]``).
    ``normalize=True`` (default everywhere) L2-normalises rows first.

    >>> a = torch.randn(40, 6)
    >>> float(cycle_knn(a, a, k=3)) > 0.8  # i need not be a neighbour of its own neighbours
    True
    """
    return score_pair("cycle_knn", a, b, normalize, clip_quantile, k=k)


def lcs_knn(
    a: torch.Tensor, b: torch.Tensor, k: int = 10, normalize: bool = True, clip_quantile: float | None = None
) -> torch.Tensor:
    """Mean longest-common-subsequence length of the ordered neighbour lists; 0-dim in ``[0, k]``.

    ``score = (1/n) Σ_i LCS(N_a(i), N_b(i))`` (not divided by ``k``, as in platonic-rep's
    ``longest_ordinal_sequence``). ``normalize=True`` (default everywhere) L2-normalises rows.

    >>> a = torch.randn(40, 6)
    >>> float(lcs_knn(a, a, k=4))
    4.0
    """
    return score_pair("lcs_knn", a, b, normalize, clip_quantile, k=k)


def edit_distance_knn(
    a: torch.Tensor, b: torch.Tensor, k: int = 10, normalize: bool = True, clip_quantile: float | None = None
) -> torch.Tensor:
    """One minus the mean Levenshtein distance of the ordered neighbour lists over ``k``; 0-dim.

    ``score = 1 - (1/n) Σ_i lev(N_a(i), N_b(i)) / k``, in ``[0, 1]``. ``normalize=True``
    (default everywhere) L2-normalises rows first.

    >>> a = torch.randn(40, 6)
    >>> float(edit_distance_knn(a, a, k=4))
    1.0
    """
    return score_pair("edit_distance_knn", a, b, normalize, clip_quantile, k=k)
