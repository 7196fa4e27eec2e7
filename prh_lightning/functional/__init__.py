"""Functional core: pure torch alignment metrics on paired features ``a [n, d_a]``, ``b [n, d_b]``.

Row ``i`` of ``a`` and ``b`` is the same sample. Every metric returns a 0-dim tensor and is
registered in :data:`METRICS` (name -> ``f(a, b, **kwargs)``). Features are taken as given:
L2-normalise rows yourself, or use :func:`prh_lightning.alignment_matrix` (``normalize=True``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cca import canonical_correlations, svcca, top_singular_directions
from .kernels import (
    center_gram,
    cka,
    cknna,
    hsic,
    linear_kernel,
    masked_hsic_from_neighbours,
    median_distance,
    rbf_kernel,
    u_center,
    unbiased_cka,
)
from .knn import (
    cycle_knn,
    cycle_knn_from_indices,
    edit_distance_knn,
    edit_distance_knn_from_indices,
    edit_distances,
    knn_from_gram,
    knn_indices,
    lcs_knn,
    lcs_knn_from_indices,
    lcs_lengths,
    mutual_knn,
    mutual_knn_from_indices,
)
from .rsa import condensed, rankdata, rdm, rsa
from .uncertainty import PermutationResult, bootstrap_ci, permutation_test

Metric = Callable[..., torch.Tensor]

METRICS: dict[str, Metric] = {
    "mutual_knn": mutual_knn,
    "cycle_knn": cycle_knn,
    "lcs_knn": lcs_knn,
    "edit_distance_knn": edit_distance_knn,
    "cka": cka,
    "unbiased_cka": unbiased_cka,
    "cknna": cknna,
    "svcca": svcca,
    "rsa": rsa,
}


def get_metric(metric: str | Metric) -> Metric:
    """The metric function for a name in :data:`METRICS`, or ``metric`` itself if callable."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a callable f(a, b)")
    return METRICS[metric]


__all__ = [
    "METRICS",
    "Metric",
    "get_metric",
    "PermutationResult",
    "bootstrap_ci",
    "permutation_test",
    "canonical_correlations",
    "center_gram",
    "cka",
    "cknna",
    "condensed",
    "cycle_knn",
    "cycle_knn_from_indices",
    "edit_distance_knn",
    "edit_distance_knn_from_indices",
    "edit_distances",
    "hsic",
    "knn_from_gram",
    "knn_indices",
    "lcs_knn",
    "lcs_knn_from_indices",
    "lcs_lengths",
    "linear_kernel",
    "masked_hsic_from_neighbours",
    "median_distance",
    "mutual_knn",
    "mutual_knn_from_indices",
    "rankdata",
    "rbf_kernel",
    "rdm",
    "rsa",
    "svcca",
    "top_singular_directions",
    "u_center",
    "unbiased_cka",
]
