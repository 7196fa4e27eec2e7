"""AlignmentMatrix Metric: per-layer buffers over batches, compared with a layer-by-layer
reference computed here."""

from __future__ import annotations

import pytest
import torch

from prh_lightning.metrics import AlignmentMatrix
from prh_lightning.representations import Representations
from reference_formulas import ref_linear_cka, ref_mutual_knn

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # compute() before update()


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def model_layers(n: int = 36, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 8, generator=g)
    xs = {"x.conv": x0, "x.fc": torch.relu(x0 @ torch.randn(8, 5, generator=g)) + 0.1}
    ys = {
        "y.l1": x0[:, :4] + 0.5 * torch.randn(n, 4, generator=g),
        "y.l2": torch.randn(n, 6, generator=g),
        "y.l3": torch.tanh(x0 @ torch.randn(8, 3, generator=g)),
    }
    return xs, ys


def batches(layers: dict[str, torch.Tensor], sizes: list[int]):
    start = 0
    for size in sizes:
        yield {name: v[start : start + size] for name, v in layers.items()}
        start += size


def test_two_model_cka_matrix_matches_per_pair_reference():
    xs, ys = model_layers()
    metric = AlignmentMatrix(metric="cka", normalize=True)
    for bx, by in zip(batches(xs, [10, 1, 25]), batches(ys, [10, 1, 25])):
        metric.update(bx, by)
    got = metric.compute()
    expected = torch.tensor([[ref_linear_cka(unit(xs[i]), unit(ys[j])) for j in ys] for i in xs])
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-5, rtol=0)
    assert metric.layers_x == ["x.conv", "x.fc"] and metric.layers_y == ["y.l1", "y.l2", "y.l3"]


def test_self_alignment_of_a_list_of_layers_with_mutual_knn():
    xs, ys = model_layers(seed=1)
    layers = [xs["x.conv"], ys["y.l1"], ys["y.l2"]]
    metric = AlignmentMatrix(metric="mutual_knn", normalize=False, k=4)
    for start in (0, 12, 24):
        metric.update([x[start : start + 12] for x in layers])
    got = metric.compute()
    expected = torch.tensor([[ref_mutual_knn(p, q, 4) for q in layers] for p in layers])
    torch.testing.assert_close(got.double(), expected.double(), atol=1e-6, rtol=0)
    assert torch.diagonal(got).eq(1).all() and metric.layers_x == ["0", "1", "2"]


def test_representations_input_and_duplicate_ids():
    xs, ys = model_layers(seed=2)
    order = torch.cat([torch.arange(36), torch.tensor([4, 9])])  # padded with repeats
    rx = Representations({k: v[order] for k, v in xs.items()})
    metric = AlignmentMatrix(metric="cka", normalize=False)
    for start in (0, 19):
        metric.update(rx.subset(torch.arange(start, start + 19)), index=order[start : start + 19])
    expected = torch.tensor([[ref_linear_cka(xs[i], xs[j]) for j in xs] for i in xs])
    torch.testing.assert_close(metric.compute().double(), expected.double(), atol=1e-5, rtol=0)


def test_inconsistent_updates_are_clear_errors():
    xs, ys = model_layers()
    metric = AlignmentMatrix(max_samples=40)
    metric.update(xs, ys)
    with pytest.raises(ValueError, match="xs changed between updates"):
        metric.update({"x.conv": xs["x.conv"]}, ys)
    with pytest.raises(ValueError, match="`ys` in every update or in none"):
        metric.update(xs)
    with pytest.raises(ValueError, match="past max_samples=40"):
        metric.update(xs, ys)
    bad = dict(xs, **{"x.fc": xs["x.fc"][:30]})
    with pytest.raises(ValueError, match="x.fc.*30 samples"):
        AlignmentMatrix().update(bad)
    nan = dict(xs, **{"x.fc": xs["x.fc"].clone().fill_(float("nan"))})
    with pytest.raises(ValueError, match=r"xs\['x.fc'\] contains NaN"):
        AlignmentMatrix().update(nan)
    with pytest.raises(ValueError, match="xs has 36 samples.*ys has 20"):
        AlignmentMatrix().update(xs, {k: v[:20] for k, v in ys.items()})
    with pytest.raises(ValueError, match=r"2-D \[batch, d\]"):
        AlignmentMatrix().update({"a": torch.randn(5)})
    with pytest.raises(ValueError, match="no layers"):
        AlignmentMatrix().update({})
    with pytest.raises(RuntimeError, match="call update"):
        AlignmentMatrix().compute()


def test_heatmap_plot_has_layer_labels():
    xs, ys = model_layers()
    metric = AlignmentMatrix(metric="cka")
    metric.update(xs, ys)
    fig, ax = metric.plot()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x.conv", "x.fc"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["y.l1", "y.l2", "y.l3"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_reset_accepts_other_layers():
    xs, ys = model_layers()
    metric = AlignmentMatrix(metric="cka", normalize=False)
    metric.update(xs, ys)
    metric.reset()
    metric.update({"only": ys["y.l1"]})
    assert metric.compute().shape == (1, 1) and metric.layers_x == ["only"]


def test_forward_respects_max_samples():
    xs, ys = model_layers()
    metric = AlignmentMatrix(metric="cka", max_samples=50)
    metric({k: v[:30] for k, v in xs.items()})
    with pytest.raises(ValueError, match="holds 30 samples and this batch adds 30"):
        metric({k: v[:30] for k, v in xs.items()})
