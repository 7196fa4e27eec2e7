"""Layer x layer alignment: ``alignment_matrix`` and ``best_alignment``.

Per-layer work (normalisation, Gram, centring, neighbour search) is done once per layer,
then every layer pair is scored from those prepared pieces in batches; kernels are streamed
in row chunks so memory stays ``O(L * batch_size * n)`` (a few hundred MB at ``n = 10,000``).
Only torch ops are used, so everything runs where the inputs live (CPU or GPU).

Fast paths: ``mutual_knn``, ``cycle_knn``, ``lcs_knn``, ``edit_distance_knn`` (neighbour lists),
``cka`` / ``unbiased_cka`` (linear or RBF; one matmul of flattened centred kernels) and
``cknna`` (unbiased; masked HSIC from neighbour lists). Other metrics (``svcca``, ``rsa``,
``cknna(unbiased=False)``, any callable) are computed pair by pair with the functional metric.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Union

import torch

from .functional import get_metric
from .functional._validation import check_features, check_k, check_min_samples, check_positive
from .functional.kernels import masked_hsic_from_neighbours, median_distance
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
        check_features(x, f"{what}[{name!r}]")
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


def _neighbours(x: torch.Tensor, k: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, k]`` neighbour indices of ``x`` (self excluded) and their inner products."""
    idx, val = [], []
    for s in range(0, x.shape[0], rows):
        gram = x[s : s + rows] @ x.T
        i = knn_from_gram(gram, k, row_offset=s)
        idx.append(i)
        val.append(torch.gather(gram, 1, i))
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


def _knn_matrix(xs, ys, metric: str, k: int, rows: int) -> torch.Tensor:
    n = xs[0].shape[0]
    check_k(k, n)
    idx_x = [_neighbours(x, k, rows)[0] for x in xs]
    idx_y = idx_x if ys is None else [_neighbours(y, k, rows)[0] for y in ys]
    scorer = _KNN_SCORERS[metric]
    cost = n * k * k * (16 if metric in ("lcs_knn", "edit_distance_knn") else 1)
    return _pairwise([(i,) for i in idx_x], [(i,) for i in idx_y], scorer, cost)


def _cknna_matrix(xs, ys, k: int, eps: float, rows: int) -> torch.Tensor:
    n = xs[0].shape[0]
    check_k(k, n, minimum=2)
    check_min_samples(n, 4, "unbiased CKNNA")
    nx = [_neighbours(x, k, rows) for x in xs]
    ny = nx if ys is None else [_neighbours(y, k, rows) for y in ys]
    self_x = torch.stack([masked_hsic_from_neighbours(i, v, i, v) for i, v in nx])
    self_y = self_x if ys is None else torch.stack([masked_hsic_from_neighbours(i, v, i, v) for i, v in ny])
    for what, sims in (("xs", self_x), ("ys", self_y)):
        for layer, value in enumerate(sims):
            check_positive(value, f"the CKNNA self-similarity of {what} layer {layer}")
    cross = _pairwise(nx, ny, masked_hsic_from_neighbours, 4 * n * k * k)
    return cross / (torch.sqrt(self_x[:, None] * self_y[None, :]) + eps)


# -- kernel metrics (CKA) ----------------------------------------------------------------


class _CentredKernel:
    """Streams rows of the centred kernel of one layer: ``H K H`` (biased) or ``U(K)`` (unbiased)."""

    def __init__(self, x: torch.Tensor, kernel: str, unbiased: bool, sigma: float | None, rows: int):
        self.n = x.shape[0]
        self.kernel, self.unbiased, self.rows = kernel, unbiased, rows
        if kernel == "linear" and not unbiased:
            x = x - x.mean(dim=0, keepdim=True)  # then x x^T = H K H exactly
        self.x = x
        if kernel == "rbf":
            self.sigma = median_distance(x) if sigma is None else torch.as_tensor(sigma, dtype=x.dtype)
            if float(self.sigma) <= 0:
                raise ValueError("RBF bandwidth is 0 (median pairwise distance is 0); pass sigma= explicitly")
            self.sq = (x * x).sum(dim=1)
        if kernel == "linear":
            diag = (x * x).sum(dim=1)
            self.row_sums = x @ x.sum(dim=0) - (diag if unbiased else 0.0)
        else:
            self.row_sums = torch.cat([self._raw(s, s + rows).sum(dim=1) for s in range(0, self.n, rows)])
        self.total = self.row_sums.sum()

    def _raw(self, s: int, e: int) -> torch.Tensor:
        """Rows ``s:e`` of ``K`` (diagonal zeroed when unbiased)."""
        block = self.x[s:e] @ self.x.T
        if self.kernel == "rbf":
            d2 = (self.sq[s:e, None] + self.sq[None, :] - 2.0 * block).clamp_min_(0.0)
            block = torch.exp(-d2 / (2.0 * self.sigma.to(block) ** 2))
            ar = torch.arange(e - s, device=block.device)
            block[ar, ar + s] = 1.0
        if self.unbiased:
            ar = torch.arange(e - s, device=block.device)
            block[ar, ar + s] = 0.0
        return block

    def centred_rows(self, s: int, e: int) -> torch.Tensor:
        block = self._raw(s, e)
        n, r = self.n, self.row_sums
        if self.unbiased:
            block = block - (r[s:e, None] + r[None, :]) / (n - 2) + self.total / ((n - 1) * (n - 2))
            ar = torch.arange(e - s, device=block.device)
            block[ar, ar + s] = 0.0
        elif self.kernel == "rbf":
            block = block - r[s:e, None] / n - r[None, :] / n + self.total / n**2
        return block


def _cka_matrix(xs, ys, kernel: str, unbiased: bool, sigma, eps: float, batch_size: int | None) -> torch.Tensor:
    n = xs[0].shape[0]
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    if unbiased:
        check_min_samples(n, 4, "unbiased CKA")
    rows = _rows_per_block(n, len(xs) + (0 if ys is None else len(ys)), batch_size)
    kx = [_CentredKernel(x, kernel, unbiased, sigma, rows) for x in xs]
    ky = kx if ys is None else [_CentredKernel(y, kernel, unbiased, sigma, rows) for y in ys]
    dtype = xs[0].dtype
    cross = torch.zeros(len(kx), len(ky), dtype=torch.float64, device=xs[0].device)
    self_x = torch.zeros(len(kx), dtype=torch.float64, device=xs[0].device)
    self_y = self_x if ys is None else torch.zeros(len(ky), dtype=torch.float64, device=xs[0].device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        bx = torch.stack([k.centred_rows(s, e).flatten() for k in kx])
        by = bx if ys is None else torch.stack([k.centred_rows(s, e).flatten() for k in ky])
        cross += (bx @ by.T).double()
        self_x += (bx * bx).sum(dim=1).double()
        if ys is not None:
            self_y += (by * by).sum(dim=1).double()
    for what, sims in (("xs", self_x), ("ys", self_y)):
        for layer, value in enumerate(sims):
            check_positive(value, f"HSIC of {what} layer {layer} with itself (constant features?)")
    # hsic = <C_x, C_y> / c with c = 1 (biased) or n (n - 3) (unbiased); CKA is scale free
    # except for eps, which is added to the denominator in HSIC units as platonic-rep does.
    c = n * (n - 3) if unbiased else 1.0
    return (cross / c / (torch.sqrt(self_x[:, None] * self_y[None, :]) / c + eps)).to(dtype)


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
    px = prepare_layers(xs, normalize, clip_quantile, "xs")
    py = None if ys is None else prepare_layers(ys, normalize, clip_quantile, "ys")
    if py is not None:
        if py[0].shape[0] != px[0].shape[0]:
            raise ValueError(f"xs has {px[0].shape[0]} samples but ys has {py[0].shape[0]}; they must be paired")
        if py[0].device != px[0].device:
            raise ValueError(f"xs is on {px[0].device} but ys is on {py[0].device}; move both to the same device")
    for layers in (px, py or []):
        for x in layers:
            if x.device != px[0].device:
                raise ValueError("all layers must be on the same device")
    n = px[0].shape[0]
    rows = _rows_per_block(n, 1, batch_size)
    if metric in _KNN_SCORERS:
        return _knn_matrix(px, py, metric, kwargs["k"], rows)
    if metric in ("cka", "unbiased_cka"):
        unbiased = True if metric == "unbiased_cka" else kwargs["unbiased"]
        return _cka_matrix(px, py, kwargs["kernel"], unbiased, kwargs["sigma"], kwargs["eps"], batch_size)
    if metric == "cknna" and kwargs["unbiased"]:
        return _cknna_matrix(px, py, kwargs["k"], kwargs["eps"], rows)
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
