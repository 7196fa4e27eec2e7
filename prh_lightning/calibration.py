"""Calibrated alignment (Gröger, Wen & Brbić, ICML 2026, algorithms 1 and 2): every score next
to its permutation null.

Permute the rows of every layer of ``ys`` with the same permutation, ``K`` times, and rescore
from the metric plan's prepared per-layer states (permuted, not recomputed). For each cell and
for the aggregate (max or mean over the ``[Lx, Ly]`` matrix, computed on each permuted matrix,
so the null of a best-of-layers score carries the same selection as the observed one):

* ``tau`` = the ``ceil((1 - alpha)(K + 1))``-th smallest of ``{observed} ∪ null``;
* ``p = (1 + #{null >= observed}) / (K + 1)``;
* ``calibrated = clamp((observed - tau) / (high - tau), 0, 1)`` with ``high`` the metric's upper
  bound, or ``max(observed - tau, 0)`` for a metric without one;
* the null mean (the chance level) and ``z = (observed - mean) / std``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .alignment import Layers, _resolve_metric, as_layer_list
from .functional._plan import LayerContext, check_layers, get_plan, permuted_scores, prepare_layers

__all__ = ["Calibrated", "CalibratedScore", "calibrate"]


@dataclass(frozen=True)
class CalibratedScore:
    """One calibrated number: ``raw``, ``null_mean``, ``tau``, ``p_value``, ``calibrated``, ``z_score``."""

    raw: float
    null_mean: float
    tau: float
    p_value: float
    calibrated: float
    z_score: float


@dataclass(frozen=True)
class Calibrated:
    """Per-cell ``[Lx, Ly]`` float64 tensors, the ``[K, Lx, Ly]`` null, and the aggregate (or None)."""

    raw: torch.Tensor
    null_mean: torch.Tensor
    tau: torch.Tensor
    p_value: torch.Tensor
    calibrated: torch.Tensor
    z_score: torch.Tensor
    null: torch.Tensor
    aggregate: CalibratedScore | None
    high: float | None


def _calibrate(observed: torch.Tensor, null: torch.Tensor, alpha: float, high: float | None):
    """Elementwise over the trailing dims: ``observed [...]``, ``null [K, ...]``."""
    K = null.shape[0]
    pooled = torch.cat([observed.unsqueeze(0), null])
    rank = math.ceil((1 - alpha) * (K + 1))
    tau = torch.sort(pooled, dim=0).values[rank - 1]
    p = (1 + (null >= observed.unsqueeze(0)).sum(dim=0)).double() / (K + 1)
    if high is None or not math.isfinite(high):
        calibrated = (observed - tau).clamp_min(0.0)
    else:
        calibrated = ((observed - tau) / (high - tau)).clamp(0.0, 1.0)
        calibrated = torch.where(tau >= high, torch.zeros_like(calibrated), calibrated)
    mean = null.mean(dim=0)
    std = null.std(dim=0) if K > 1 else torch.zeros_like(mean)
    z = torch.where(std > 0, (observed - mean) / std.where(std > 0, 1.0), torch.zeros_like(mean))
    return mean, tau, p, calibrated, z


def calibrate(
    xs: Layers,
    ys: Layers,
    metric: str = "mutual_knn",
    *,
    n_permutations: int = 200,
    permutations: torch.Tensor | None = None,
    alpha: float = 0.05,
    aggregate: str | None = "max",
    generator: torch.Generator | None = None,
    normalize: bool = True,
    clip_quantile: float | None = None,
    max_memory: int | str | None = None,
    **metric_kwargs,
) -> Calibrated:
    """Raw, chance level, threshold, p-value and calibrated score of every layer pair and of their
    aggregate. ``xs``, ``ys`` as in :func:`prh_lightning.alignment_matrix`.

    Args:
        n_permutations: ``K`` (ignored when ``permutations`` is given).
        permutations: explicit ``LongTensor[K, n]``; permutation ``k`` reorders the rows of
            every layer of ``ys`` (for comparing with other implementations permutation by
            permutation).
        alpha: the null quantile that defines ``tau``.
        aggregate: ``"max"`` (best layer pair), ``"mean"`` or ``None``.
        generator: a ``torch.Generator`` for the permutations (reproducible).
        max_memory: a budget (bytes, or ``"512MB"``, ``"4GB"``, ``"2GiB"``) for the working
            memory of the layers' preparation (as in :func:`prh_lightning.alignment_matrix`) and
            of the permutation null's tables and batches (CKA: default 1 GiB; k-NN metrics and
            CKNNA: fixed caps of about 256 MB without a budget).

    >>> g = torch.Generator().manual_seed(0)
    >>> a = torch.randn(60, 6, generator=g)
    >>> out = calibrate([a], [a + 0.1 * torch.randn(60, 6, generator=g)], "cka", n_permutations=19, generator=g)
    >>> out.aggregate.p_value, out.aggregate.calibrated > 0.5
    (0.05, True)
    """
    if aggregate not in ("max", "mean", None):
        raise ValueError(f"aggregate must be 'max', 'mean' or None, got {aggregate!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    name = _resolve_metric(metric)
    plan = get_plan(name)
    options = plan.bind(metric_kwargs)
    names_x, lx = as_layer_list(xs, "xs")
    names_y, ly = as_layer_list(ys, "ys")
    n, dtype, device = check_layers(lx, ly, names_x, names_y)
    if permutations is None:
        if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
            raise ValueError(f"n_permutations must be a positive int, got {n_permutations!r}")
        permutations = torch.stack([torch.randperm(n, generator=generator) for _ in range(n_permutations)])
    permutations = torch.as_tensor(permutations)
    if permutations.ndim != 2 or permutations.shape[1] != n or permutations.dtype != torch.long:
        raise ValueError(f"permutations must be a LongTensor [K, n={n}], got {permutations.dtype} {tuple(permutations.shape)}")
    if not bool((torch.sort(permutations, dim=1).values == torch.arange(n)).all()):
        raise ValueError("every row of permutations must be a permutation of 0..n-1")
    permutations = permutations.to(device)
    ctx = LayerContext(dtype, None, n, len(lx) + len(ly), device, max_memory)
    sx = prepare_layers(plan, lx, names_x, options, normalize, clip_quantile, ctx)
    sy = prepare_layers(plan, ly, names_y, options, normalize, clip_quantile, ctx)
    if plan.null is not None:
        # a batched null scores the identity alongside the permutations: that is the observed
        # matrix (the same formula as alignment_matrix, summed in another order) at the cost of
        # one more permutation instead of a separate pass over every pair
        identity = torch.arange(n, device=device)[None]
        scores = permuted_scores(plan, sx, sy, torch.cat([identity, permutations]), options).cpu()
        observed, null = scores[0], scores[1:]  # [Lx, Ly], [K, Lx, Ly]
    else:
        observed = plan.pairs(sx, sy, **options).double().cpu()
        null = permuted_scores(plan, sx, sy, permutations, options).cpu()
    high = plan.bounds(**options)[1]
    mean, tau, p, cal, z = _calibrate(observed, null, alpha, high)
    agg = None
    if aggregate is not None:
        reduce = (lambda m: m.flatten(-2).max(dim=-1).values) if aggregate == "max" else (lambda m: m.flatten(-2).mean(dim=-1))
        a_mean, a_tau, a_p, a_cal, a_z = _calibrate(reduce(observed), reduce(null), alpha, high)
        agg = CalibratedScore(
            raw=float(reduce(observed)),
            null_mean=float(a_mean),
            tau=float(a_tau),
            p_value=float(a_p),
            calibrated=float(a_cal),
            z_score=float(a_z),
        )
    return Calibrated(observed, mean, tau, p, cal, z, null, agg, high)
