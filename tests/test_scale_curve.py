"""alignment_curve: scores on nested random subsets against brute-force references, the chance
level against its closed form, the spread, the figure and bad input."""

from __future__ import annotations

import pytest
import torch
from reference_formulas import ref_linear_cka, ref_mutual_knn

import prh_lightning
from prh_lightning import alignment_curve


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _pair(n=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g, dtype=torch.float64)
    a = z @ torch.randn(4, 12, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, 12, generator=g, dtype=torch.float64)
    b = z @ torch.randn(4, 9, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, 9, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 7, generator=g, dtype=torch.float64)
    return a, b, noise


def test_each_point_is_the_brute_force_score_of_its_nested_subset_and_max_takes_the_best_layer():
    a, b, noise = _pair()
    curve = alignment_curve(
        {"a": a, "noise": noise}, b, "mutual_knn", sizes=[40, 90, 160], repeats=3, n_permutations=0,
        generator=torch.Generator().manual_seed(1), k=5,
    )
    assert curve.scores.shape == (3, 3) and curve.chance is None
    for r in range(3):
        order = curve.subsets[r]
        assert sorted(order.tolist()) == list(range(160))
        for j, size in enumerate(curve.sizes):
            rows = order[:size]
            want = max(ref_mutual_knn(_unit(x[rows]), _unit(b[rows]), 5) for x in (a, noise))
            assert curve.scores[r, j].item() == pytest.approx(want, abs=1e-12)
    # all samples: every repeat is the same set, so no spread
    assert torch.allclose(curve.scores[:, -1], curve.scores[0, -1].expand(3))
    assert float(curve.high[-1] - curve.low[-1]) == 0.0
    assert torch.allclose(curve.mean, curve.scores.mean(dim=0))
    assert bool((curve.low <= curve.mean).all() and (curve.mean <= curve.high).all())


def test_mean_aggregate_of_linear_cka_equals_the_brute_force_mean_over_layer_pairs():
    a, b, noise = _pair(seed=2)
    curve = alignment_curve(
        [a, noise], [b], "cka", sizes=[30, 100], repeats=2, n_permutations=0, aggregate="mean",
        generator=torch.Generator().manual_seed(0),
    )
    for r in range(2):
        for j, size in enumerate(curve.sizes):
            rows = curve.subsets[r, :size]
            want = (ref_linear_cka(_unit(a[rows]), _unit(b[rows])) + ref_linear_cka(_unit(noise[rows]), _unit(b[rows]))) / 2
            assert curve.scores[r, j].item() == pytest.approx(want, abs=1e-10)


def test_chance_level_of_mutual_knn_is_k_over_n_minus_1():
    # E[|N_a(i) ∩ N_b(π(i))|] / k = k / (n - 1) for a random pairing
    a, b, _ = _pair(n=300, seed=3)
    curve = alignment_curve(a, b, "mutual_knn", sizes=[100, 300], repeats=3, n_permutations=20, generator=torch.Generator().manual_seed(4), k=5)
    for size, chance in zip(curve.sizes, curve.chance.tolist()):
        assert chance == pytest.approx(5 / (size - 1), abs=0.006)
    assert bool((curve.mean > 3 * curve.chance).all())


def test_the_curve_is_exported_and_plots_mean_band_and_chance(tmp_path):
    assert prh_lightning.alignment_curve is alignment_curve
    a, b, _ = _pair(n=120, seed=5)
    curve = alignment_curve(a, b, "mutual_knn", sizes=[30, 120], repeats=2, n_permutations=3, generator=torch.Generator().manual_seed(0), k=3)
    ax = curve.plot()
    assert len(ax.lines) == 2 and ax.get_xscale() == "log"
    assert list(ax.lines[0].get_xdata()) == [30, 120]
    path = tmp_path / "curve.png"
    ax.figure.savefig(path)
    assert path.stat().st_size > 1000


def test_several_curves_share_one_axes_with_one_chance_entry_and_ticks_at_the_sizes():
    a, b, noise = _pair(n=120, seed=6)
    g = torch.Generator().manual_seed(0)
    curves = [alignment_curve(x, b, "mutual_knn", sizes=[30, 60, 120], repeats=2, n_permutations=2, generator=g, k=3)
              for x in (a, noise)]
    ax = curves[0].plot(label="a")
    curves[1].plot(ax, label="noise")
    labels = [line.get_label() for line in ax.lines]
    assert labels.count("a") == 1 and labels.count("noise") == 1 and labels.count("chance (permuted pairs)") == 1
    assert len(ax.lines) == 4
    assert list(ax.get_xticks()) == [30, 60, 120] and [t.get_text() for t in ax.get_xticklabels()] == ["30", "60", "120"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sizes": [50, 500]}, "only n=160"),
        ({"sizes": [90, 40]}, "increasing"),
        ({"sizes": []}, "increasing"),
        ({"repeats": 0}, "repeats"),
        ({"n_permutations": -1}, "n_permutations"),
        ({"aggregate": "median"}, "aggregate"),
        ({"level": 1.0}, "level"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    a, b, _ = _pair()
    with pytest.raises(ValueError, match=match):
        alignment_curve(a, b, **{"sizes": [40, 80], **kwargs})
