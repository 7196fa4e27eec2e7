"""Analyses built from the functional core, used by the recipes and available to users.

- :mod:`.model_matrix`: model x model best-layer-pair matrix (:func:`best_layer_pair_matrix`).
- :mod:`.centroids`: class-centroid RSA with a Mantel test and a bootstrap (:func:`centroid_rsa`).
- :mod:`.dynamics`: run-to-run alignment over checkpoints (:func:`between_runs`, :func:`drift`).
- :mod:`.calibrated`: calibrated numbers for reports (:func:`calibration_fields`,
  :func:`calibrate_statistic`, :func:`above_chance_phrase`).
- :mod:`.claims`: the "holds / does not hold / cannot tell" rule and multiple-comparison
  corrections (:func:`verdict`, :func:`holm`, :func:`corrected_confidence`).
"""

from __future__ import annotations

from .calibrated import above_chance_phrase, calibrate_statistic, calibration_fields, draw_permutations
from .centroids import centroid_rsa, centroid_rsa_bootstrap, class_centroids, stratified_bootstrap
from .claims import CANNOT_TELL, DOES_NOT_HOLD, HOLDS, corrected_confidence, holm, verdict, verdict_from_p
from .dynamics import between_runs, calibrated_between_runs, drift, resampled_mutual_knn, step_difference_interval
from .model_matrix import BestLayerPairs, best_layer_pair_matrix, calibrated_best_layer_pairs

__all__ = [
    "BestLayerPairs",
    "best_layer_pair_matrix",
    "calibrated_best_layer_pairs",
    "above_chance_phrase",
    "calibrate_statistic",
    "calibration_fields",
    "draw_permutations",
    "centroid_rsa",
    "centroid_rsa_bootstrap",
    "class_centroids",
    "stratified_bootstrap",
    "between_runs",
    "calibrated_between_runs",
    "drift",
    "resampled_mutual_knn",
    "step_difference_interval",
    "HOLDS",
    "DOES_NOT_HOLD",
    "CANNOT_TELL",
    "verdict",
    "verdict_from_p",
    "holm",
    "corrected_confidence",
]
