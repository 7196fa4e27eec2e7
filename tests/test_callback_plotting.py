"""prh_lightning.plotting: the figures the callbacks log (and the recipes save)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prh_lightning.plotting import figure_to_array, heatmap_figure, line_figure


def test_heatmap_draws_the_matrix_with_labels_and_limits():
    matrix = torch.tensor([[0.1, 0.9, float("nan")], [0.5, 0.2, 0.7]])
    fig = heatmap_figure(matrix, ["conv1", "fc"], ["a", "b", "c"], title="cka", vmin=0.0, vmax=1.0)
    ax = fig.axes[0]
    image = ax.images[0]
    shown = image.get_array()
    assert np.allclose(shown.filled(np.nan)[~np.isnan(matrix.numpy())], matrix.numpy()[~np.isnan(matrix.numpy())])
    assert shown.mask[0, 2] and image.get_clim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["conv1", "fc"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert ax.get_title() == "cka"
    # each finite cell holds its value's outline, centred on the cell; the NaN cell is left blank
    assert cell_annotations(ax) == {(0, 0): "0.10", (0, 1): "0.90", (1, 0): "0.50", (1, 1): "0.20", (1, 2): "0.70"}


def cell_annotations(ax) -> dict[tuple[int, int], str]:
    """``{(row, col): text}`` read back from a heatmap's value outlines: each outline is matched
    against matplotlib's own ``TextPath`` of every two-decimal string in [-1, 1] (centred)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    def centre(path) -> np.ndarray:
        box = path.get_extents()  # the outline's extent (Bezier curves included)
        return np.array([box.x0 + box.x1, box.y0 + box.y1]) / 2

    def centred_vertices(path) -> np.ndarray:
        return path.vertices - centre(path)

    font = FontProperties()
    candidates = {f"{x / 100:.2f}": centred_vertices(TextPath((0, 0), f"{x / 100:.2f}", size=7, prop=font)) for x in range(-100, 101)}
    (values,) = [c for c in ax.collections if len(c.get_paths()) and c.get_offsets().shape[0] == len(c.get_paths())]
    out = {}
    for (col, row), path in zip(values.get_offsets(), values.get_paths()):
        assert np.allclose(centre(path), 0.0, atol=1e-9)  # centred on the cell
        got = centred_vertices(path)
        (text,) = [t for t, v in candidates.items() if v.shape == got.shape and np.allclose(v, got, atol=1e-6)]
        out[int(row), int(col)] = text
    return out


def test_heatmap_values_contrast_with_their_cells():
    fig = heatmap_figure(np.array([[0.0, 1.0]]), ["r"], ["dark", "light"], vmin=0.0, vmax=1.0, cmap="gray")
    (values,) = [c for c in fig.axes[0].collections if c.get_offsets().shape[0] == 2]
    assert [tuple(c[:3]) for c in values.get_facecolors()] == [(1.0, 1.0, 1.0), (0.0, 0.0, 0.0)]  # white on black, black on white
    array = figure_to_array(fig)
    assert (array.min(axis=2) == 255).any() and (array.sum(axis=2) == 0).any()


def test_figure_to_array_is_rgb_uint8_and_shows_the_colours():
    fig = heatmap_figure(np.eye(2), ["x", "y"], ["x", "y"], vmin=0, vmax=1, cmap="gray", annotate=False)
    array = figure_to_array(fig)
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert array.shape[0] > 100 and array.shape[1] > 100
    # a gray colormap of the identity: both black (0) and white (1) cells appear
    assert (array.sum(axis=2) == 0).any() and (array.min(axis=2) == 255).any()


def test_many_labels_are_thinned_and_large_matrices_not_annotated():
    fig = heatmap_figure(np.random.rand(100, 3), [f"l{i}" for i in range(100)], ["a", "b", "c"])
    ax = fig.axes[0]
    assert 10 <= len(ax.get_yticks()) <= 40 and not ax.texts and not [c for c in ax.collections if c.get_offsets().shape[0] > 1]


def test_line_figure_one_line_per_series():
    fig = line_figure({"conv1": ([0, 10, 20], [0.1, 0.2, 0.4]), "fc": ([0, 10, 20], [0.3, 0.3, 0.2])}, ylim=(0, 1))
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["conv1", "fc"]
    assert list(ax.lines[0].get_ydata()) == [0.1, 0.2, 0.4] and ax.get_ylim() == (0, 1)
    assert figure_to_array(fig).shape[2] == 3


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: heatmap_figure(np.zeros((2, 3)), ["a"], ["a", "b", "c"]), "1 row labels"),
        (lambda: heatmap_figure(np.zeros(3), ["a"], ["a"]), r"2-d \[Lx, Ly\] matrix"),
        (lambda: line_figure({}), "at least one series"),
        (lambda: line_figure({"a": ([0, 1], [0.5])}), "2 x values but 1 y values"),
    ],
)
def test_bad_input(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_layer_step_figure_puts_each_layer_on_a_row_and_steps_in_columns():
    from prh_lightning.plotting import curves_figure, layer_step_figure

    series = {"a": ([0, 10, 20], [0.1, 0.2, 0.3]), "b": ([10, 20], [0.5, 0.6])}
    fig = layer_step_figure(series, vmin=0, vmax=1)
    ax = fig.axes[0]
    shown = ax.images[0].get_array().filled(np.nan)
    assert np.allclose(shown[0], [0.1, 0.2, 0.3]) and np.isnan(shown[1, 0]) and np.allclose(shown[1, 1:], [0.5, 0.6])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "10", "20"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    many = {f"l{i}": ([0, 1], [0.1, 0.2]) for i in range(13)}
    assert curves_figure(many).axes[0].images and not curves_figure(series).axes[0].images  # lines up to 12
    with pytest.raises(ValueError, match="2 steps but 1 values"):
        layer_step_figure({"a": ([0, 1], [0.5])})


def _texts_outside(fig) -> list[str]:
    """Visible, non-empty texts whose drawn extent leaves the figure (1 px tolerance)."""
    figure_to_array(fig)
    renderer = fig.canvas.get_renderer()
    width, height = fig.canvas.get_width_height()
    outside = []
    for text in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent")):
        if not text.get_visible() or not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1:
            outside.append(text.get_text())
    return outside


@pytest.mark.parametrize("n_layers", [1, 7, 13, 40])
def test_no_label_is_clipped_without_a_layout_engine(n_layers):
    # margins are computed from the labels (no constrained layout, which costs more than the
    # drawing itself); every tick label, axis label, title and legend entry must still fit
    rows = [f"encoder.layer.{i}.attention.output.dense" for i in range(n_layers)]
    cols = [f"blocks.{i}.mlp.fc2" for i in range(max(1, n_layers // 2))]
    heat = heatmap_figure(torch.rand(len(rows), len(cols)), rows, cols, "cka: model vs reference", 0, 1,
                          xlabel="reference layer", ylabel="model layer")
    assert _texts_outside(heat) == []
    lines = line_figure({name: ([0, 50, 100], [0.1, 0.2, 0.3]) for name in rows[:12]}, "cka per layer", ylabel="cka")
    assert _texts_outside(lines) == []
