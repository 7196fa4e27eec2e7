"""Figures shared by the callbacks and the recipes: a labelled heatmap of a layer x layer
alignment matrix, per-layer curves over training steps, and a Figure -> RGB array helper
(for TensorBoard's ``add_image``).

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot global state), so
they are safe to make from callbacks and never pop up a window.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties, findfont
from matplotlib.path import Path
from matplotlib.textpath import TextPath
from matplotlib.transforms import Affine2D

_MAX_TICK_LABELS = 40  # beyond this, label every k-th row/column only
_ANNOTATE_MAX_CELLS = 144  # write the value in each cell up to 12 x 12
_CHAR_WIDTH = 0.62  # generous width of a DejaVu Sans character, in ems (labels are never clipped)
_LINE = 1.45  # height of a line of text, in ems


def _as_matrix(matrix: torch.Tensor | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().float().cpu().numpy()
    array = np.asarray(matrix, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"heatmap_figure expects a 2-d [Lx, Ly] matrix, got shape {array.shape}")
    return array


def _tick_positions(n: int) -> np.ndarray:
    step = max(1, int(np.ceil(n / _MAX_TICK_LABELS)))
    return np.arange(0, n, step)


def _new_figure(figsize: tuple[float, float], dpi: int) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _text_inches(labels: Sequence[str], fontsize: float) -> float:
    """Width in inches of the longest label (an upper bound for DejaVu Sans)."""
    return max((len(str(s)) for s in labels), default=0) * _CHAR_WIDTH * fontsize / 72


def _set_margins(fig: Figure, left: float, right: float, bottom: float, top: float) -> None:
    """Margins in inches around the axes, computed from the text they hold: about ten times
    cheaper than a layout engine, which measures every text at every draw (this matters
    for images rendered during training)."""
    width, height = fig.get_size_inches()
    left, right = min(left, 0.45 * width), min(right, 0.45 * width)
    bottom, top = min(bottom, 0.45 * height), min(top, 0.45 * height)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)


def heatmap_figure(
    matrix: torch.Tensor | np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    *,
    xlabel: str = "",
    ylabel: str = "",
    cmap: str = "viridis",
    annotate: bool | None = None,
    dpi: int = 90,
) -> Figure:
    """A heatmap of ``matrix [Lx, Ly]``: rows labelled ``row_labels`` (Lx), columns ``col_labels`` (Ly).

    Cells hold their value when the matrix is small (``annotate=None`` decides by size);
    NaN cells are drawn grey. Returns a matplotlib Figure (save it or pass it to
    :func:`figure_to_array`).
    """
    values = _as_matrix(matrix)
    n_rows, n_cols = values.shape
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise ValueError(
            f"heatmap_figure: matrix is {n_rows} x {n_cols} but got {len(row_labels)} row labels "
            f"and {len(col_labels)} column labels; give one label per row and per column"
        )
    rows, cols = _tick_positions(n_rows), _tick_positions(n_cols)
    row_text = _text_inches([row_labels[i] for i in rows], 8)
    col_text = _text_inches([col_labels[i] for i in cols], 8) * 0.71 + 8 * _LINE / 72  # rotated by 45 degrees
    left = 0.15 + row_text + (10 * _LINE / 72 if ylabel else 0.0)
    bottom = 0.15 + col_text + (10 * _LINE / 72 if xlabel else 0.0)
    top = 0.15 + (10 * _LINE / 72 if title else 0.0)
    right = 0.85  # colour bar and its tick labels
    width = min(16.0, left + right + max(1.6, 0.42 * n_cols))
    height = min(16.0, bottom + top + max(1.2, 0.36 * n_rows))
    fig = _new_figure((max(width, 3.6), max(height, 2.8)), dpi)
    _set_margins(fig, left, right, bottom, top)
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(values)
    colours = matplotlib.colormaps[cmap].with_extremes(bad="#bbbbbb")
    image = ax.imshow(masked, cmap=colours, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)

    ax.set_yticks(rows, [row_labels[i] for i in rows], fontsize=8)
    ax.set_xticks(cols, [col_labels[i] for i in cols], fontsize=8, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10, y=1.0)  # a fixed place: automatic placement measures every tick label

    if annotate is None:
        annotate = n_rows * n_cols <= _ANNOTATE_MAX_CELLS
    if annotate:
        _annotate_cells(ax, values, image)
    return fig


def _annotate_cells(ax, values: np.ndarray, image) -> None:
    """Write each finite cell's value (two decimals, 7 pt), in black or white for contrast with
    the cell colour. The values are drawn as one collection of glyph outlines (the strings'
    outlines are cached) rather than one Text artist per cell: a 7 x 7 heatmap renders in about
    half the time, which matters for images logged during training."""
    font = findfont(FontProperties())  # the font file of matplotlib's default text
    paths, offsets, colours = [], [], []
    for (i, j), value in np.ndenumerate(values):
        if not np.isfinite(value):
            continue
        r, g, b, _ = image.cmap(image.norm(value))
        colours.append("black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
        paths.append(_centred_text_path(f"{value:.2f}", 7.0, font))
        offsets.append((j, i))
    if not paths:
        return
    points_to_pixels = Affine2D().scale(ax.figure.dpi / 72)
    cells = PathCollection(
        paths, offsets=offsets, offset_transform=ax.transData, transform=points_to_pixels,
        facecolors=colours, edgecolors="none", zorder=3,
    )
    ax.add_collection(cells, autolim=False)


@functools.lru_cache(maxsize=4096)
def _centred_text_path(text: str, size: float, font: str) -> Path:
    """Outline of ``text`` at ``size`` points in the font file ``font``, centred on the origin (units: points)."""
    outline = TextPath((0, 0), text, size=size, prop=FontProperties(fname=font))
    box = outline.get_extents()
    return outline.transformed(Affine2D().translate(-(box.x0 + box.x1) / 2, -(box.y0 + box.y1) / 2))


def line_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
    *,
    cmap: str = "viridis",
    dpi: int = 90,
) -> Figure:
    """One line per entry of ``series`` (``label -> (xs, ys)``), e.g. each layer's alignment over
    training steps. Lines are coloured in order along ``cmap`` (early layers dark, late layers
    light), with markers when there are few points."""
    if not series:
        raise ValueError("line_figure needs at least one series (label -> (xs, ys))")
    legend = 0.45 + _text_inches(list(series), 7)  # the legend sits right of the axes
    fig = _new_figure((4.6 + min(legend, 4.0), 3.8), dpi)
    _set_margins(fig, 0.75, legend, 0.6, 0.2 + (10 * _LINE / 72 if title else 0.0))
    ax = fig.add_subplot()
    colours = matplotlib.colormaps[cmap](np.linspace(0.0, 0.9, len(series))) if len(series) > 1 else ["C0"]
    for colour, (label, (xs, ys)) in zip(colours, series.items()):
        if len(xs) != len(ys):
            raise ValueError(f"line_figure: series {label!r} has {len(xs)} x values but {len(ys)} y values")
        marker = "o" if len(xs) <= 30 else None
        ax.plot(xs, ys, label=label, color=colour, marker=marker, markersize=3, linewidth=1.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=10, y=1.0)  # a fixed place: automatic placement measures every tick label
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def figure_to_array(fig: Figure, close: bool = True) -> np.ndarray:
    """Render ``fig`` to a ``uint8 [H, W, 3]`` RGB array (for ``add_image(..., dataformats="HWC")``).

    ``close`` is kept for compatibility and does nothing: the figure is not in pyplot's
    registry, so it is freed once the caller drops it (clearing it first only costs time)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def layer_step_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    *,
    cmap: str = "viridis",
    dpi: int = 90,
) -> Figure:
    """Each series (``layer -> (steps, values)``) as one row of a layer x step heatmap: readable
    at 40+ layers, where 40 lines and their legend are not. Columns are the union of the steps;
    a layer without a value at a step shows grey.

    >>> fig = layer_step_figure({"a": ([0, 10], [0.1, 0.5]), "b": ([10], [0.9])}, vmin=0, vmax=1)
    >>> fig.axes[0].images[0].get_array().shape
    (2, 2)
    """
    if not series:
        raise ValueError("layer_step_figure needs at least one series (label -> (steps, values))")
    steps = sorted({int(s) for xs, _ in series.values() for s in xs})
    column = {s: j for j, s in enumerate(steps)}
    values = np.full((len(series), len(steps)), np.nan)
    for i, (label, (xs, ys)) in enumerate(series.items()):
        if len(xs) != len(ys):
            raise ValueError(f"layer_step_figure: series {label!r} has {len(xs)} steps but {len(ys)} values")
        for s, v in zip(xs, ys):
            values[i, column[int(s)]] = v
    fig = heatmap_figure(
        values, list(series), [str(s) for s in steps], title, vmin, vmax,
        xlabel="step", ylabel="layer", cmap=cmap, annotate=False, dpi=dpi,
    )
    return fig


def curves_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    ylabel: str = "",
    limits: tuple[float | None, float | None] = (None, None),
    max_lines: int = 12,
    dpi: int = 90,
) -> Figure:
    """Per-layer curves over steps: :func:`line_figure` up to ``max_lines`` layers, a
    :func:`layer_step_figure` beyond."""
    if len(series) > max_lines:
        return layer_step_figure(series, title, *limits, dpi=dpi)
    ylim = limits if None not in limits else None
    return line_figure(series, title=title, ylabel=ylabel, ylim=ylim, dpi=dpi)
