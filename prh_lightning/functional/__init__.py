"""Functional core: alignment metrics on paired features ``a [n, d_a]``, ``b [n, d_b]``.

Row ``i`` of ``a`` and ``b`` is the same sample. Every metric returns a 0-dim tensor (float64
for float64 input, else float32), is defined once as a plan (:class:`MetricPlan`: per-layer
work, pair scoring, range, resampling policy) and registered in :data:`PLANS` /
:data:`METRICS`; ``alignment_matrix``, the Metric classes, the nulls and the callbacks all
run through the same plan, so the same data gives the same number from every entry point.

``normalize=True`` (L2-normalise each row first, the PRH paper's protocol) is the default in
every entry point. Inputs are detached (no autograd graph is kept); fp16 / bf16 compute in
float32; a float32 / float64 mix computes in float64.

Building blocks (kernels, HSIC, neighbour search as given, RDMs) live in
:mod:`prh_lightning.functional.utils`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._plan import PLANS, MetricPlan, get_plan, register_metric
from ._ties import AmbiguousNeighbours
from .cca import svcca
from .cknna import cknna
from .jackknife import jackknife_ci
from .kernels import cka, unbiased_cka
from .knn import cycle_knn, edit_distance_knn, lcs_knn, mutual_knn
from .rsa import rsa
from .uncertainty import PermutationResult, bootstrap_ci, permutation_test

# building blocks, importable from here for existing code; documented in .utils
from .utils import *  # noqa: F401,F403
from .utils import __all__ as _utils_all

Metric = Callable[..., torch.Tensor]


class _Metrics(dict):
    """name -> functional metric ``f(a, b, **options) -> 0-dim``; follows :data:`PLANS`."""

    def __missing__(self, name: str) -> Metric:
        plan = get_plan(name)
        return lambda a, b, normalize=True, clip_quantile=None, **kw: _score(plan, a, b, normalize, clip_quantile, kw)


def _score(plan, a, b, normalize, clip_quantile, kw):
    from ._plan import score_pair

    return score_pair(plan.name, a, b, normalize, clip_quantile, **kw)


METRICS: dict[str, Metric] = _Metrics(
    mutual_knn=mutual_knn,
    cycle_knn=cycle_knn,
    lcs_knn=lcs_knn,
    edit_distance_knn=edit_distance_knn,
    cka=cka,
    unbiased_cka=unbiased_cka,
    cknna=cknna,
    svcca=svcca,
    rsa=rsa,
)


def get_metric(metric: str | Metric) -> Metric:
    """The functional metric for a registered name, or ``metric`` itself if callable."""
    if callable(metric):
        return metric
    if metric in METRICS:
        return METRICS[metric]
    get_plan(metric)  # raises the clear "unknown metric" error
    return METRICS[metric]


def metric_bounds(metric: str, **options) -> tuple[float, float | None]:
    """The range ``(low, high)`` of a registered metric with these options (e.g. ``lcs_knn``: ``(0, k)``).

    >>> metric_bounds("lcs_knn", k=5)
    (0.0, 5.0)
    """
    plan = get_plan(metric)
    return plan.bounds(**plan.bind(options))


__all__ = [
    "AmbiguousNeighbours",
    "METRICS",
    "PLANS",
    "Metric",
    "MetricPlan",
    "PermutationResult",
    "bootstrap_ci",
    "cka",
    "cknna",
    "cycle_knn",
    "edit_distance_knn",
    "get_metric",
    "get_plan",
    "jackknife_ci",
    "lcs_knn",
    "metric_bounds",
    "mutual_knn",
    "permutation_test",
    "register_metric",
    "rsa",
    "svcca",
    "unbiased_cka",
]
