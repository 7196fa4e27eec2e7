"""A tracker's figures: the last check's layer x layer heatmaps (colour limits = the metric's
range, e.g. [0, k] for ``lcs_knn``; or calibrated scores in [0, 1]) and each layer's score over
steps (lines up to 12 layers, a layer x step heatmap beyond) with the chance band of the best
layer pair (from the ``.../chance`` and ``.../threshold`` tags) when calibration is on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from prh_lightning.tracking.scoring import SNAPSHOTS, metric_range

IMAGE_DPI = 80  # readable, and cheap to render
MAX_LINES = 12  # curves_figure draws lines up to this many layers, a layer x step heatmap beyond


def heatmaps(
    matrices: Mapping[str, torch.Tensor],
    model_layers: Sequence[str],
    reference_layers: Mapping[str, Sequence[str]],
    metric_kwargs: Mapping[str, Mapping[str, Any]],
    calibrated: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """``{"alignment_heatmap/<metric>/<target>": Figure}`` for the reference and within-model
    matrices (snapshot matrices are summarised by their diagonals, see :func:`curves`).
    ``calibrated``: ``{"<metric>/<target>": [Lx, Ly]}`` shown instead of the raw matrix."""
    from prh_lightning.plotting import heatmap_figure

    figures = {}
    for key, matrix in matrices.items():
        metric, target = key.split("/", 1)
        if target in SNAPSHOTS:
            continue
        cols = list(model_layers) if target == "self" else list(reference_layers.get(target, ()))
        if matrix.shape != (len(model_layers), len(cols)):
            continue  # a reference that failed before its layers were known
        title, limits = f"{metric}: model vs {target}", metric_range(metric, metric_kwargs[metric])
        if calibrated is not None and key in calibrated:
            matrix, title = calibrated[key], f"{metric} calibrated: model vs {target}"
            limits = (0.0, 1.0) if limits[1] is not None else (0.0, None)
        figures[f"alignment_heatmap/{key}"] = heatmap_figure(
            matrix, list(model_layers), cols, title, *limits, xlabel=target, ylabel="model layer", dpi=IMAGE_DPI,
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
            fig = curves_figure(
                series, f"{metric}: each model layer vs {target}", metric,
                metric_range(metric, metric_kwargs[metric]), dpi=IMAGE_DPI,
            )
            if len(series) <= MAX_LINES:
                chance_band(fig, history, f"{prefix}/{key}")
            figures[f"alignment_curves/{key}"] = fig
    return figures


def chance_band(fig: Any, history: Mapping[str, Sequence[tuple[int, float]]], tag: str) -> None:
    """Draw the chance level of the best layer pair (``<tag>/chance``, dashed) and the band up
    to its permutation threshold (``<tag>/threshold``) on a curves figure; nothing without them."""
    chance, threshold = dict(history.get(f"{tag}/chance", ())), dict(history.get(f"{tag}/threshold", ()))
    steps = sorted(set(chance) & set(threshold))
    if not steps or not fig.axes:
        return
    ax = fig.axes[0]
    low, high = [chance[s] for s in steps], [threshold[s] for s in steps]
    ax.fill_between(steps, low, high, color="grey", alpha=0.25, linewidth=0, label="null: mean to threshold")
    ax.plot(steps, low, color="black", linestyle="--", linewidth=1.0, label="chance (best pair)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
