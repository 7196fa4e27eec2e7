"""k-nearest-neighbour metrics (platonic-rep definitions).

Neighbours are found by inner product on the features as given (callers L2-normalise rows
for cosine neighbours; ``alignment_matrix(normalize=True)`` does). A sample is never its own
neighbour. Ties are broken deterministically: larger similarity first, then lower index first
(what a stable descending sort gives).

Building blocks usable on their own (e.g. by streaming metrics): :func:`knn_indices`,
:func:`knn_from_gram`, and the ``*_from_indices`` scorers, which broadcast over leading
batch dimensions so many layer pairs can be scored at once and return exact float64 scores
(the metrics cast them to the input dtype).
"""

from __future__ import annotations

import torch

from ._validation import check_features, check_k, check_pair

__all__ = [
    "knn_from_gram",
    "knn_indices",
    "mutual_knn",
    "cycle_knn",
    "lcs_knn",
    "edit_distance_knn",
    "mutual_knn_from_indices",
    "cycle_knn_from_indices",
    "lcs_knn_from_indices",
    "edit_distance_knn_from_indices",
    "lcs_lengths",
    "edit_distances",
]


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
    """
    c, n = gram_rows.shape
    g = gram_rows if overwrite else gram_rows.clone()
    if exclude_self:
        rows = torch.arange(c, device=g.device)
        g[rows, rows + row_offset] = float("-inf")
    if groups is not None:
        g.masked_fill_(groups[row_offset : row_offset + c, None] == groups[None, :], float("-inf"))
        available = n - torch.bincount(groups)[groups[row_offset : row_offset + c]]
        if bool((available < k).any()):
            raise ValueError(f"k={k} exceeds the number of distinct other samples ({int(available.min())})")
    # One extra candidate tells whether the k-th value is tied with one left out: only then is
    # topk's choice arbitrary, and those rows are redone with a stable sort (lower index first).
    values, index = torch.topk(g, min(k + 1, n), dim=1, sorted=True)
    ambiguous = values[:, k] == values[:, k - 1] if k < n else torch.zeros(c, dtype=torch.bool, device=g.device)
    values, index = values[:, :k], index[:, :k]
    if bool(ambiguous.any()):
        redo = ambiguous.nonzero().flatten()
        index[redo] = torch.sort(g[redo], dim=1, descending=True, stable=True).indices[:, :k]
        values[redo] = torch.gather(g[redo], 1, index[redo])
    # topk already orders by similarity; only rows with tied values need (value desc, index asc).
    tied = (values[:, 1:] == values[:, :-1]).any(dim=1)
    if bool(tied.any()):
        rows = tied.nonzero().flatten()
        sub_index, order = torch.sort(index[rows], dim=1)
        sub_values = torch.gather(values[rows], 1, order)
        order = torch.sort(sub_values, dim=1, descending=True, stable=True).indices
        index[rows] = torch.gather(sub_index, 1, order)
    return index


def _auto_rows(n: int, budget_elements: int = 2**25) -> int:
    return max(1, min(n, budget_elements // max(n, 1)))


def knn_indices(
    x: torch.Tensor, k: int = 10, groups: torch.Tensor | None = None, batch_size: int | None = None
) -> torch.Tensor:
    """Top-``k`` neighbours of each row of ``x [n, d]`` by inner product ``x @ x.T``.

    Self excluded; ties: lower index first. Computed in row chunks of ``batch_size`` rows
    (default: chunks of at most ~32M similarity entries), so memory stays ``O(batch_size * n)``.

    Returns:
        ``[n, k]`` long indices, most similar first.
    """
    check_features(x, "x")
    n = x.shape[0]
    check_k(k, n)
    step = batch_size or _auto_rows(n)
    out = [knn_from_gram(x[s : s + step] @ x.T, k, s, groups, overwrite=True) for s in range(0, n, step)]
    return torch.cat(out)


# -- scorers on neighbour lists (broadcast over leading dims) ------------------------------


def _shared(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """``[..., n, k]`` bool: is ``idx_a[..., i, s]`` also in the list ``idx_b[..., i, :]``."""
    return (idx_a.unsqueeze(-1) == idx_b.unsqueeze(-2)).any(dim=-1)


def mutual_knn_from_indices(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """``mean_i |N_a(i) ∩ N_b(i)| / k`` from ``[..., n, k]`` neighbour lists; returns ``[...]``."""
    n, k = idx_a.shape[-2:]
    return _shared(idx_a, idx_b).sum(dim=(-2, -1)).double() / (n * k)


def cycle_knn_from_indices(
    idx_a: torch.Tensor, idx_b: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_i 1[i ∈ N_a(N_b(i))]`` from ``[..., n, k]`` lists; returns ``[...]``.

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
    """Longest-common-subsequence length of each pair of ordered lists ``[..., k]`` -> ``[...]``."""
    equal = idx_a.unsqueeze(-1) == idx_b.unsqueeze(-2)  # [..., k, k]
    ka, kb = equal.shape[-2:]
    table = [[torch.zeros(equal.shape[:-2], dtype=torch.long, device=idx_a.device)] * (kb + 1)]
    for i in range(1, ka + 1):
        row = [table[0][0]]
        for j in range(1, kb + 1):
            row.append(torch.where(equal[..., i - 1, j - 1], table[i - 1][j - 1] + 1, torch.maximum(table[i - 1][j], row[j - 1])))
        table.append(row)
    return table[ka][kb]


def edit_distances(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """Levenshtein distance (unit insert/delete/substitute) of ordered lists ``[..., k]`` -> ``[...]``."""
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


# -- metrics on features -------------------------------------------------------------------


def _pair_indices(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    check_pair(a, b)
    check_k(k, a.shape[0])
    return knn_indices(a, k), knn_indices(b, k)


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Mutual k-NN alignment of paired features ``a [n, d_a]``, ``b [n, d_b]``.

    ``score = (1/n) Σ_i |N_a(i) ∩ N_b(i)| / k`` with ``N_x(i)`` the top-``k`` rows of
    ``x @ x.T`` (self excluded). 1 for identical neighbourhoods, about ``k/(n-1)`` by chance.
    Returns a 0-dim float32 tensor.
    """
    return mutual_knn_from_indices(*_pair_indices(a, b, k)).to(a.dtype)


def cycle_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Cycle k-NN: fraction of samples ``i`` found among the a-neighbours of their b-neighbours.

    ``score = (1/n) Σ_i 1[i ∈ ∪_{j ∈ N_b(i)} N_a(j)]`` (platonic-rep ``knn_A[knn_B]``).
    """
    idx_a, idx_b = _pair_indices(a, b, k)
    return cycle_knn_from_indices(idx_a, idx_b).to(a.dtype)


def lcs_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Mean longest-common-subsequence length of the ordered neighbour lists.

    ``score = (1/n) Σ_i LCS(N_a(i), N_b(i))``, in ``[0, k]`` (not divided by ``k``, as in
    platonic-rep's ``longest_ordinal_sequence``).
    """
    return lcs_knn_from_indices(*_pair_indices(a, b, k)).to(a.dtype)


def edit_distance_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> torch.Tensor:
    """One minus the mean Levenshtein distance of the ordered neighbour lists, over ``k``.

    ``score = 1 - (1/n) Σ_i lev(N_a(i), N_b(i)) / k``, in ``[0, 1]``.
    """
    return edit_distance_knn_from_indices(*_pair_indices(a, b, k)).to(a.dtype)
