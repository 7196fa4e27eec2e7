"""Model x model alignment: for every pair of models, the best score over their layer pairs
(the Platonic Representation Hypothesis protocol), with the best layer pair named.

Every layer of every model is scored in one :func:`prh_lightning.alignment_matrix` call
(per-layer work done once), then each model-pair block of the layer x layer matrix is maximised.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["BestLayerPairs", "best_layer_pair_matrix", "calibrated_best_layer_pairs"]


@dataclass
class BestLayerPairs:
    """Outcome of :func:`best_layer_pair_matrix` for row models ``R`` and column models ``C``.

    Attributes:
        scores: ``[R, C]`` best score of each model pair.
        indices: ``[R, C, 2]`` (row layer index, column layer index) of that best pair.
        full: ``[sum of row layers, sum of column layers]`` scores of every layer pair.
        rows, cols: model names; ``row_layers`` / ``col_layers``: each model's layer names.
    """

    scores: np.ndarray
    indices: np.ndarray
    full: torch.Tensor
    rows: list[str]
    cols: list[str]
    row_layers: dict[str, list[str]]
    col_layers: dict[str, list[str]]

    def best_layers(self, row: str, col: str) -> tuple[str, str]:
        """Names of the best layer pair of models ``row`` and ``col``."""
        i, j = self.indices[self.rows.index(row), self.cols.index(col)]
        return self.row_layers[row][int(i)], self.col_layers[col][int(j)]


def _layers(model: Any) -> tuple[list[str], list[torch.Tensor]]:
    """``(names, tensors)`` of a ``Representations``, a mapping name -> ``[n, d]`` or a list."""
    if isinstance(model, Mapping) or hasattr(model, "items"):
        items = list(model.items())
        return [str(k) for k, _ in items], [v for _, v in items]
    tensors = list(model)
    return [str(i) for i in range(len(tensors))], tensors


def best_layer_pair_matrix(
    row_models: Mapping[str, Any],
    col_models: Mapping[str, Any],
    metric: str = "mutual_knn",
    normalize: bool = True,
    clip_quantile: float | None = None,
    permutation: torch.Tensor | None = None,
    **metric_kwargs: Any,
) -> BestLayerPairs:
    """Best alignment over layer pairs for every (row model, column model) pair.

    Args:
        row_models, col_models: model name -> its layers (a ``Representations``, a mapping
            layer -> ``[n, d]`` or a list of ``[n, d]``); every layer of every model holds the
            same ``n`` paired samples.
        metric, normalize, clip_quantile, **metric_kwargs: as in
            :func:`prh_lightning.alignment_matrix`.
        permutation: ``[n]`` reorders the row models' samples (the shuffled-pairing control).

    Ties: the first layer pair in row-major order.

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(30, 5, generator=g)
    >>> rows = {"m": {"l0": torch.randn(30, 5, generator=g), "l1": x}}
    >>> cols = {"v": {"a": x.clone()}}
    >>> res = best_layer_pair_matrix(rows, cols, metric="mutual_knn", k=3)
    >>> float(res.scores[0, 0]), res.best_layers("m", "v")
    (1.0, ('l1', 'a'))
    """
    from prh_lightning.alignment import alignment_matrix

    if not row_models or not col_models:
        raise ValueError("best_layer_pair_matrix needs at least one row model and one column model")
    row_layers, xs = {}, []
    for name, model in row_models.items():
        names, tensors = _layers(model)
        row_layers[name] = names
        xs += [t if permutation is None else t[permutation] for t in tensors]
    col_layers, ys = {}, []
    for name, model in col_models.items():
        names, tensors = _layers(model)
        col_layers[name] = names
        ys += tensors
    clip = None if clip_quantile is None or clip_quantile >= 1 else clip_quantile
    full = alignment_matrix(xs, ys, metric=metric, normalize=normalize, clip_quantile=clip, **metric_kwargs)
    rows, cols = list(row_models), list(col_models)
    scores = np.zeros((len(rows), len(cols)))
    indices = np.zeros((len(rows), len(cols), 2), dtype=np.int64)
    r0 = 0
    for a, rname in enumerate(rows):
        c0 = 0
        for b, cname in enumerate(cols):
            block = full[r0 : r0 + len(row_layers[rname]), c0 : c0 + len(col_layers[cname])]
            flat = int(torch.argmax(block))
            indices[a, b] = divmod(flat, block.shape[1])
            scores[a, b] = float(block.flatten()[flat])
            c0 += len(col_layers[cname])
        r0 += len(row_layers[rname])
    return BestLayerPairs(scores, indices, full, rows, cols, row_layers, col_layers)


def calibrated_best_layer_pairs(
    row_models: Mapping[str, Any],
    col_models: Mapping[str, Any],
    metric: str = "mutual_knn",
    n_permutations: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    permutations: torch.Tensor | None = None,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Permutation-calibrated best-layer-pair score of every (row model, column model) pair.

    For each model pair, :func:`prh_lightning.calibrate` with ``aggregate="max"``: the rows of
    every column-model layer are permuted with the same permutation, and the best score over layer
    pairs is recomputed on each, so the null carries the same best-of-layers selection as the
    observed score. Returns ``[R, C]`` arrays ``raw``, ``null_mean`` (the chance level),
    ``tau``, ``p_value`` and ``calibrated``. ``kwargs``: ``normalize``, ``clip_quantile`` and the
    metric's options.
    """
    from prh_lightning.calibration import calibrate

    keys = ("raw", "null_mean", "tau", "p_value", "calibrated")
    out = {key: np.zeros((len(row_models), len(col_models))) for key in keys}
    clip = kwargs.pop("clip_quantile", None)
    clip = None if clip is None or clip >= 1 else clip
    for a, rows in enumerate(row_models.values()):
        for b, cols in enumerate(col_models.values()):
            gen = torch.Generator().manual_seed(int(seed))
            res = calibrate(_layers(rows)[1], _layers(cols)[1], metric, n_permutations=n_permutations,
                            permutations=permutations, alpha=alpha, aggregate="max", generator=gen,
                            clip_quantile=clip, **kwargs)
            for key in keys:
                out[key][a, b] = getattr(res.aggregate, key)
    return out
