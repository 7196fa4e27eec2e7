"""Delete-a-group jackknife intervals for alignment scores (and any statistic of paired rows).

The ``n`` samples are split into ``G`` random groups of (nearly) equal size; the statistic is
recomputed ``G`` times, each time without one group, giving ``theta_1 .. theta_G``. Then

    se^2 = (G - 1) / G * sum_g (theta_g - mean(theta))^2
    interval = estimate -+ t_{G-1, (1 + confidence) / 2} * se

This is a **normal-approximation** interval (Student t with ``G - 1`` degrees of freedom on the
jackknife standard error): it assumes the estimate is roughly normal and unbiased. It is
then clamped to the metric's range (``mutual_knn`` in ``[0, 1]``, ``rsa`` in ``[-1, 1]``, ...;
see :func:`metric_range`), so an interval never reports values the metric cannot take.

Why not the bootstrap: a bootstrap resample repeats samples, and a repeated sample is its own
nearest neighbour and doubles Gram entries, which inflates k-NN, CKNNA and CKA scores. Leaving
groups out never duplicates a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._validation import check_pair

__all__ = ["JackknifeResult", "jackknife_ci", "jackknife_groups", "jackknife_interval", "metric_range"]

def metric_range(metric: str | Callable[..., Any], **metric_kwargs: Any) -> tuple[float, float]:
    """``(low, high)``: the values ``metric`` can take, from the metric's registered plan
    (``-inf`` / ``inf`` for an open side, e.g. CKNNA); ``(-inf, inf)`` for a plain callable.

    >>> metric_range("cycle_knn")
    (0.0, 1.0)
    >>> metric_range("lcs_knn", k=5)
    (0.0, 5.0)
    """
    from ._plan import get_plan

    if not isinstance(metric, str):
        return (-np.inf, np.inf)
    low, high = get_plan(metric).bounds(**metric_kwargs)
    return (-np.inf if low is None else float(low), np.inf if high is None else float(high))


@dataclass(frozen=True)
class JackknifeResult:
    """Outcome of :func:`jackknife_ci`.

    Attributes:
        estimate: the statistic on all samples.
        low, high: the interval, clamped to ``bounds``.
        se: the jackknife standard error.
        replicates: ``[G]`` float64 statistics, each without one group.
        confidence: the two-sided coverage asked for.
        bounds: the range the interval was clamped to.
    """

    estimate: float
    low: float
    high: float
    se: float
    replicates: torch.Tensor
    confidence: float
    bounds: tuple[float, float]


def jackknife_groups(n: int, n_groups: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_groups`` disjoint random index sets covering ``range(n)``, sizes differing by at most 1.

    >>> [len(g) for g in jackknife_groups(10, 3)]
    [4, 3, 3]
    """
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or not 2 <= n_groups <= n:
        raise ValueError(f"n_groups must be an int in [2, n = {n}], got {n_groups!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return list(torch.tensor_split(order, n_groups))


def jackknife_interval(
    estimate: Any, replicates: Any, confidence: float = 0.95, bounds: tuple[float, float] = (-np.inf, np.inf)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(low, high, se)`` from an estimate ``[...]`` and its leave-one-group-out replicates ``[G, ...]``.

    NaN replicates are ignored (a statistic undefined on some subsets); the interval is the
    t-based normal approximation of the module doc, clamped to ``bounds``.

    >>> low, high, se = jackknife_interval(0.5, [0.4, 0.5, 0.6])
    >>> round(float(se), 4), round(float(low), 3), round(float(high), 3)
    (0.1155, 0.003, 0.997)
    >>> low, high, _ = jackknife_interval(0.9, [0.7, 0.9, 1.0], bounds=(0.0, 1.0))
    >>> float(high)  # clamped to the range
    1.0
    """
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    theta = np.asarray(replicates, dtype=float)
    g = theta.shape[0]
    if g < 2:
        raise ValueError(f"need at least 2 jackknife replicates, got {g}")
    with np.errstate(invalid="ignore"):
        centred = theta - np.nanmean(theta, axis=0)
        se = np.sqrt((g - 1) / g * np.nansum(centred**2, axis=0))
    half = stats.t.ppf((1 + confidence) / 2, g - 1) * se
    point = np.asarray(estimate, dtype=float)
    low, high = bounds
    return np.clip(point - half, low, high), np.clip(point + half, low, high), se


def jackknife_ci(
    a: torch.Tensor,
    b: torch.Tensor,
    metric: str | Callable[..., torch.Tensor] = "mutual_knn",
    n_groups: int = 20,
    confidence: float = 0.95,
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
    **metric_kwargs: Any,
) -> JackknifeResult:
    """Delete-a-group jackknife interval of ``metric(a, b)`` for paired features ``a [n, d_a]``,
    ``b [n, d_b]`` (normal approximation, clamped to the metric's range; see the module doc).

    Args:
        metric: a name in ``prh_lightning.functional.METRICS`` or a callable ``f(a, b, **kw)``.
        n_groups: ``G``, the number of groups left out in turn (``G = n``: delete-one jackknife).
        confidence: two-sided coverage of the interval.
        seed: seeds the random split into groups.
        bounds: the range to clamp to (default :func:`metric_range` of ``metric``).

    >>> a = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    >>> b = a + 0.3 * torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    >>> r = jackknife_ci(a, b, "cycle_knn", n_groups=8, k=3)
    >>> 0.0 <= r.low <= r.estimate <= r.high <= 1.0  # never past the metric's maximum
    True
    """
    from . import get_metric

    check_pair(a, b)
    fn = get_metric(metric)
    n = a.shape[0]
    groups = jackknife_groups(n, n_groups, seed)
    keep_all = torch.ones(n, dtype=torch.bool)
    replicates = []
    for group in groups:
        keep = keep_all.clone()
        keep[group] = False
        rows = keep.nonzero().flatten().to(a.device)
        replicates.append(float(fn(a[rows], b[rows], **metric_kwargs)))
    estimate = float(fn(a, b, **metric_kwargs))
    bounds = metric_range(metric, **metric_kwargs) if bounds is None else bounds
    low, high, se = jackknife_interval(estimate, replicates, confidence, bounds)
    return JackknifeResult(estimate, float(low), float(high), float(se),
                           torch.tensor(replicates, dtype=torch.float64), confidence, bounds)
