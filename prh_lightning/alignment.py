"""Layer x layer alignment: ``alignment_matrix`` and ``best_alignment``.

Thin over the metric plans of :mod:`prh_lightning.functional`: each layer is conditioned and
prepared once (neighbour lists, centred kernel rows, RDM, SVD basis), then every layer pair
is scored in batches by the plan (one GEMM per kernel row block for CKA, one matrix product
for RSA, batched small SVDs for SVCCA, neighbour-list lookups for the k-NN metrics and
CKNNA). The functional metrics run through exactly the same code, so a cell of the matrix
equals the functional score of that pair. Only torch ops are used: everything runs where the
inputs live (CPU or GPU).

Memory: no metric but RSA and SVCCA forms an ``[n, n]`` matrix beyond what the budget allows
(the RBF median bandwidth is selected from streamed distance blocks). Kernels and Grams are streamed in row blocks (by default
about 256 MB; neighbour search keeps one reusable ``[n, n]`` Gram buffer up to 512 MB, i.e.
``n <= 11,585``); ``max_memory="4GB"`` sizes every block from a budget instead. Linear CKA at
large ``n`` is scored from ``d x d`` cross-covariances (the same value; memory: the ``(Σd)^2``
statistics plus one centred copy of each layer, the size of the inputs, and no ``n x n`` block).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch

from .functional import get_plan
from .functional._numerics import clip_outliers
from .functional._linear_cka import feature_space_plan, prefer_feature_space
from .functional._plan import LayerContext, MetricPlan, check_layers, plan_from_function, prepare_layers, score_layers

__all__ = ["alignment_matrix", "approximate_alignment_matrix", "ApproximateAlignment", "best_alignment", "layer_names", "clip_outliers"]

Layers = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]


def layer_names(xs: Layers) -> list[str]:
    """Row/column labels of :func:`alignment_matrix`: mapping keys, or ``"0", "1", ...`` for lists.

    >>> layer_names({"conv": torch.zeros(2, 1), "fc": torch.zeros(2, 1)})
    ['conv', 'fc']
    """
    if isinstance(xs, Mapping):
        return [str(name) for name in xs]
    return [str(i) for i in range(len(xs))]


def as_layer_list(xs: Layers, what: str) -> tuple[list[str], list[torch.Tensor]]:
    """``(names, tensors)`` of a ``Representations``, a mapping name -> ``[n, d]`` or a list."""
    if isinstance(xs, torch.Tensor):
        raise TypeError(
            f"{what} must be a Representations, a mapping name -> [n, d] tensor or a list of [n, d] tensors, "
            f"got a single tensor of shape {tuple(xs.shape)}; wrap it in a list"
        )
    if isinstance(xs, Mapping):
        items = [(str(k), v) for k, v in xs.items()]
    elif isinstance(xs, Sequence) and not isinstance(xs, (str, bytes)):
        items = [(str(i), x) for i, x in enumerate(xs)]
    else:
        raise TypeError(f"{what} must be a Representations, a mapping or a list of tensors, got {type(xs).__name__}")
    if not items:
        raise ValueError(f"{what} holds no layers")
    return [f"{what}[{name!r}]" for name, _ in items], [x for _, x in items]


def _resolve_metric(metric: str | Callable[..., torch.Tensor]) -> str | MetricPlan:
    """A registered name (checked), or a one-off pair-by-pair plan for an unregistered callable."""
    if isinstance(metric, str):
        get_plan(metric)
        return metric
    if callable(metric):
        name = getattr(metric, "__qualname__", None) or type(metric).__name__
        return plan_from_function(name, metric, bounds=(float("-inf"), None))
    raise TypeError(f"metric must be a registered name or a callable f(a, b, **kw), got {type(metric).__name__}")


def alignment_matrix(
    xs: Layers,
    ys: Layers | None = None,
    metric: str | Callable[..., torch.Tensor] = "mutual_knn",
    normalize: bool = True,
    clip_quantile: float | None = None,
    block_rows: int | None = None,
    max_memory: int | str | None = None,
    **metric_kwargs,
) -> torch.Tensor:
    """Score every layer pair: ``scores[i, j] = metric(xs[i], ys[j])``; returns ``[Lx, Ly]``.

    Args:
        xs, ys: a ``Representations``, a mapping name -> ``[n, d]`` or a list of ``[n, d]``
            (same ``n`` everywhere, row ``i`` = sample ``i``). ``ys=None``: ``xs`` against itself.
            Labels: :func:`layer_names`.
        metric: a name in ``prh_lightning.functional.PLANS`` (built-in or registered with
            ``register_metric``) or a callable ``f(a, b, **kw)`` (scored pair by pair).
        normalize: L2-normalise each row first (the PRH protocol; the default in every entry point).
        clip_quantile: if set (e.g. 0.95), first clamp each layer at
            ``t = mean_i quantile_q(|x_i|)`` (see :func:`clip_outliers`).
        block_rows: kernel / Gram rows streamed at once (default: blocks of ~256 MB, and a
            whole Gram for neighbour search up to 512 MB). Not a data batch size.
        max_memory: a budget (bytes, or ``"512MB"``, ``"4GB"``, ``"2GiB"``) for the working
            memory that grows faster than ``n * d``: it sets the streamed block sizes and
            whether a whole ``[n, n]`` Gram may be kept, so the k-NN metrics, CKNNA and linear
            CKA run at ``n = 100,000`` and beyond without an ``n x n`` matrix. Per-layer
            ``[n, d]`` copies (float64 while a layer is prepared) come on top; RSA and SVCCA still
            need ``[n, n]`` memory.
        **metric_kwargs: options of the metric (``k=10``, ``kernel="rbf"``, ...; for the k-NN
            metrics ``knn_backend="faiss"`` uses approximate neighbour lists: see
            :func:`approximate_alignment_matrix` for their recall).

    Returns float32 scores (float64 if any input is float64); each cell equals the functional
    metric of that pair.

    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.randn(64, 8, generator=g)
    >>> alignment_matrix({"a": a, "2a": 2 * a}, {"a": a}, metric="cka")
    tensor([[1.],
            [1.]])
    """
    if "batch_size" in metric_kwargs:
        warnings.warn(
            "alignment_matrix(batch_size=...) is now called block_rows= (rows of a kernel block, not a data "
            "batch); batch_size will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        block_rows = metric_kwargs.pop("batch_size")
    name = _resolve_metric(metric)
    names_x, lx = as_layer_list(xs, "xs")
    names_y, ly = (None, None) if ys is None else as_layer_list(ys, "ys")
    plan = _large_n_plan(name, lx, ly, metric_kwargs)
    scores = score_layers(
        plan, lx, ly, normalize, clip_quantile, block_rows, names_x, names_y, max_memory=max_memory, **metric_kwargs
    )
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in lx + (ly or [])) else torch.float32
    return scores.to(dtype)


_FEATURE_SPACE_MIN_N = 4096  # below this the kernel path is fast and its numbers stay as they were


def _large_n_plan(name: str | MetricPlan, lx: list[torch.Tensor], ly: list[torch.Tensor] | None, metric_kwargs) -> str | MetricPlan:
    """Linear CKA at large ``n`` from feature-space statistics when that is cheaper than
    streaming ``n x n`` kernels (same value within rounding); otherwise the registered plan."""
    if name not in ("cka", "unbiased_cka"):
        return name
    plan = get_plan(name)
    options = plan.bind(metric_kwargs)
    if any(not isinstance(x, torch.Tensor) or x.ndim != 2 for x in lx + (ly or [])):
        return name  # score_layers gives the clear error
    n = lx[0].shape[0]
    if options["kernel"] != "linear" or n < _FEATURE_SPACE_MIN_N:
        return name
    dims_x = [x.shape[1] for x in lx]
    dims_y = dims_x if ly is None else [y.shape[1] for y in ly]
    return feature_space_plan(plan) if prefer_feature_space(n, dims_x, dims_y) else name


@dataclass(frozen=True)
class ApproximateAlignment:
    """Scores from approximate neighbour lists, with the lists' measured recall.

    ``scores [Lx, Ly]`` (float64); ``recall_x [Lx]``, ``recall_y [Ly]``: per layer, the mean
    fraction of the exact top-``k`` found, over a random subsample of 1,000 rows.
    """

    scores: torch.Tensor
    recall_x: torch.Tensor
    recall_y: torch.Tensor


def approximate_alignment_matrix(
    xs: Layers,
    ys: Layers,
    metric: str = "mutual_knn",
    knn_backend: str = "faiss",
    normalize: bool = True,
    clip_quantile: float | None = None,
    **metric_kwargs,
) -> ApproximateAlignment:
    """A k-NN metric (``mutual_knn``, ``cycle_knn``, ``lcs_knn``, ``edit_distance_knn``) for every
    layer pair from approximate neighbour lists (``knn_backend="faiss"``: HNSW graph search, for
    ``n`` of 100k and more; ``"faiss_ivf"``: IVF-Flat cells, for clustered features;
    ``pip install faiss-cpu``), with each layer's recall against exact
    search on a subsample reported beside the scores. ``alignment_matrix(..., knn_backend="faiss")``
    gives the same scores without the recall.

    ``faiss_options`` (in ``metric_kwargs``) sets the index: ``{"m": 32, "ef_search": None}`` for
    HNSW (graph degree; search breadth, ``None``: the smallest doubling from 128 whose lists
    reach recall 0.95 on 500 sampled rows), ``{"nlist": None, "nprobe": None}`` for IVF-Flat
    (cells, default ``4 sqrt(n)``; cells scanned per query, tuned the same way).
    """
    name = _resolve_metric(metric)
    plan = get_plan(name)
    if "knn_backend" not in plan.defaults:
        raise ValueError(f"metric {name!r} does not use neighbour lists; knn_backend applies to the k-NN metrics")
    options = plan.bind({**metric_kwargs, "knn_backend": knn_backend})
    names_x, lx = as_layer_list(xs, "xs")
    names_y, ly = as_layer_list(ys, "ys")
    n, dtype, device = check_layers(lx, ly, names_x, names_y)
    ctx = LayerContext(dtype, None, n, len(lx) + len(ly), device)
    sx = prepare_layers(plan, lx, names_x, options, normalize, clip_quantile, ctx)
    sy = prepare_layers(plan, ly, names_y, options, normalize, clip_quantile, ctx)
    recall = lambda states: torch.tensor([float("nan") if s.recall is None else s.recall for s in states], dtype=torch.float64)  # noqa: E731
    return ApproximateAlignment(plan.pairs(sx, sy, **options).double().cpu(), recall(sx), recall(sy))


def best_alignment(
    xs: Layers,
    ys: Layers | None,
    metric: str | Callable[..., torch.Tensor] = "mutual_knn",
    **kwargs,
) -> tuple[float, tuple[int, int]]:
    """The best-aligned layer pair: ``(max_ij scores[i, j], (i, j))`` over all pairs.

    Same arguments as :func:`alignment_matrix`. Unlike platonic-rep (which starts from 0),
    this is a true maximum, so it also works when every score is negative. Ties: first in
    row-major order. With ``ys=None`` the trivial diagonal ``i == j`` is skipped. For a score
    with its chance level and p-value, use :func:`prh_lightning.calibrate` (``aggregate="max"``).

    >>> a = torch.randn(32, 4)
    >>> best_alignment([a, torch.randn(32, 4)], [a], metric="cka")[1]
    (0, 0)
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
