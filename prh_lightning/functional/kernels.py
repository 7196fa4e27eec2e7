"""Kernel metrics: HSIC and CKA (linear / RBF, biased / unbiased), and their plan.

Kernels are ``[n, n]`` matrices of paired samples. Building blocks (also in
:mod:`prh_lightning.functional.utils`): :func:`linear_kernel`, :func:`rbf_kernel`,
:func:`median_distance`, :func:`center_gram` (``H K H``), :func:`u_center` (unbiased centring,
so that ``hsic(K, L, unbiased=True) = <u_center(K), u_center(L)> / (n (n - 3))``), :func:`hsic`.

The metrics never form a kernel from raw rows: each layer is centred in float64 (CKA is
invariant to a common offset; centring commutes with the biased and the unbiased centring of
the kernel) and rescaled by a power of two (CKA is scale free), then the upper triangle of
each centred kernel is streamed in row blocks and all layer pairs are accumulated in one GEMM
per block, in float64.

Unlike platonic-rep, no ``1e-6`` is added to CKA denominators by default (it breaks
``cka(x, x) == 1`` and scale invariance); pass ``eps=1e-6`` to reproduce those numbers
exactly (``eps`` is in HSIC units of the features as given).
"""

from __future__ import annotations


import torch

from ._bandwidth import median_bandwidth
from ._numerics import centre, centre_float32
from ._plan import MetricPlan, register_plan, score_pair
from ._validation import check_choice, check_min_samples, check_positive

__all__ = ["cka", "unbiased_cka"]

KERNELS = ("linear", "rbf")


def linear_kernel(x: torch.Tensor) -> torch.Tensor:
    """``K = x x^T`` for ``x [n, d]``; returns ``[n, n]``."""
    return x @ x.T


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` squared Euclidean distances, exact zeros on the diagonal."""
    sq = (x * x).sum(dim=1)
    total = sq[:, None] + sq[None, :]
    d2 = total - 2.0 * (x @ x.T)
    # below the rounding error of this formula a squared distance is 0 (identical rows)
    d2.masked_fill_(d2 <= 16 * torch.finfo(x.dtype).eps * total, 0.0)
    d2.fill_diagonal_(0.0)
    return d2


def median_distance(x: torch.Tensor) -> torch.Tensor:
    """Median of the ``n (n - 1) / 2`` pairwise Euclidean distances ``||x_i - x_j||`` (i < j) of
    ``x [n, d]``; 0-dim in ``x.dtype``.

    Averages the two middle values for an even count (as ``numpy.median``). Exact, and never
    forms an ``[n, n]`` matrix: the distances are streamed in row blocks and the two middle
    ranks selected (:func:`prh_lightning.functional._bandwidth.median_bandwidth`).

    >>> median_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]))  # distances 5, 5, 10
    tensor(5.)
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"x must be a [n, d] tensor, got {getattr(x, 'shape', type(x))}")
    return median_bandwidth(x)


def rbf_kernel(x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
    """``K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2))`` for ``x [n, d]``; returns ``[n, n]``.

    ``sigma=None`` uses the median heuristic ``sigma = median_{i<j} ||x_i - x_j||`` of ``x``
    itself (so each input of a pair gets its own bandwidth), selected without a second
    ``[n, n]`` matrix (:func:`median_distance`); the kernel itself is the only ``[n, n]`` one.
    """
    if sigma is None:
        sigma = median_distance(x)
        if float(sigma) <= 0:
            raise ValueError(
                "the median pairwise distance is 0 (more than half the samples are identical), so the "
                "median-heuristic RBF bandwidth is undefined; pass sigma= explicitly"
            )
    elif float(sigma) <= 0 or not torch.isfinite(torch.as_tensor(sigma)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    return torch.exp(-_squared_distances(x) / (2.0 * torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2))


def _check_kernels(K: torch.Tensor, L: torch.Tensor) -> int:
    for name, m in (("K", K), ("L", L)):
        if not isinstance(m, torch.Tensor) or m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"{name} must be a square [n, n] tensor, got {getattr(m, 'shape', type(m))}")
        if not m.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {m.dtype}")
        if not bool(torch.isfinite(m).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    if K.shape != L.shape:
        raise ValueError(f"K and L must have the same shape, got {tuple(K.shape)} and {tuple(L.shape)}")
    if K.device != L.device:
        raise ValueError(f"K is on {K.device} but L is on {L.device}; move both to the same device")
    return K.shape[0]


def center_gram(K: torch.Tensor) -> torch.Tensor:
    """Double-centred kernel ``H K H`` with ``H = I - 11^T / n``; ``[n, n] -> [n, n]``."""
    return K - K.mean(dim=0, keepdim=True) - K.mean(dim=1, keepdim=True) + K.mean()


def u_center(K: torch.Tensor) -> torch.Tensor:
    """Unbiased (U-)centring of a symmetric kernel ``[n, n]``, ``n >= 4``.

    With ``K~`` = ``K`` with zero diagonal, ``r = K~ 1`` and ``s = 1^T K~ 1``:
    ``U_ij = K~_ij - (r_i + r_j) / (n - 2) + s / ((n - 1)(n - 2))`` off the diagonal, ``U_ii = 0``.
    Then ``<U(K), U(L)> = <U(K), L~> = n (n - 3) HSIC_unbiased(K, L)``.
    """
    n = K.shape[0]
    check_min_samples(n, 4, "unbiased centring")
    Kt = K.clone()
    Kt.fill_diagonal_(0.0)
    r = Kt.sum(dim=1)
    U = Kt - (r[:, None] + r[None, :]) / (n - 2) + r.sum() / ((n - 1) * (n - 2))
    U.fill_diagonal_(0.0)
    return U


def hsic(K: torch.Tensor, L: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Hilbert-Schmidt independence criterion of two ``[n, n]`` kernels; returns 0-dim.

    Biased (platonic-rep, not divided by ``(n-1)^2``): ``tr(K H L H)``, ``H = I - 11^T / n``.
    Unbiased (Song et al. 2012), ``n >= 4``, with ``K~, L~`` the kernels with zero diagonals:
    ``[tr(K~ L~) + 1^T K~ 1 * 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) * 1^T K~ L~ 1] / (n (n-3))``.
    Kernels need not be symmetric (CKNNA's masked kernels are not).
    """
    n = _check_kernels(K, L)
    if not unbiased:
        KH = K - K.mean(dim=1, keepdim=True)
        LH = L - L.mean(dim=1, keepdim=True)
        return (KH * LH.T).sum()
    check_min_samples(n, 4, "the unbiased HSIC estimator")
    Kt = K.clone()
    Kt.fill_diagonal_(0.0)
    Lt = L.clone()
    Lt.fill_diagonal_(0.0)
    trace = (Kt * Lt.T).sum()
    sums = Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
    cross = Kt.sum(dim=0) @ Lt.sum(dim=1)
    return (trace + sums - 2.0 / (n - 2) * cross) / (n * (n - 3))


# -- the CKA plan ----------------------------------------------------------------------------


class CentredKernel:
    """Per-layer state of CKA: streams rows of the centred kernel ``H K H`` (biased) or ``U(K)``
    (unbiased) of centred, rescaled features ``x [n, d]``.

    ``kernel_scale``: the factor by which rescaling multiplied the kernel (``s^2`` for the
    linear kernel, 1 for RBF, whose bandwidth is rescaled with the features), so that ``eps``
    can be applied in the units of the features as given.
    """

    def __init__(
        self, x: torch.Tensor, kernel: str, unbiased: bool, sigma, rows: int, kernel_scale: float, budget: int | None = None
    ):
        self.n = x.shape[0]
        self.budget = budget  # max_memory in bytes (None: defaults), for the permutation null
        self.kernel, self.unbiased, self.kernel_scale = kernel, unbiased, kernel_scale
        sq = torch.linalg.vector_norm(x, dim=1) ** 2
        self.x = x
        if kernel == "rbf":
            self.sigma = median_bandwidth(x, rows) if sigma is None else torch.as_tensor(sigma, dtype=x.dtype)
            if not float(self.sigma) > 0:
                raise ValueError(
                    "the median pairwise distance is 0 (more than half the samples are identical), so the "
                    "median-heuristic RBF bandwidth is undefined; pass sigma= explicitly"
                )
            self.sq = sq
        if kernel == "linear":
            # x is centred, so x x^T = H K H already; the unbiased estimator needs the row sums of
            # K~ (K with a zero diagonal). U(K) itself is never formed for scoring: <U_x, U_y> follows
            # from <K~_x, K~_y>, the row sums and totals (see _cka_pairs).
            self.row_sums = x @ x.sum(dim=0) - (sq if unbiased else 0.0)
        else:
            buf = torch.empty(min(rows, self.n), self.n, dtype=x.dtype, device=x.device)
            sums = []
            for s in range(0, self.n, rows):
                e = min(self.n, s + rows)
                sums.append(self._raw_into(s, e, buf[: e - s]).sum(dim=1))
            self.row_sums = torch.cat(sums)
        self.total = self.row_sums.sum()

    def _raw_into(self, s: int, e: int, out: torch.Tensor, c0: int = 0) -> torch.Tensor:
        """Block ``K[s:e, c0:]`` written into ``out [e - s, n - c0]``; diagonal zeroed when unbiased
        (``K~``). Needs ``c0 <= s``."""
        torch.matmul(self.x[s:e], self.x[c0:].T, out=out)
        diag = out.diagonal(offset=s - c0)  # entries (i, i): a view, set in place
        if self.kernel == "rbf":  # exp(-(|x_i|^2 + |x_j|^2 - 2 x_i.x_j) / (2 sigma^2))
            out.mul_(-2.0).add_(self.sq[s:e, None]).add_(self.sq[None, c0:]).clamp_min_(0.0)
            out.mul_(-0.5 / float(self.sigma) ** 2).exp_()
            diag.fill_(1.0)
        if self.unbiased:
            diag.zero_()
        return out

    def centred_into(self, s: int, e: int, out: torch.Tensor, c0: int = 0) -> torch.Tensor:
        """Block ``C[s:e, c0:]`` of the centred kernel written into ``out [e - s, n - c0]``."""
        self._raw_into(s, e, out, c0)
        n, r = self.n, self.row_sums
        if self.unbiased:  # U_ij = K~_ij - (r_i + r_j)/(n-2) + s/((n-1)(n-2))
            out.sub_(r[s:e, None] / (n - 2)).sub_(r[None, c0:] / (n - 2)).add_(self.total / ((n - 1) * (n - 2)))
            out.diagonal(offset=s - c0).zero_()
        elif self.kernel == "rbf":  # H K H (linear kernels were centred through their features)
            out.sub_(r[s:e, None] / n).sub_(r[None, c0:] / n).add_(self.total / n**2)
        return out

    def permuted(self, perm: torch.Tensor) -> "CentredKernel":
        """The same layer with samples reordered (row ``i`` <- sample ``perm[i]``); no new bandwidth."""
        other = object.__new__(CentredKernel)
        other.__dict__.update(self.__dict__)
        other.x = self.x[perm]
        other.row_sums = self.row_sums[perm]
        if self.kernel == "rbf":
            other.sq = self.sq[perm]
        return other


    def dense(self) -> torch.Tensor:
        """The whole centred kernel ``[n, n]``."""
        out = torch.empty(self.n, self.n, dtype=self.x.dtype, device=self.x.device)
        rows = max(1, min(self.n, _BUDGET // max(1, self.n)))
        for s in range(0, self.n, rows):
            self.centred_into(s, min(self.n, s + rows), out[s : s + rows])
        return out


def _triangle_mask(s: int, e: int, n: int, device, diagonal: bool = False) -> torch.Tensor:
    """``[e - s, n - s]`` bool: the entries ``(i, j)``, ``i < j`` (``i <= j`` with ``diagonal``), of
    rows ``s:e`` against columns ``s:n``; masked selection walks them in ``torch.triu_indices`` order."""
    return torch.ones(e - s, n - s, dtype=torch.bool, device=device).triu_(0 if diagonal else 1)


def _packed_index(u: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    """Row of entry ``(u, v)``, ``u <= v``, in the packed upper triangle (diagonal included,
    row-major): ``u (2 n + 1 - u) / 2 + v - u``."""
    return (2 * n + 1 - u) * u // 2 + v - u


def _band_starts(n: int, rows: int):
    """``(s, e, a, b)`` per band of ``rows`` rows: rows ``s:e`` of the upper triangle hold its
    entries ``a:b`` (row-major order of the strict upper triangle)."""
    for s in range(0, n, rows):
        e = min(n, s + rows)
        yield s, e, s * n - s * (s + 1) // 2, e * n - e * (e + 1) // 2


def _triangle_pairs(n: int, rows: int, key_dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column ``[m]`` (``m = n (n - 1) / 2``) of every strict upper triangle entry, in
    ``key_dtype``, built band by band (no int64 ``[2, m]`` copy)."""
    m = n * (n - 1) // 2
    first, second = (torch.empty(m, dtype=key_dtype, device=device) for _ in range(2))
    for s, e, a, b in _band_starts(n, rows):
        mask = _triangle_mask(s, e, n, device)
        torch.masked_select(torch.arange(s, e, dtype=key_dtype, device=device)[:, None].expand_as(mask), mask, out=first[a:b])
        torch.masked_select(torch.arange(s, n, dtype=key_dtype, device=device)[None, :].expand_as(mask), mask, out=second[a:b])
    return first, second


def _stream_centred(
    kernels: list[CentredKernel], rows: int, tri: torch.Tensor | None = None, table: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream the centred kernels in bands of ``rows`` rows into ``tri [L, m]`` (row ``l``:
    ``C_l[i, j]``, ``i < j``, in ``triu_indices`` order) or into ``table [n (n + 1) / 2, L]`` (the
    upper triangles with their diagonals, packed: row :func:`_packed_index` ``(u, v)``, ``u <= v``,
    holds ``C[u, v]`` of every layer).
    Returns the diagonals ``[L, n]`` and ``||C_l||^2 = 2 sum_{i<j} C_ij^2 + sum_i C_ii^2`` ``[L]``
    (float64; each layer's sum is the same whichever group it is streamed with)."""
    n, dtype, device = kernels[0].n, kernels[0].x.dtype, kernels[0].x.device
    diag = torch.empty(len(kernels), n, dtype=torch.float64, device=device)
    norms = torch.zeros(len(kernels), dtype=torch.float64, device=device)
    buffer = torch.empty(rows * n, dtype=dtype, device=device)
    entries = torch.empty(rows * n, dtype=dtype, device=device) if tri is None else None
    for s, e, a, b in _band_starts(n, rows):
        mask = _triangle_mask(s, e, n, device)
        with_diagonal = _triangle_mask(s, e, n, device, diagonal=True) if table is not None else None
        for l, k in enumerate(kernels):
            block = k.centred_into(s, e, buffer[: (e - s) * (n - s)].view(e - s, n - s), c0=s)
            upper = tri[l, a:b] if tri is not None else entries[: b - a]
            torch.masked_select(block, mask, out=upper)
            norms[l] += 2.0 * upper.square().sum(dtype=torch.float64)
            diag[l, s:e] = block.diagonal()
            if table is not None:  # rows s:e of the packed triangle are its rows a + s:b + e
                torch.masked_select(block, with_diagonal, out=entries[: b - a + e - s])
                table[a + s : b + e, l] = entries[: b - a + e - s]
    norms += (diag**2).sum(dim=1)
    for value in norms:
        check_positive(value, "the centred kernel's self-similarity HSIC(K, K)")
    return diag, norms


def _permuted_inner(
    tri_x: torch.Tensor, diag_x: torch.Tensor, table: torch.Tensor, first: torch.Tensor, second: torch.Tensor, perms: torch.Tensor
) -> torch.Tensor:
    """``[P, Lx, Ly]`` float64 ``<C_x, C_y[π][:, π]>`` from the ``x`` triangles ``tri_x [Lx, m]``,
    diagonals ``diag_x [Lx, n]``, the packed ``y`` table ``[n (n + 1) / 2, Ly]`` (see
    :func:`_stream_centred`) and the triangle's rows and columns ``first``, ``second`` ``[m]``.

    A batch of permutations gathers the table rows of ``(π(i), π(j))``, ``i < j`` (ordered
    ``u < v``), one random access per entry for all ``y`` layers, in chunks small enough that the
    gathered block stays in cache; one GEMM against the ``x`` triangles scores every pair under
    every permutation of the batch, accumulated in float64 over the chunks."""
    n, m = diag_x.shape[1], first.shape[0]
    lx, ly = tri_x.shape[0], table.shape[1]
    device, key_dtype = table.device, first.dtype
    batch, chunk = _NULL_BATCH, min(m, _NULL_CHUNK)
    # buffers allocated once and reused: fresh multi-megabyte tensors per chunk cost page faults
    # of the order of the gather itself
    keys = torch.empty(3, chunk * batch, dtype=key_dtype, device=device)
    moved = torch.empty(chunk * batch, ly, dtype=table.dtype, device=device)
    out = torch.empty(perms.shape[0], lx, ly, dtype=torch.float64, device=device)
    for s in range(0, perms.shape[0], batch):
        p = perms[s : s + batch].T.contiguous().to(key_dtype)  # [n, B]
        b = p.shape[1]
        inner = torch.zeros(lx, b * ly, dtype=torch.float64, device=device)
        for c0 in range(0, m, chunk):
            c1 = min(m, c0 + chunk)
            key, high, low = (buf[: (c1 - c0) * b].view(c1 - c0, b) for buf in keys)
            # key[(i, j), perm] = the packed row of (u, v), {u, v} = {π(i), π(j)}, u < v:
            # (2 n + 1 - u) u / 2 + v - u (_packed_index's formula, in place; the product is even,
            # so an arithmetic shift of its negative halves it exactly, without integer division)
            torch.index_select(p, 0, first[c0:c1], out=key)
            torch.index_select(p, 0, second[c0:c1], out=high)
            torch.minimum(key, high, out=low)
            torch.maximum(key, high, out=high)
            torch.sub(high, low, out=high)
            torch.sub(low, 2 * n + 1, out=key).mul_(low).bitwise_right_shift_(1)
            torch.sub(high, key, out=key)
            block = moved[: (c1 - c0) * b]  # C_y[π(i), π(j)] of every y layer, per permutation
            torch.index_select(table, 0, key.view(-1), out=block)
            inner += _split_product(tri_x[:, c0:c1], block.view(c1 - c0, b * ly))
        u = p.T.long().flatten()
        diag_y = table.index_select(0, _packed_index(u, u, n)).view(b, n, ly).double()  # C_y[π(i), π(i)]
        total = 2.0 * inner.view(lx, b, ly) + torch.einsum("an,bnc->abc", diag_x, diag_y)
        out[s : s + b] = total.permute(1, 0, 2)
    return out


def _split_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [M, K] @ b [K, N]`` in float64, from float32 (or float64) products over runs of
    :data:`_NULL_SUM` inner entries summed in float64. One float32 GEMM over 65,536 entries is
    off by up to ~2e-6 relative when ``M`` is 1 (and its rounding depends on ``M``, ``N``): short
    runs keep the null within ~1e-8 of float64 whichever way the layers are grouped."""
    k, run = a.shape[1], _NULL_SUM
    whole = k // run * run
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64, device=a.device)
    if whole:
        runs = torch.bmm(a[:, :whole].view(a.shape[0], -1, run).transpose(0, 1), b[:whole].view(-1, run, b.shape[1]))
        out += runs.double().sum(dim=0)
    if whole < k:
        out += (a[:, whole:] @ b[whole:]).double()
    return out


def _null_layout(n: int, lx: int, ly: int, itemsize: int, budget: int | None) -> tuple[int, int, int] | None:
    """``(x layers per group, y layers per group, rows per band)`` for the CKA null within
    ``budget`` bytes (default :data:`_NULL_BYTES`), or None when one ``x`` triangle and one ``y``
    table do not fit together.

    Working memory of one group pass: the packed ``y`` table (``m + n`` entries per layer), the
    ``x`` triangles (``m = n (n - 1) / 2`` entries per layer), the triangle's rows and columns
    (``2 m`` keys) and the streaming and gather buffers. Every pass gathers ``m`` random table
    rows per permutation, which costs about the same for 1 or 13 layers per row (memory latency,
    not bandwidth), so the groups minimise the number of passes, then the ``x`` groups (each
    rebuilds the ``y`` tables)."""
    budget = _NULL_BYTES if budget is None else budget
    m = n * (n - 1) // 2
    key_size = 4 if (n + 1) * (n + 2) < 2**31 else 8
    per_band_row = n * (3 * itemsize + 1)  # band buffer, y triangle entries, their squares, mask
    rows = max(1, min(-(-n // 8), budget // 16 // per_band_row))  # 8 bands, or ~1/16 of the budget
    gather = _NULL_BATCH * (min(m, _NULL_CHUNK) * (3 * key_size + ly * itemsize) + n * ly * 8)
    fixed = 2 * m * key_size + rows * per_band_row + gather + (lx + ly) * n * 8
    triangle, table = m * itemsize, (m + n) * itemsize
    free = budget - fixed
    if free < triangle + table:
        return None
    layouts = []
    for per_x in range(1, lx + 1):
        per_y = min(ly, (free - per_x * triangle) // table)
        if per_y >= 1:
            x_groups = -(-lx // per_x)
            layouts.append((x_groups * -(-ly // per_y), x_groups, per_x, per_y))
    _, _, per_x, per_y = min(layouts)
    return per_x, per_y, rows


def _cka_null(
    xs: list[CentredKernel], ys: list[CentredKernel], perms: torch.Tensor, eps: float = 0.0, unbiased: bool = False, **_
) -> torch.Tensor:
    """``[P, Lx, Ly]`` CKA with every ``y`` layer permuted: centring commutes with permuting samples,
    so ``HSIC(K, L_π) ∝ <C_K, C_L[π][:, π]>`` and the denominators do not change.

    The centred kernels are formed once per group. They are symmetric, so only upper triangles are
    scored (:func:`_permuted_inner`). Layers are grouped so that each group's packed ``y`` table
    ``[n (n + 1) / 2, Ly']`` and ``x`` triangles ``[Lx', m]`` stay within the memory budget of the layers'
    preparation (``max_memory``, default 1 GiB, see :func:`_null_layout`); when not even one of
    each fits, every permutation is scored by the streamed pair sums on permuted ``y`` features
    (as :func:`._plan.permuted_scores` does for plans without a null): no table at all.
    """
    n, device = xs[0].n, xs[0].x.device
    lx, ly = len(xs), len(ys)
    layout = _null_layout(n, lx, ly, xs[0].x.element_size(), xs[0].budget)
    if layout is None:
        return torch.stack([_cka_pairs(xs, [k.permuted(p) for k in ys], eps=eps, unbiased=unbiased).double() for p in perms])
    per_x, per_y, rows = layout
    # int32 keys when the packed index allows (half the index traffic): (2 n + 1 - u) u < 2^31
    key_dtype = torch.int32 if (n + 1) * (n + 2) < 2**31 else torch.int64
    first, second = _triangle_pairs(n, rows, key_dtype, device)
    out = torch.empty(perms.shape[0], lx, ly, dtype=torch.float64, device=device)
    c = n * (n - 3) if unbiased else 1.0
    for x0 in range(0, lx, per_x):
        group_x = xs[x0 : x0 + per_x]
        tri_x = torch.empty(len(group_x), n * (n - 1) // 2, dtype=xs[0].x.dtype, device=device)
        diag_x, self_x = _stream_centred(group_x, rows, tri=tri_x)
        for y0 in range(0, ly, per_y):
            group_y = ys[y0 : y0 + per_y]
            table = torch.empty(n * (n + 1) // 2, len(group_y), dtype=ys[0].x.dtype, device=device)
            diag_y, self_y = _stream_centred(group_y, rows, table=table)
            denom = torch.sqrt(self_x[:, None] * self_y[None, :])
            if eps:
                sx = torch.tensor([k.kernel_scale for k in group_x], dtype=torch.float64, device=device)
                sy = torch.tensor([k.kernel_scale for k in group_y], dtype=torch.float64, device=device)
                denom = denom + eps * c * sx[:, None] * sy[None, :]
            inner = _permuted_inner(tri_x, diag_x, table, first, second, perms)
            out[:, x0 : x0 + per_x, y0 : y0 + per_y] = inner / denom
            del table, inner  # before the next group's table is allocated
        del tri_x
    return out


def prepare_kernel(
    x64: torch.Tensor, ctx, kernel: str = "linear", unbiased: bool = False, sigma=None, eps: float = 0.0, **_
) -> CentredKernel:
    """Per-layer work of CKA: centre in float64, rescale exactly, set up the centred-kernel rows."""
    if unbiased:
        check_min_samples(x64.shape[0], 4, "unbiased CKA")
    # RBF kernels at the median bandwidth vary little around their mean (distances concentrate in
    # high dimension), so centring them cancels most digits: float32 blocks would leave CKA ~1e-5
    # off the float64 value at n = 4,000. RBF blocks are computed in float64 (about 2x the time).
    c = centre(x64, ctx.input_eps, torch.float64 if kernel == "rbf" else ctx.dtype, ctx.name)
    if kernel == "rbf":
        bandwidth = None if sigma is None else float(sigma) * c.scale
        return CentredKernel(c.xc, kernel, unbiased, bandwidth, ctx.rows, 1.0, ctx.budget)
    return CentredKernel(c.xc, kernel, unbiased, None, ctx.rows, c.scale**2, ctx.budget)


def prepare_kernel_fast(x: torch.Tensor, ctx, kernel: str = "linear", unbiased: bool = False, **_) -> CentredKernel | None:
    """:func:`prepare_kernel` for linear kernels of well-spread float32 rows, centred (and
    normalised when ``ctx.normalize``) in float32 (:func:`._numerics.centre_float32`); ``None``:
    take the float64 route."""
    if kernel != "linear" or unbiased and x.shape[0] < 4:
        return None
    c = centre_float32(x, ctx.normalize)
    return None if c is None else CentredKernel(c.xc, kernel, unbiased, None, ctx.rows, c.scale**2, ctx.budget)


def _cka_pairs(xs: list[CentredKernel], ys: list[CentredKernel], eps: float = 0.0, unbiased: bool = False, **_):
    """``[Lx, Ly]`` CKA from the centred kernels: ``<C_x, C_y> / (||C_x|| ||C_y|| + eps')``."""
    same = ys is xs
    kernels = list(xs) + ([] if same else list(ys))
    n = kernels[0].n
    dtype, device = kernels[0].x.dtype, kernels[0].x.device
    # Centred kernels are symmetric, so only the upper triangle is computed, in blocks of rows
    # s:e against columns s:n; about 4 blocks make that 5/8 of the work of full Grams.
    rows = max(1, min(n, _BUDGET // max(1, len(kernels) * n), -(-n // 4)))
    buffer = torch.empty(len(kernels) * rows * n, dtype=dtype, device=device)
    inner = torch.zeros(len(kernels), len(kernels), dtype=torch.float64, device=device)
    # Unbiased linear kernels are scored from K~ (zero diagonal) and corrected afterwards: U(K) has
    # zero row sums, so <U_x, U_y> = <K~_x, K~_y> - 2 r_x . r_y / (n-2) + s_x s_y / ((n-1)(n-2))
    # (r: row sums of K~, s their total); no pass over the [n, n] blocks beyond the Gram itself.
    # For centred features r is about -diag(K), so these terms are small: nothing cancels.
    raw = unbiased and all(k.kernel == "linear" for k in kernels)
    upper = torch.ones(rows, rows, dtype=dtype, device=device).triu_()  # (a broadcast multiply: 2x triu_'s speed)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        block = buffer[: len(kernels) * (e - s) * (n - s)].view(len(kernels), e - s, n - s)
        for out, k in zip(block, kernels):
            k._raw_into(s, e, out, c0=s) if raw else k.centred_into(s, e, out, c0=s)
        # <C_l, C_m> = 2 sum_{i<j} C_l C_m + sum_i diag products. Zeroing the strict lower triangle
        # of the square part C[s:e, s:e] leaves each i < j once in the block: one GEMM for all
        # layers of both models per block. (Unbiased kernels have a zero diagonal.)
        square = block[:, :, : e - s]
        if not unbiased:
            diag = square.diagonal(dim1=1, dim2=2).clone()  # [L, e - s]
            inner -= (diag @ diag.T).double()
        square.mul_(upper[: e - s, : e - s])
        whole = block.view(len(kernels), -1)
        # float32 GEMMs summed in float64 over column chunks: one GEMM over ~2.6e5 columns left CKA
        # 1.2e-6 off the float64 value for two layers (its accumulation error grows with length)
        step = whole.shape[1] if whole.dtype == torch.float64 else _PAIR_CHUNK
        for c in range(0, whole.shape[1], step):
            part = whole[:, c : c + step]
            inner += 2.0 * (part @ part.T).double()
    if raw:
        sums = torch.stack([k.row_sums for k in kernels]).double()  # [L, n]
        totals = sums.sum(dim=1)
        inner += totals[:, None] * totals[None, :] / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (sums @ sums.T)
    self_sims = inner.diagonal()
    for value, k in zip(self_sims, kernels):
        check_positive(value, "the centred kernel's self-similarity HSIC(K, K)")
    lx = len(xs)
    cross = inner if same else inner[:lx, lx:]
    self_y = self_sims if same else self_sims[lx:]
    c = n * (n - 3) if unbiased else 1.0
    if eps:
        scale_x = torch.tensor([k.kernel_scale for k in xs], dtype=torch.float64, device=device)
        scale_y = torch.tensor([k.kernel_scale for k in ys], dtype=torch.float64, device=device)
        eps_units = eps * c * scale_x[:, None] * scale_y[None, :]  # eps in HSIC units of the raw features
    else:
        eps_units = 0.0
    return cross / (torch.sqrt(self_sims[:lx, None] * self_y[None, :]) + eps_units)


_BUDGET = 2**26
_PAIR_CHUNK = 2**14  # columns per float32 GEMM in the CKA pair sums (then summed in float64)
_NULL_BATCH = 4  # permutations per gather and GEMM in the CKA null
_NULL_CHUNK = 2**16  # triangle entries per gather and GEMM in the CKA null
_NULL_SUM = 2**12  # inner entries per float32 product in the CKA null (then summed in float64)
_NULL_BYTES = 2**30  # the CKA null's working memory without max_memory (a table up to n ~ 14k in float32)


def _check_kernel_name(kernel: str) -> None:
    check_choice(kernel, KERNELS, "kernel")


def _check_sigma(sigma) -> None:
    if sigma is not None and (isinstance(sigma, bool) or not float(sigma) > 0 or float(sigma) == float("inf")):
        raise ValueError(f"sigma must be a positive finite number or None (median heuristic), got {sigma!r}")


def _cka_bounds(unbiased: bool = False, **_):
    """Biased CKA of PSD kernels is in [0, 1]; the unbiased estimator can go below 0."""
    return (-1.0, 1.0) if unbiased else (0.0, 1.0)


for _name, _unbiased in (("cka", False), ("unbiased_cka", True)):
    _defaults = {"kernel": "linear", "sigma": None, "eps": 0.0}
    if _name == "cka":
        _defaults["unbiased"] = False

    def _prepare(x64, ctx, _fixed=_unbiased, unbiased=None, **options):
        return prepare_kernel(x64, ctx, unbiased=_fixed if unbiased is None else unbiased, **options)

    def _prepare_fast(x, ctx, _fixed=_unbiased, unbiased=None, **options):
        return prepare_kernel_fast(x, ctx, unbiased=_fixed if unbiased is None else unbiased, **options)

    def _pairs(xs, ys, _fixed=_unbiased, unbiased=None, **options):
        return _cka_pairs(xs, ys, unbiased=_fixed if unbiased is None else unbiased, **options)

    register_plan(
        MetricPlan(
            name=_name,
            defaults=_defaults,
            prepare=_prepare,
            pairs=_pairs,
            bounds=(lambda _fixed=_unbiased, unbiased=None, **o: _cka_bounds(_fixed if unbiased is None else unbiased)),
            permute=CentredKernel.permuted,
            null=(lambda xs, ys, perms, _fixed=_unbiased, unbiased=None, **o: _cka_null(xs, ys, perms, unbiased=_fixed if unbiased is None else unbiased, **o)),
            resampling="jackknife",
            option_checks={"kernel": _check_kernel_name, "sigma": _check_sigma},
            prepare_fast=_prepare_fast,
        )
    )


def cka(
    a: torch.Tensor,
    b: torch.Tensor,
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: float | None = None,
    eps: float = 0.0,
    normalize: bool = True,
    clip_quantile: float | None = None,
) -> torch.Tensor:
    """Centred kernel alignment of ``a [n, d_a]``, ``b [n, d_b]``; returns 0-dim.

    ``CKA = HSIC(K, L) / (sqrt(HSIC(K, K) HSIC(L, L)) + eps)`` with ``K = k(a)``, ``L = k(b)``,
    ``kernel="linear"`` (``a a^T``) or ``"rbf"`` (``exp(-||a_i - a_j||^2 / (2 sigma^2))``,
    ``sigma=None``: median pairwise distance of each input). ``unbiased`` picks the HSIC
    estimator (needs ``n >= 4``). ``eps=1e-6`` reproduces platonic-rep. ``normalize=True``
    (the default in every entry point, the PRH protocol) L2-normalises rows first; pass
    ``normalize=False`` for CKA of the features as given (Kornblith et al. 2019).

    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.randn(100, 16, generator=g)
    >>> q = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q
    >>> round(float(cka(a, 5 * a @ q + 1000, normalize=False)), 5)  # rotation, scale, offset
    1.0
    """
    return score_pair("cka", a, b, normalize, clip_quantile, kernel=kernel, unbiased=unbiased, sigma=sigma, eps=eps)


def unbiased_cka(
    a: torch.Tensor,
    b: torch.Tensor,
    kernel: str = "linear",
    sigma: float | None = None,
    eps: float = 0.0,
    normalize: bool = True,
    clip_quantile: float | None = None,
) -> torch.Tensor:
    """CKA with the unbiased HSIC estimator (Song et al. 2012); see :func:`cka`. ``n >= 4``.

    About 0 for independent features at any ``n`` (the biased estimator is not).

    >>> a = torch.randn(64, 8)
    >>> round(float(unbiased_cka(a, a)), 5)
    1.0
    """
    return score_pair("unbiased_cka", a, b, normalize, clip_quantile, kernel=kernel, sigma=sigma, eps=eps)
