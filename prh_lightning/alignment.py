"""Layer x layer alignment: ``alignment_matrix`` and ``best_alignment``.

Per-layer work (normalisation, Gram, centring, neighbour search) is done once per layer,
then every layer pair is scored from those prepared pieces in batches. Kernels are streamed
in row blocks of at most 256 MB, and only one ``[n, n]`` mask / value map is alive at a time,
so 13 x 13 layers at ``n = 10,000``, ``d = 768`` peak at about 2-3.3 GB (0.74 GB of it the
inputs). Neighbour search keeps one reusable ``[n, n]`` Gram buffer (at most 512 MB, i.e.
``n <= 11,585``, and only when ``batch_size`` is not given; beyond that it streams row blocks)
so each layer's Gram is multiplied from its upper triangle only and mirrored. Only torch ops
are used, so everything runs where the inputs live (CPU or GPU).

Fast paths: ``mutual_knn``, ``cycle_knn``, ``lcs_knn``, ``edit_distance_knn`` (neighbour lists,
computed once per layer); ``cka`` / ``unbiased_cka`` (linear or RBF; the upper triangle of each
centred kernel, all layer pairs in one GEMM per row block); ``cknna`` (unbiased; masked HSIC
in ``O(n k)`` per pair from neighbour lists). Other metrics (``svcca``, ``rsa``,
``cknna(unbiased=False)``, any callable) are computed pair by pair with the functional metric.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Union

import torch

from .functional import get_metric
from .functional._validation import check_centred_signal, check_features, check_k, check_min_samples, check_positive
from .functional.kernels import median_distance
from .functional.knn import (
    cycle_knn_from_indices,
    edit_distance_knn_from_indices,
    knn_from_gram,
    lcs_knn_from_indices,
    mutual_knn_from_indices,
)

__all__ = ["alignment_matrix", "best_alignment", "layer_names", "clip_outliers", "prepare_layers"]

Layers = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]
_BUDGET = 2**26  # elements per streamed block (256 MB in float32)
_WHOLE_GRAM = 2**27  # up to this many elements (512 MB in float32, n <= 11,585) a whole Gram is kept


def layer_names(xs: Layers) -> list[str]:
    """Row/column labels of :func:`alignment_matrix`: mapping keys, or ``"0", "1", ...`` for lists."""
    if isinstance(xs, Mapping):
        return [str(name) for name in xs]
    return [str(i) for i in range(len(xs))]


def _as_list(xs: Layers, what: str) -> list[torch.Tensor]:
    if isinstance(xs, torch.Tensor):
        raise TypeError(
            f"{what} must be a Representations, a mapping name -> [n, d] tensor or a list of [n, d] tensors, "
            f"got a single tensor of shape {tuple(xs.shape)}; wrap it in a list"
        )
    if isinstance(xs, Mapping):
        items = list(xs.items())
    elif isinstance(xs, Sequence):
        items = [(str(i), x) for i, x in enumerate(xs)]
    else:
        raise TypeError(f"{what} must be a Representations, a mapping or a list of tensors, got {type(xs).__name__}")
    if not items:
        raise ValueError(f"{what} holds no layers")
    for name, x in items:
        check_features(x, f"{what}[{name!r}]", finite=False)
    n = items[0][1].shape[0]
    for name, x in items:
        if x.shape[0] != n:
            raise ValueError(f"{what}[{name!r}] has {x.shape[0]} samples but {what}[{items[0][0]!r}] has {n}")
    return [x for _, x in items]


def clip_outliers(x: torch.Tensor, q: float) -> torch.Tensor:
    """Clamp ``x [n, d]`` to ``[-t, t]``, ``t = mean_i quantile_q(|x_i|)`` (per-sample quantile, averaged).

    platonic-rep's ``remove_outliers(exact=False)`` computes the same threshold over all layers
    of a model stacked together; here it is computed per layer.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"clip_quantile must be in (0, 1], got {q}")
    if q == 1.0:
        return x
    rows = max(1, 2**23 // x.shape[1])  # torch.quantile refuses inputs above 2**24 elements
    per_sample = torch.cat([torch.quantile(x[s : s + rows].abs(), q, dim=1) for s in range(0, x.shape[0], rows)])
    t = per_sample.mean()
    return x.clamp(-t, t)


def prepare_layers(
    xs: Layers, normalize: bool = True, clip_quantile: float | None = None, what: str = "xs"
) -> list[torch.Tensor]:
    """Validate layers, optionally clip outliers (per layer), then L2-normalise rows if ``normalize``."""
    layers = _as_list(xs, what)
    out = []
    for i, x in enumerate(layers):
        check_features(x, f"{what} layer {i}")
        if clip_quantile is not None:
            x = clip_outliers(x, clip_quantile)
        if normalize:
            norms = x.norm(dim=1, keepdim=True)
            if bool((norms == 0).any()):
                raise ValueError(
                    f"{what} layer {i} has an all-zero row (sample {int((norms.squeeze(1) == 0).nonzero()[0])}); "
                    "it cannot be L2-normalised; drop such samples or pass normalize=False"
                )
            x = x / norms
        out.append(x)
    return out


def _rows_per_block(n: int, layers: int, batch_size: int | None) -> int:
    """Kernel rows streamed at once: ``batch_size``, or as many as fit a 256 MB block."""
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (rows per block), got {batch_size!r}")
        return min(batch_size, n)
    return max(1, min(n, _BUDGET // max(1, layers * n)))


# -- neighbour-list metrics --------------------------------------------------------------

_KNN_SCORERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mutual_knn": mutual_knn_from_indices,
    "cycle_knn": cycle_knn_from_indices,
    "lcs_knn": lcs_knn_from_indices,
    "edit_distance_knn": edit_distance_knn_from_indices,
}


def _gram_buffer(n: int, batch_size: int | None, like: torch.Tensor) -> torch.Tensor | None:
    """One ``[n, n]`` buffer reused for every layer's whole Gram matrix, or ``None`` to stream
    row blocks instead (when ``batch_size`` asks for streaming or ``n^2`` exceeds ``_WHOLE_GRAM``)."""
    if batch_size is not None or n * n > _WHOLE_GRAM:
        return None
    return torch.empty(n, n, dtype=like.dtype, device=like.device)


def _symmetric_gram_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [n, n] = x x^T`` for ``x [n, d]``, multiplying only the upper triangle.

    Row block ``s:e`` is multiplied against columns ``s:n`` only and then mirrored into the
    lower triangle, so 8 blocks cost 9/16 of a full product (plus a memory-bound transposed
    copy); the result is exactly symmetric.
    """
    n = x.shape[0]
    rows = max(64, -(-n // 8))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        torch.mm(x[s:e], x[s:].T, out=out[s:e, s:])
        out[e:, s:e].copy_(out[s:e, e:].T)
    return out


def _neighbours(
    x: torch.Tensor, k: int, rows: int, gram: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, k]`` neighbour indices of ``x [n, d]`` (self excluded) and their inner products.

    With ``gram`` (an ``[n, n]`` scratch buffer, overwritten) the whole Gram matrix is built
    once from its upper triangle; otherwise it is streamed in blocks of ``rows`` rows.
    """
    if gram is not None:
        _symmetric_gram_into(x, gram)
        i = knn_from_gram(gram, k, overwrite=True)  # only the diagonal is overwritten
        return i, torch.gather(gram, 1, i)
    idx, val = [], []
    for s in range(0, x.shape[0], rows):
        block = x[s : s + rows] @ x.T
        i = knn_from_gram(block, k, row_offset=s, overwrite=True)  # only the diagonal is overwritten
        idx.append(i)
        val.append(torch.gather(block, 1, i))
    return torch.cat(idx), torch.cat(val)


def _pairwise(
    xs_state: list, ys_state: list, score: Callable[..., torch.Tensor], pair_cost: int
) -> torch.Tensor:
    """Score every (i, j) from per-layer states (tuples of ``[n, k]`` tensors), batching over j."""
    step = max(1, _BUDGET // max(1, pair_cost))
    stacked = [torch.stack(parts) for parts in zip(*ys_state)]
    rows = []
    for state in xs_state:
        row = [score(*state, *[s[j : j + step] for s in stacked]) for j in range(0, len(ys_state), step)]
        rows.append(torch.cat(row))
    return torch.stack(rows)


def _mutual_knn_matrix(idx_x: list[torch.Tensor], idx_y: list[torch.Tensor]) -> torch.Tensor:
    """``|N_x(i) ∩ N_y(i)|`` summed over samples by looking ``y``'s lists up in ``x``'s 0/1 mask.

    Per x-layer: scatter its ``n k`` neighbours into an ``[n, n]`` bool mask, then gather at the
    ``n k`` neighbours of every y-layer: ``O(n^2 + L n k)`` instead of ``O(L n k^2)`` comparisons.
    """
    n, k = idx_x[0].shape
    stacked = torch.stack(idx_y)  # [Ly, n, k]
    rows = torch.arange(n, device=stacked.device)
    mask = torch.zeros(n, n, dtype=torch.bool, device=stacked.device)
    out = []
    for idx in idx_x:
        mask.zero_()
        mask[rows[:, None], idx] = True
        hits = mask[rows[None, :, None], stacked]  # [Ly, n, k]
        out.append(hits.sum(dim=(1, 2)).double() / (n * k))
    return torch.stack(out)


def _knn_matrix(xs, ys, metric: str, k: int, rows: int, gram: torch.Tensor | None = None) -> torch.Tensor:
    n = xs[0].shape[0]
    check_k(k, n)
    idx_x = [_neighbours(x, k, rows, gram)[0] for x in xs]
    idx_y = idx_x if ys is None else [_neighbours(y, k, rows, gram)[0] for y in ys]
    if metric == "mutual_knn":
        return _mutual_knn_matrix(idx_x, idx_y).to(xs[0].dtype)
    scorer = _KNN_SCORERS[metric]
    cost = n * k * k * (16 if metric in ("lcs_knn", "edit_distance_knn") else 1)
    return _pairwise([(i,) for i in idx_x], [(i,) for i in idx_y], scorer, cost).to(xs[0].dtype)


class _CknnaLayer:
    """One layer for CKNNA: neighbour lists ``idx [n, k]`` (self excluded), their kernel values
    ``val``, back links ``back[i, t] = K[j, i]`` if ``i`` is among the neighbours of
    ``j = idx[i, t]`` (else 0), and the self-similarity ``sim(K, K)``."""

    def __init__(
        self, x: torch.Tensor, k: int, rows: int, mask: torch.Tensor, value: torch.Tensor, gram: torch.Tensor | None
    ):
        self.idx, self.val = _neighbours(x, k, rows, gram)
        _fill_maps(self, mask, value)
        self.back = value[self.idx, torch.arange(x.shape[0], device=x.device)[:, None]]
        self.self_sim = _masked_hsic_against(self, [self], mask, value)[0]


def _fill_maps(layer: _CknnaLayer, mask: torch.Tensor, value: torch.Tensor) -> None:
    """Dense ``[n, n]`` maps of one layer: ``mask[i, j] = j in N(i)``, ``value[i, j] = K_ij`` there (else 0)."""
    rows = torch.arange(layer.idx.shape[0], device=layer.idx.device)[:, None]
    mask.zero_()
    mask[rows, layer.idx] = True
    value.zero_()
    value[rows, layer.idx] = layer.val


def _masked_hsic_against(a: _CknnaLayer, bs: list[_CknnaLayer], mask: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Unbiased ``HSIC(M∘K_a, M∘L_b)`` of CKNNA for layer ``a`` (whose maps are in ``mask``,
    ``value``) against every ``b``: ``[Lb]``.

    The entries of ``M`` are enumerated through ``b``'s lists (``j = idx_b[i, t]``) and looked up
    in ``a``'s dense maps, so each pair costs ``O(n k)``: ``P'_ij = K_ij``, ``Q'_ij = L_ij`` on
    ``M``, and the HSIC formula needs ``tr(P'Q') = Σ P'_ij Q'_ji``, ``1^T P'Q' 1`` and the sums.
    """
    n = a.idx.shape[0]
    i = torch.arange(n, device=a.idx.device)[None, :, None]
    idx_b = torch.stack([b.idx for b in bs])  # [Lb, n, k]
    p = value[i, idx_b]  # P'_ij: zero unless j in N_a(i) (j in N_b(i) by construction)
    q = torch.stack([b.val for b in bs]) * mask[i, idx_b]  # Q'_ij
    q_back = torch.stack([b.back for b in bs]) * mask[idx_b, i]  # Q'_ji: i in N_b(j) and in N_a(j)
    trace = (p * q_back).sum(dim=(1, 2))
    col_p = torch.zeros(len(bs), n, dtype=p.dtype, device=p.device).scatter_add_(1, idx_b.flatten(1), p.flatten(1))
    cross = (col_p * q.sum(dim=-1)).sum(dim=-1)
    sums = p.sum(dim=(1, 2)) * q.sum(dim=(1, 2)) / ((n - 1) * (n - 2))
    return (trace + sums - 2.0 / (n - 2) * cross) / (n * (n - 3))


def _cknna_matrix(xs, ys, k: int, eps: float, rows: int, gram: torch.Tensor | None = None) -> torch.Tensor:
    n = xs[0].shape[0]
    check_k(k, n, minimum=2)
    check_min_samples(n, 4, "unbiased CKNNA")
    mask = torch.empty(n, n, dtype=torch.bool, device=xs[0].device)
    # the Gram scratch buffer doubles as the value map (each layer's lists are taken from it first)
    value = gram if gram is not None else torch.empty(n, n, dtype=xs[0].dtype, device=xs[0].device)
    lx = [_CknnaLayer(x, k, rows, mask, value, gram) for x in xs]
    ly = lx if ys is None else [_CknnaLayer(y, k, rows, mask, value, gram) for y in ys]
    cross = []
    for a in lx:
        _fill_maps(a, mask, value)
        cross.append(_masked_hsic_against(a, ly, mask, value))
    self_x = torch.stack([a.self_sim for a in lx])
    self_y = torch.stack([b.self_sim for b in ly])
    for what, sims in (("xs", self_x), ("ys", self_y)):
        for layer, sim in enumerate(sims):
            check_positive(sim, f"the CKNNA self-similarity of {what} layer {layer}")
    return torch.stack(cross) / (torch.sqrt(self_x[:, None] * self_y[None, :]) + eps)


# -- kernel metrics (CKA) ----------------------------------------------------------------


class _CentredKernel:
    """Streams rows of the centred kernel of one layer: ``H K H`` (biased) or ``U(K)`` (unbiased)."""

    def __init__(self, x: torch.Tensor, kernel: str, unbiased: bool, sigma: float | None, rows: int):
        self.n = x.shape[0]
        self.kernel, self.unbiased = kernel, unbiased
        sq = torch.linalg.vector_norm(x, dim=1) ** 2
        self.scale = 1.0 if kernel == "rbf" else float(sq.max())  # >= |K_ij|, for the degeneracy check
        if kernel == "linear" and not unbiased:
            x = x - x.mean(dim=0, keepdim=True)  # then x x^T = H K H exactly
        self.x = x
        if kernel == "rbf":
            if sigma is not None and not float(sigma) > 0:
                raise ValueError(f"sigma must be a positive finite number, got {sigma}")
            self.sigma = median_distance(x) if sigma is None else torch.as_tensor(sigma, dtype=x.dtype)
            if float(self.sigma) <= 0:
                raise ValueError(
                    "the median pairwise distance is 0 (more than half the samples are identical), so the "
                    "median-heuristic RBF bandwidth is undefined; pass sigma= explicitly"
                )
            self.sq = sq
        self.left = self.right = x
        if kernel == "linear":
            self.row_sums = x @ x.sum(dim=0) - (sq if unbiased else 0.0)
            if unbiased:
                # U_ij = x_i.x_j - (r_i + r_j)/(n-2) + s/((n-1)(n-2)) (i != j) as ONE matmul of augmented
                # features [x_i, -r_i/(n-2), 1] . [x_j, 1, -r_j/(n-2) + s/((n-1)(n-2))]: no extra passes
                # over the n x n block, which are memory-bound and cost as much as the matmul itself.
                n, shift = self.n, -self.row_sums / (self.n - 2)
                const = self.row_sums.sum() / ((n - 1) * (n - 2))
                ones = torch.ones_like(shift)
                self.left = torch.cat([x, shift[:, None], ones[:, None]], dim=1)
                self.right = torch.cat([x, ones[:, None], (shift + const)[:, None]], dim=1)
        else:
            buf = torch.empty(min(rows, self.n), self.n, dtype=x.dtype, device=x.device)
            sums = []
            for s in range(0, self.n, rows):
                e = min(self.n, s + rows)
                sums.append(self._raw_into(s, e, buf[: e - s]).sum(dim=1))
            self.row_sums = torch.cat(sums)
        self.total = self.row_sums.sum()

    def _raw_into(self, s: int, e: int, out: torch.Tensor, c0: int = 0) -> torch.Tensor:
        """Block ``K[s:e, c0:]`` (linear unbiased: already ``U(K)``) written into ``out [e - s, n - c0]``;
        diagonal zeroed when unbiased. Needs ``c0 <= s``."""
        torch.matmul(self.left[s:e], self.right[c0:].T, out=out)
        rows = torch.arange(e - s, device=out.device)
        diag = (rows, rows + s - c0)
        if self.kernel == "rbf":  # exp(-(|x_i|^2 + |x_j|^2 - 2 x_i.x_j) / (2 sigma^2))
            out.mul_(-2.0).add_(self.sq[s:e, None]).add_(self.sq[None, c0:]).clamp_min_(0.0)
            out.mul_(-0.5 / float(self.sigma) ** 2).exp_()
            out[diag] = 1.0
        if self.unbiased:
            out[diag] = 0.0
        return out

    def centred_into(self, s: int, e: int, out: torch.Tensor, c0: int = 0) -> torch.Tensor:
        """Block ``C[s:e, c0:]`` of the centred kernel written into ``out [e - s, n - c0]``."""
        self._raw_into(s, e, out, c0)
        n, r = self.n, self.row_sums
        if self.unbiased and self.kernel == "rbf":  # U_ij = K~_ij - (r_i + r_j)/(n-2) + s/((n-1)(n-2))
            out.sub_(r[s:e, None] / (n - 2)).sub_(r[None, c0:] / (n - 2)).add_(self.total / ((n - 1) * (n - 2)))
            rows = torch.arange(e - s, device=out.device)
            out[rows, rows + s - c0] = 0.0
        elif self.kernel == "rbf":  # H K H (linear kernels were centred through their features)
            out.sub_(r[s:e, None] / n).sub_(r[None, c0:] / n).add_(self.total / n**2)
        return out


def _cka_matrix(xs, ys, kernel: str, unbiased: bool, sigma, eps: float, batch_size: int | None) -> torch.Tensor:
    n = xs[0].shape[0]
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    if unbiased:
        check_min_samples(n, 4, "unbiased CKA")
    layers = list(xs) + ([] if ys is None else list(ys))
    # Centred kernels are symmetric, so only the upper triangle is computed, in blocks of rows
    # s:e against columns s:n; about 8 blocks make that close to half the work of full Grams.
    rows = batch_size if batch_size is not None else min(_rows_per_block(n, len(layers), None), -(-n // 8))
    rows = _rows_per_block(n, len(layers), rows)
    kernels = [_CentredKernel(x, kernel, unbiased, sigma, rows) for x in layers]
    dtype, device = xs[0].dtype, xs[0].device
    buffer = torch.empty(len(kernels) * rows * n, dtype=dtype, device=device)
    inner = torch.zeros(len(kernels), len(kernels), dtype=torch.float64, device=device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        block = buffer[: len(kernels) * (e - s) * (n - s)].view(len(kernels), e - s, n - s)
        for out, k in zip(block, kernels):
            k.centred_into(s, e, out, c0=s)
        # <C_l, C_m> over rows s:e counts the square block C[s:e, s:e] once and C[s:e, e:] twice
        # (it stands for its mirror C[e:, s:e] too). One GEMM for all layers of both models (a
        # cross-only product of two slices is several times slower on CPU BLAS).
        whole = block.view(len(kernels), -1)
        square = block[:, :, : e - s].reshape(len(kernels), -1)
        inner += 2.0 * (whole @ whole.T).double() - (square @ square.T).double()
    self_sims = inner.diagonal()
    for layer, (value, k) in enumerate(zip(self_sims, kernels)):
        what = f"xs layer {layer}" if layer < len(xs) else f"ys layer {layer - len(xs)}"
        check_centred_signal(value, k.scale, n, dtype, what)
    cross = inner[: len(xs), len(xs) :] if ys is not None else inner
    self_y = self_sims[len(xs) :] if ys is not None else self_sims
    # hsic = <C_x, C_y> / c with c = 1 (biased) or n (n - 3) (unbiased); CKA is scale free
    # except for eps, which is added to the denominator in HSIC units as platonic-rep does.
    c = n * (n - 3) if unbiased else 1.0
    return (cross / c / (torch.sqrt(self_sims[: len(xs), None] * self_y[None, :]) / c + eps)).to(dtype)


# -- dispatch ----------------------------------------------------------------------------


def _check_kwargs(metric: str | Callable, fn: Callable, kwargs: dict) -> dict:
    """Bind ``kwargs`` to ``fn``'s signature (clear TypeError for a misspelled option); return them with defaults."""
    try:
        bound = inspect.signature(fn).bind(None, None, **kwargs)
    except TypeError as err:
        raise TypeError(f"bad options for metric {metric!r}: {err}") from None
    bound.apply_defaults()
    return dict(list(bound.arguments.items())[2:])


def _slow_matrix(xs, ys, fn: Callable, kwargs: dict) -> torch.Tensor:
    ys_ = xs if ys is None else ys
    return torch.stack([torch.stack([torch.as_tensor(fn(x, y, **kwargs)).reshape(()) for y in ys_]) for x in xs])


def alignment_matrix(
    xs: Layers,
    ys: Layers | None = None,
    metric: str | Callable[..., torch.Tensor] = "mutual_knn",
    normalize: bool = True,
    clip_quantile: float | None = None,
    batch_size: int | None = None,
    **metric_kwargs,
) -> torch.Tensor:
    """Score every layer pair: ``scores[i, j] = metric(xs[i], ys[j])``; returns ``[Lx, Ly]``.

    Args:
        xs, ys: a ``Representations``, a mapping name -> ``[n, d]`` or a list of ``[n, d]``
            (same ``n`` everywhere, row ``i`` = sample ``i``). ``ys=None``: ``xs`` against itself.
            Labels: :func:`layer_names`.
        metric: a name in ``prh_lightning.functional.METRICS`` or a callable ``f(a, b, **kw)``.
        normalize: L2-normalise each row first (the platonic-rep protocol).
        clip_quantile: if set (e.g. 0.95), first clamp each layer at
            ``t = mean_i quantile_q(|x_i|)`` (see :func:`clip_outliers`).
        batch_size: kernel rows streamed at once (default: blocks of ~256 MB).
        **metric_kwargs: options of the metric (``k=10``, ``kernel="rbf"``, ...).
    """
    fn = get_metric(metric)
    kwargs = _check_kwargs(metric, fn, metric_kwargs)
    lx = _as_list(xs, "xs")
    ly = None if ys is None else _as_list(ys, "ys")
    if ly is not None and ly[0].shape[0] != lx[0].shape[0]:
        raise ValueError(f"xs has {lx[0].shape[0]} samples but ys has {ly[0].shape[0]}; they must be paired")
    devices = {str(x.device) for x in lx + (ly or [])}
    if len(devices) > 1:
        raise ValueError(f"layers are on different devices {sorted(devices)}; move them all to the same device")
    px = prepare_layers(lx, normalize, clip_quantile, "xs")
    py = None if ly is None else prepare_layers(ly, normalize, clip_quantile, "ys")
    n = px[0].shape[0]
    rows = _rows_per_block(n, 1, batch_size)
    if metric in _KNN_SCORERS:
        return _knn_matrix(px, py, metric, kwargs["k"], rows, _gram_buffer(n, batch_size, px[0]))
    if metric in ("cka", "unbiased_cka"):
        unbiased = True if metric == "unbiased_cka" else kwargs["unbiased"]
        return _cka_matrix(px, py, kwargs["kernel"], unbiased, kwargs["sigma"], kwargs["eps"], batch_size)
    if metric == "cknna" and kwargs["unbiased"]:
        return _cknna_matrix(px, py, kwargs["k"], kwargs["eps"], rows, _gram_buffer(n, batch_size, px[0]))
    return _slow_matrix(px, py, fn, kwargs)


def best_alignment(
    xs: Layers,
    ys: Layers | None,
    metric: str | Callable[..., torch.Tensor] = "mutual_knn",
    **kwargs,
) -> tuple[float, tuple[int, int]]:
    """The best-aligned layer pair: ``(max_ij scores[i, j], (i, j))`` over all pairs.

    Same arguments as :func:`alignment_matrix`. Unlike platonic-rep (which starts from 0),
    this is a true maximum, so it also works when every score is negative. Ties: first in
    row-major order. With ``ys=None`` the trivial diagonal ``i == j`` is skipped.
    """
    scores = alignment_matrix(xs, ys, metric=metric, **kwargs)
    if ys is None:
        if scores.shape[0] < 2:
            raise ValueError("best_alignment(xs, None) needs at least 2 layers (the diagonal is skipped)")
        scores = scores.clone()
        scores.fill_diagonal_(float("-inf"))
    flat = int(torch.argmax(scores))
    i, j = divmod(flat, scores.shape[1])
    return float(scores[i, j]), (i, j)
