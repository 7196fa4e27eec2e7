"""A tracker's figures: the last check's layer x layer heatmaps (colour limits = the metric's
range, e.g. [0, k] for ``lcs_knn``) and each layer's score over steps (lines up to 12 layers,
a layer x step heatmap beyond)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from prh_lightning.tracking.scoring import SNAPSHOTS, metric_range

IMAGE_DPI = 80  # readable, and cheap to render


def heatmaps(
    matrices: Mapping[str, torch.Tensor],
    model_layers: Sequence[str],
    reference_layers: Mapping[str, Sequence[str]],
    metric_kwargs: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """``{"alignment_heatmap/<metric>/<target>": Figure}`` for the reference and within-model
    matrices (snapshot matrices are summarised by their diagonals, see :func:`curves`)."""
    from prh_lightning.plotting import heatmap_figure

    figures = {}
    for key, matrix in matrices.items():
        metric, target = key.split("/", 1)
        if target in SNAPSHOTS:
            continue
        cols = list(model_layers) if target == "self" else list(reference_layers.get(target, ()))
        if matrix.shape != (len(model_layers), len(cols)):
            continue  # a reference that failed before its layers were known
        figures[f"alignment_heatmap/{key}"] = heatmap_figure(
            matrix, list(model_layers), cols, f"{metric}: model vs {target}", *metric_range(metric, metric_kwargs[metric]),
            xlabel=target, ylabel="model layer", dpi=IMAGE_DPI,
        )
    return figures


def curves(
    history: Mapping[str, Sequence[tuple[int, float]]],
    model_layers: Sequence[str],
    prefix: str,
    metric_kwargs: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """``{"alignment_curves/<metric>/<target>": Figure}``: each model layer's score over steps,
    for each reference and ``self_initial``."""
    from prh_lightning.plotting import curves_figure

    figures = {}
    keys = dict.fromkeys("/".join(tag.split("/")[1:3]) for tag in history if tag.startswith(prefix + "/"))
    for key in keys:
        metric, _, target = key.partition("/")
        if target in ("self", "self_previous") or metric not in metric_kwargs:
            continue  # within-model / step-to-step change: their scalars say enough
        series = {
            layer: tuple(zip(*history[tag]))
            for layer in model_layers
            if (tag := f"{prefix}/{key}/{layer}") in history and history[tag]
        }
        if series:
            figures[f"alignment_curves/{key}"] = curves_figure(
                series, f"{metric}: each model layer vs {target}", metric,
                metric_range(metric, metric_kwargs[metric]), dpi=IMAGE_DPI,
            )
    return figures
