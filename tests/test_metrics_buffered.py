"""Buffered Metric classes (k-NN, CKNNA, SVCCA, RSA): brute-force references written here,
properties, sample-id de-duplication, the max_samples bound, bad input."""

from __future__ import annotations

import pytest
import torch

import prh_lightning.functional as F
from prh_lightning.metrics import CKA, CKNNA, LCSKNN, RSA, SVCCA, CycleKNN, EditDistanceKNN, MutualKNN, UnbiasedCKA

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # compute() before update()


def brute_force_neighbours(x: torch.Tensor, k: int) -> list[set[int]]:
    """For each row, the k other rows of largest inner product (plain Python, no ties in random data)."""
    x = x.double()
    out = []
    for i in range(x.shape[0]):
        sims = sorted(((float(x[i] @ x[j]), j) for j in range(x.shape[0]) if j != i), reverse=True)
        out.append({j for _, j in sims[:k]})
    return out


def ref_mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    na, nb = brute_force_neighbours(a, k), brute_force_neighbours(b, k)
    return sum(len(sa & sb) for sa, sb in zip(na, nb)) / (k * len(na))


def ref_cycle_knn(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    na, nb = brute_force_neighbours(a, k), brute_force_neighbours(b, k)
    return sum(any(i in na[j] for j in nb[i]) for i in range(len(na))) / len(na)


def paired(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 10, generator=g)
    b = a[:, :6] @ torch.randn(6, 7, generator=g) + 0.7 * torch.randn(n, 7, generator=g)
    return a, b


def feed(metric, a, b, sizes, index=None):
    start = 0
    for size in sizes:
        ids = None if index is None else index[start : start + size]
        metric.update(a[start : start + size], b[start : start + size], index=ids)
        start += size
    return metric.compute()


@pytest.mark.parametrize("normalize", [False, True])
def test_mutual_and_cycle_knn_match_brute_force(normalize):
    a, b = paired()
    ra, rb = (a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)) if normalize else (a, b)
    got = float(feed(MutualKNN(k=5, normalize=normalize), a, b, [1, 20, 27]))
    assert got == pytest.approx(ref_mutual_knn(ra, rb, 5), abs=1e-6)
    got = float(feed(CycleKNN(k=4, normalize=normalize), a, b, [30, 18]))
    assert got == pytest.approx(ref_cycle_knn(ra, rb, 4), abs=1e-6)


def test_mutual_knn_of_shuffled_pairs_is_about_chance():
    g = torch.Generator().manual_seed(1)
    n, k = 400, 10
    a = torch.randn(n, 16, generator=g)
    b = a[torch.randperm(n, generator=g)]  # same geometry, pairing destroyed
    got = float(feed(MutualKNN(k=k, normalize=False), a, b, [100] * 4))
    chance = k / (n - 1)
    assert abs(got - chance) < 0.015  # sd of the mean overlap is about 0.004 here
    assert float(feed(MutualKNN(k=k, normalize=False), a, a.clone(), [400])) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "metric_cls, name, kwargs",
    [
        (LCSKNN, "lcs_knn", {"k": 5}),
        (EditDistanceKNN, "edit_distance_knn", {"k": 5}),
        (CKNNA, "cknna", {"k": 6}),
        (SVCCA, "svcca", {"dim": 4}),
        (RSA, "rsa", {"distance": "euclidean", "compare": "pearson"}),
        (UnbiasedCKA, "unbiased_cka", {}),
    ],
)
def test_buffered_metric_scores_the_union_of_its_batches(metric_cls, name, kwargs):
    # The class must hand exactly the concatenated samples to its functional metric,
    # however they were batched (the score on a single batch differs).
    a, b = paired()
    whole = float(F.METRICS[name](a, b, **kwargs))
    assert float(feed(metric_cls(**kwargs), a, b, [5, 30, 13])) == pytest.approx(whole, abs=1e-6)
    assert float(F.METRICS[name](a[:24], b[:24], **kwargs)) != pytest.approx(whole, abs=1e-6)


def test_rsa_of_identical_inputs_is_one_and_reversed_pairing_is_not():
    a, _ = paired()
    assert float(feed(RSA(normalize=False), a, a.clone(), [20, 28])) == pytest.approx(1.0, abs=1e-6)
    assert float(feed(RSA(normalize=False), a, a.flip(0), [48])) < 0.5


def test_duplicate_ids_are_dropped_keeping_the_first_copy():
    a, b = paired()
    order = torch.cat([torch.arange(48), torch.tensor([0, 7])])  # padding repeats samples 0 and 7
    expected = ref_mutual_knn(a, b, 5)
    got = float(feed(MutualKNN(k=5, normalize=False), a[order], b[order], [25, 25], index=order))
    assert got == pytest.approx(expected, abs=1e-6)
    # without ids the duplicates would be scored (each copy is its twin's nearest neighbour, and
    # which copy fills a neighbour slot follows row order): refused with a clear message
    with pytest.raises(ValueError, match="identical copies"):
        feed(MutualKNN(k=5, normalize=False), a[order], b[order], [25, 25])


def test_same_id_with_different_features_is_an_error():
    a, b = paired()
    metric = MutualKNN(k=5, normalize=False)
    metric.update(a[:10], b[:10], index=torch.arange(10))
    metric.update(a[10:20], b[10:20], index=torch.arange(10))  # ids reused for other samples
    with pytest.raises(ValueError, match="same sample id have different features"):
        metric.compute()


def test_index_in_some_updates_only_is_an_error():
    a, b = paired()
    metric = MutualKNN(k=5, normalize=False)
    metric.update(a[:10], b[:10], index=torch.arange(10))
    with pytest.raises(ValueError, match="in every update or in none"):
        metric.update(a[10:20], b[10:20])
    with pytest.raises(TypeError, match="integer sample ids"):
        metric.update(a[10:20], b[10:20], index=torch.arange(10.0))
    with pytest.raises(ValueError, match="one id per sample"):
        metric.update(a[10:20], b[10:20], index=torch.arange(9))


def test_max_samples_bound_is_enforced_with_a_clear_error():
    a, b = paired()
    metric = MutualKNN(k=5, max_samples=40, normalize=False)
    metric.update(a[:40], b[:40])
    with pytest.raises(ValueError, match="past max_samples=40; raise max_samples"):
        metric.update(a[40:], b[40:])
    assert sum(x.shape[0] for x in metric.a) == 40  # the failed batch was not added
    with pytest.raises(ValueError, match="positive int"):
        MutualKNN(max_samples=0, normalize=False)


def test_buffer_on_cpu_keeps_the_buffer_on_cpu_and_the_same_value():
    a, b = paired()
    metric = MutualKNN(k=5, buffer_on_cpu=True, normalize=False)
    assert metric.compute_on_cpu
    got = float(feed(metric, a, b, [24, 24]))
    assert got == pytest.approx(ref_mutual_knn(a, b, 5), abs=1e-6)
    assert all(x.device.type == "cpu" for x in metric.a)


def test_plot_of_a_buffered_metric():
    a, b = paired()
    metric = MutualKNN(k=5, normalize=False)
    metric.update(a, b)
    fig, ax = metric.plot()
    assert ax.get_figure() is fig
    import matplotlib.pyplot as plt

    plt.close(fig)


# -- bad input: each a clear error ------------------------------------------------------------


@pytest.mark.parametrize("metric_cls", [CKA, MutualKNN, RSA])
def test_bad_batches_are_rejected_at_update(metric_cls):
    a, b = paired()
    metric = metric_cls()
    with pytest.raises(ValueError, match="same samples.*48 rows.*47"):
        metric.update(a, b[:47])
    with pytest.raises(ValueError, match=r"2-D \[batch, d\].*a\[:, None\]"):
        metric.update(a[:, 0], b)
    nan = a.clone()
    nan[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in 1 of 48 rows"):
        metric.update(nan, b)
    inf = b.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match="b contains NaN or Inf"):
        metric.update(a, inf)
    with pytest.raises(ValueError, match="a is on cpu but b is on meta"):
        metric.update(a, torch.empty(48, 7, device="meta"))
    with pytest.raises(TypeError, match="floating tensor"):
        metric.update(a.long(), b)
    with pytest.raises(TypeError, match="torch.Tensor"):
        metric.update(a.tolist(), b)
    state = metric.metric_state  # nothing from the rejected batches was kept
    assert len(state["a"]) == 0 if "a" in state else float(state["n"]) == 0


@pytest.mark.parametrize("metric", [MutualKNN(k=48, normalize=False), CycleKNN(k=60, normalize=False), CKNNA(k=48, normalize=False)])
def test_k_not_below_n_is_an_error_at_compute(metric):
    a, b = paired()
    metric.update(a, b)
    with pytest.raises(ValueError, match="k must satisfy"):
        metric.compute()


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k_is_an_error_at_construction(k):
    with pytest.raises(ValueError, match="k must be a positive int"):
        MutualKNN(k=k, normalize=False)


@pytest.mark.parametrize("metric", [CKA(normalize=False), CKA(minibatch_unbiased=True, normalize=False), UnbiasedCKA(normalize=False), CKA(kernel="rbf", sigma=1.0, normalize=False)])
def test_constant_features_are_an_error_not_nan(metric):
    a, b = paired()
    metric.update(torch.ones_like(a[:24]) * 2.0, b[:24])
    metric.update(torch.ones_like(a[24:]) * 2.0, b[24:])
    with pytest.raises(ValueError, match="constant|undefined"):
        metric.compute()


def test_compute_without_samples_is_an_error():
    for metric in (CKA(normalize=False), MutualKNN(normalize=False), CKA(minibatch_unbiased=True, normalize=False)):
        with pytest.raises(RuntimeError, match="call update"):
            metric.compute()


def test_normalize_with_an_all_zero_row_is_an_error():
    a, b = paired()
    a[5] = 0.0
    for metric in (MutualKNN(k=5, normalize=True), CKA(normalize=True)):
        with pytest.raises(ValueError, match="all-zero"):
            feed(metric, a, b, [48])


def test_forward_returns_the_batch_value_and_accumulates_within_the_bound():
    a, b = paired()
    metric = MutualKNN(k=5, max_samples=40, normalize=False)
    first = float(metric(a[:24], b[:24]))
    assert first == pytest.approx(ref_mutual_knn(a[:24], b[:24], 5), abs=1e-6)
    metric(a[24:40], b[24:40])
    assert float(metric.compute()) == pytest.approx(ref_mutual_knn(a[:40], b[:40], 5), abs=1e-6)
    with pytest.raises(ValueError, match="holds 40 samples and this batch adds 8, past max_samples=40"):
        metric(a[40:], b[40:])
