"""alignment_matrix / best_alignment: the batched fast paths against per-pair loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prh_lightning import Representations, alignment_matrix, best_alignment
from prh_lightning.alignment import layer_names
from prh_lightning.functional import METRICS


def _layers(seed: int, n: int = 48, count: int = 3, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 5, generator=g, dtype=dtype)
    return [base @ torch.randn(5, 4 + i, generator=g, dtype=dtype) + 0.6 * torch.randn(n, 4 + i, generator=g, dtype=dtype) for i in range(count)]


def per_pair(xs, ys, metric, **kw):
    """The platonic-rep protocol: L2-normalise both, call the metric, one pair at a time."""
    unit = [x / x.norm(dim=1, keepdim=True) for x in xs]
    unit_y = [y / y.norm(dim=1, keepdim=True) for y in ys]
    return torch.tensor([[float(METRICS[metric](x, y, **kw)) for y in unit_y] for x in unit], dtype=torch.float64)


CASES = [
    ("mutual_knn", {"k": 5}),
    ("cycle_knn", {"k": 4}),
    ("lcs_knn", {"k": 5}),
    ("edit_distance_knn", {"k": 5}),
    ("cka", {}),
    ("cka", {"unbiased": True}),
    ("cka", {"kernel": "rbf"}),
    ("cka", {"kernel": "rbf", "unbiased": True, "sigma": 0.8}),
    ("unbiased_cka", {}),
    ("cknna", {"k": 6}),
    ("cknna", {"k": 6, "unbiased": False}),
    ("svcca", {"dim": 3}),
    ("rsa", {"compare": "pearson"}),
]


@pytest.mark.parametrize(("metric", "kw"), CASES, ids=[f"{m}-{kw}" for m, kw in CASES])
def test_matrix_matches_per_pair_loop(metric, kw):
    xs, ys = _layers(0), _layers(1, count=2)
    expected = per_pair(xs, ys, metric, **kw)
    got = alignment_matrix(xs, ys, metric=metric, **kw)
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("metric", ["mutual_knn", "unbiased_cka", "cka", "cknna"])
def test_within_model_matrix_and_streaming_blocks(metric):
    xs = _layers(2, count=4)
    expected = per_pair(xs, xs, metric)
    whole = alignment_matrix(xs, metric=metric)
    chunked = alignment_matrix(xs, metric=metric, batch_size=7)  # 48 rows in blocks of 7
    np.testing.assert_allclose(whole.numpy(), expected.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(chunked.numpy(), expected.numpy(), rtol=1e-9, atol=1e-9)
    if metric != "cknna":  # CKNNA's 1^T K' L' 1 term is not symmetric in (K, L), as in the reference
        np.testing.assert_allclose(whole.numpy(), whole.numpy().T, atol=1e-9)


def test_rbf_blocks_match_whole():
    xs, ys = _layers(3), _layers(4)
    for unbiased in (False, True):
        expected = per_pair(xs, ys, "cka", kernel="rbf", unbiased=unbiased)
        got = alignment_matrix(xs, ys, metric="cka", kernel="rbf", unbiased=unbiased, batch_size=5)
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-9, atol=1e-9)


def test_float32_fast_path_close_to_float64_reference():
    xs, ys = _layers(5, n=200), _layers(6, n=200)
    for metric in ("unbiased_cka", "cknna", "mutual_knn"):
        ref = per_pair(xs, ys, metric)
        got = alignment_matrix([x.float() for x in xs], [y.float() for y in ys], metric=metric)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-4)


def test_normalize_false_and_clipping_follow_the_reference():
    xs, ys = _layers(7), _layers(8)
    raw = torch.tensor([[float(METRICS["cka"](x, y, normalize=False)) for y in ys] for x in xs], dtype=torch.float64)
    np.testing.assert_allclose(alignment_matrix(xs, ys, "cka", normalize=False).numpy(), raw.numpy(), rtol=1e-9)

    def clip(x, q):  # platonic-rep remove_outliers(exact=False), per layer
        t = np.quantile(np.abs(x.numpy()), q, axis=1).mean()
        return torch.tensor(np.clip(x.numpy(), -t, t))

    expected = per_pair([clip(x, 0.9) for x in xs], [clip(y, 0.9) for y in ys], "mutual_knn", k=5)
    got = alignment_matrix(xs, ys, "mutual_knn", clip_quantile=0.9, k=5)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-9)


def test_accepts_representations_mappings_and_lists():
    xs = _layers(9)
    reps = Representations({"conv1": xs[0], "conv2": xs[1], "fc": xs[2]})
    as_list = alignment_matrix(xs, metric="cka")
    assert torch.equal(alignment_matrix(reps, metric="cka"), as_list)
    assert torch.equal(alignment_matrix(dict(reps), metric="cka"), as_list)
    assert layer_names(reps) == ["conv1", "conv2", "fc"]
    assert layer_names(xs) == ["0", "1", "2"]


def test_best_alignment_is_the_true_maximum_even_if_all_scores_are_negative():
    xs, ys = _layers(10), _layers(11)

    def negative(a, b):
        return -1.0 - METRICS["cka"](a, b)

    scores = per_pair(xs, ys, "cka").numpy()
    i, j = np.unravel_index(np.argmin(scores), scores.shape)  # max of -1 - cka
    score, where = best_alignment(xs, ys, metric=negative)
    assert where == (i, j)
    assert score == pytest.approx(-1.0 - scores[i, j], rel=1e-9)
    assert score < 0

    score, where = best_alignment(xs, ys, metric="mutual_knn", k=5)
    ref = per_pair(xs, ys, "mutual_knn", k=5).numpy()
    assert score == pytest.approx(ref.max()) and ref[where] == ref.max()


def test_best_alignment_within_model_skips_the_diagonal():
    xs = _layers(12)
    ref = per_pair(xs, xs, "cka").numpy()
    np.fill_diagonal(ref, -np.inf)
    score, (i, j) = best_alignment(xs, None, metric="cka")
    assert i != j and score == pytest.approx(ref.max(), rel=1e-9)


def test_bad_inputs():
    xs, ys = _layers(13), _layers(14)
    with pytest.raises(ValueError, match="samples"):
        alignment_matrix(xs, [y[:-1] for y in ys])
    with pytest.raises(ValueError, match="samples"):
        alignment_matrix([xs[0], xs[1][:-2]])
    with pytest.raises(ValueError, match="unknown metric"):
        alignment_matrix(xs, ys, metric="procrustes")
    with pytest.raises(TypeError, match="bad options"):
        alignment_matrix(xs, ys, metric="mutual_knn", topk=5)
    with pytest.raises(ValueError, match="k must satisfy"):
        alignment_matrix(xs, ys, metric="mutual_knn", k=48)
    with pytest.raises(TypeError, match="wrap it in a list"):
        alignment_matrix(xs[0])
    with pytest.raises(ValueError, match="no layers"):
        alignment_matrix([])
    zero = [x.clone() for x in xs]
    zero[1][3] = 0
    with pytest.raises(ValueError, match="all-zero row"):
        alignment_matrix(zero, ys)
    nan = [x.clone() for x in xs]
    nan[2][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        alignment_matrix(nan, ys, metric="cka")
    const = [torch.ones(48, 3, dtype=torch.float64)] + xs
    with pytest.raises(ValueError, match="constant features"):
        alignment_matrix(const, ys, metric="unbiased_cka")
    with pytest.raises(ValueError, match="same device"):
        alignment_matrix(xs, [torch.empty(48, 3, device="meta", dtype=torch.float64)], normalize=False)
    with pytest.raises(ValueError, match="clip_quantile"):
        alignment_matrix(xs, ys, clip_quantile=1.5)


def test_rbf_bandwidth_errors():
    xs, ys = _layers(15), _layers(16)
    with pytest.raises(ValueError, match="sigma must be a positive"):
        alignment_matrix(xs, ys, metric="cka", kernel="rbf", sigma=-1.0)
    dup = [torch.ones(48, 3, dtype=torch.float64)] + xs
    with pytest.raises(ValueError, match="constant features"):
        alignment_matrix(dup, ys, metric="cka", kernel="rbf")
    mostly_same = [torch.cat([torch.ones(42, 3, dtype=torch.float64), xs[0][:6, :3]])] + xs
    with pytest.raises(ValueError, match="median"):
        alignment_matrix(mostly_same, ys, metric="cka", kernel="rbf", normalize=False)
