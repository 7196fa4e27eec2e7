"""Building blocks of the metrics, for users who compose their own: kernels, centring, HSIC,
neighbour search on features as given, neighbour-list scorers, RDMs and ranks.

The metrics themselves (:mod:`prh_lightning.functional`) condition their inputs first
(float64 normalisation and centring, exact rescaling); these functions take tensors as given.
"""

from __future__ import annotations

from .cca import canonical_correlations, top_singular_directions
from .kernels import center_gram, hsic, linear_kernel, median_distance, rbf_kernel, u_center
from .knn import (
    cycle_knn_from_indices,
    edit_distance_knn_from_indices,
    edit_distances,
    knn_from_gram,
    knn_indices,
    lcs_knn_from_indices,
    lcs_lengths,
    mutual_knn_from_indices,
)
from .rsa import condensed, rankdata, rdm

__all__ = [
    "canonical_correlations",
    "center_gram",
    "condensed",
    "cycle_knn_from_indices",
    "edit_distance_knn_from_indices",
    "edit_distances",
    "hsic",
    "knn_from_gram",
    "knn_indices",
    "lcs_knn_from_indices",
    "lcs_lengths",
    "linear_kernel",
    "median_distance",
    "mutual_knn_from_indices",
    "rankdata",
    "rbf_kernel",
    "rdm",
    "top_singular_directions",
    "u_center",
]
