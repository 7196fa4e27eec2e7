"""CKA / UnbiasedCKA Metric classes against references re-derived here (Gram-matrix form,
brute-force U-statistic), for many batchings."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchmetrics import MetricCollection

from prh_lightning.metrics import CKA, MutualKNN, UnbiasedCKA

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # compute() before update()


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    return h @ x.double() @ x.double().T @ h


def ref_linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Biased linear CKA in sample (Gram) space: <HKH, HLH> / (|HKH| |HLH|)."""
    k, l = centred_gram(a), centred_gram(b)
    return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))


def ref_rbf_cka(a: torch.Tensor, b: torch.Tensor, sigma: float) -> float:
    def gram(x):
        x = x.double()
        d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        return torch.exp(-d2 / (2 * sigma**2))

    n = a.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ gram(a) @ h, h @ gram(b) @ h
    return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))


def ref_hsic_u_statistic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) HSIC_1 as the U-statistic over ordered distinct 4-tuples (brute force).

    sum over distinct (i, j, q, r) of K_ij (L_ij + L_qr - 2 L_iq), divided by n!/(n-4)!.
    """
    n = k.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * (l[i, j] + l[q, r] - 2 * l[i, q])
        count += 1
    return total / count


def ref_minibatch_cka(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    kl = kk = ll = 0.0
    for a, b in batches:
        k, l = a.double() @ a.double().T, b.double() @ b.double().T
        kl += ref_hsic_u_statistic(k, l)
        kk += ref_hsic_u_statistic(k, k)
        ll += ref_hsic_u_statistic(l, l)
    return float(kl / (kk * ll) ** 0.5)


def paired(n: int = 60, d_a: int = 12, d_b: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d_a, generator=g)
    b = torch.tanh(a[:, :d_b] @ torch.randn(d_b, d_b, generator=g)) + 0.5 * torch.randn(n, d_b, generator=g)
    return a, b


def feed(metric, a, b, sizes):
    start = 0
    for size in sizes:
        metric.update(a[start : start + size], b[start : start + size])
        start += size
    assert start == a.shape[0]
    return metric.compute()


@pytest.mark.parametrize(
    "sizes", [[60], [1] * 60, [7, 1, 23, 2, 27], [30, 30], [59, 1]], ids=["one", "ones", "uneven", "halves", "tail1"]
)
def test_streaming_linear_cka_equals_full_batch_for_any_batching(sizes):
    a, b = paired()
    assert float(feed(CKA(normalize=False), a, b, sizes)) == pytest.approx(ref_linear_cka(a, b), abs=1e-5)


def test_streaming_cka_handles_large_offsets_and_float64_inputs():
    a, b = paired(seed=3)
    a = (a + 1e3).double()
    assert float(feed(CKA(normalize=False), a, b, [13, 20, 27])) == pytest.approx(ref_linear_cka(a, b), abs=1e-5)


def test_streaming_cka_properties():
    a, b = paired(seed=1)
    q, _ = torch.linalg.qr(torch.randn(a.shape[1], a.shape[1], generator=torch.Generator().manual_seed(5)))

    def cka(x, y):
        return float(feed(CKA(normalize=False), x, y, [25, 35]))

    base = cka(a, b)
    assert 0.0 < base < 1.0
    assert cka(a, a) == pytest.approx(1.0, abs=1e-6)
    assert cka(a @ q, b) == pytest.approx(base, abs=1e-6)  # orthogonal transform
    assert cka(3.7 * a, 0.2 * b) == pytest.approx(base, abs=1e-6)  # isotropic scaling
    assert cka(a + 5.0, b - 2.0) == pytest.approx(base, abs=1e-6)  # translation (centring)
    assert cka(b, a) == pytest.approx(base, abs=1e-6)  # symmetric


def test_streaming_cka_memory_does_not_grow_with_n():
    a, b = paired(n=200)
    metric = CKA(normalize=False)
    metric.update(a[:10], b[:10])
    sizes = {name: tuple(value.shape) for name, value in metric.metric_state.items() if torch.is_tensor(value)}
    for start in range(10, 200, 10):
        metric.update(a[start : start + 10], b[start : start + 10])
    assert {name: tuple(v.shape) for name, v in metric.metric_state.items() if torch.is_tensor(v)} == sizes
    assert sizes["aa"] == (12, 12) and sizes["ab"] == (12, 9)
    assert all(len(v) == 0 for v in metric.metric_state.values() if isinstance(v, list))  # no ids: nothing kept


def test_streaming_cka_normalize_l2_normalises_rows():
    a, b = paired(seed=2)
    expected = ref_linear_cka(a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True))
    assert float(feed(CKA(normalize=True), a, b, [11, 49])) == pytest.approx(expected, abs=1e-5)
    assert abs(expected - ref_linear_cka(a, b)) > 1e-3  # the option changes the value


def test_minibatch_unbiased_cka_matches_u_statistic_reference():
    a, b = paired(n=24, d_a=5, d_b=4, seed=4)
    sizes = [6, 8, 10]
    batches, start = [], 0
    for size in sizes:
        batches.append((a[start : start + size], b[start : start + size]))
        start += size
    got = float(feed(CKA(minibatch_unbiased=True, normalize=False), a, b, sizes))
    assert got == pytest.approx(ref_minibatch_cka(batches), abs=1e-5)
    assert got != pytest.approx(ref_linear_cka(a, b), abs=1e-3)  # a different estimator


def test_minibatch_unbiased_rejects_small_batches_and_ids():
    a, b = paired()
    metric = CKA(minibatch_unbiased=True, normalize=False)
    with pytest.raises(ValueError, match=">= 4 samples"):
        metric.update(a[:3], b[:3])
    with pytest.raises(ValueError, match="cannot remove duplicate"):
        metric.update(a[:8], b[:8], index=torch.arange(8))
    with pytest.raises(ValueError, match="kernel='linear'"):
        CKA(kernel="rbf", minibatch_unbiased=True, normalize=False)


def test_rbf_cka_is_buffered_and_matches_reference():
    a, b = paired(n=40, seed=6)
    got = float(feed(CKA(kernel="rbf", sigma=3.0, normalize=False), a, b, [9, 31]))
    assert got == pytest.approx(ref_rbf_cka(a, b, 3.0), abs=1e-5)
    with pytest.raises(ValueError, match="past max_samples=30"):
        feed(CKA(kernel="rbf", sigma=3.0, max_samples=30, normalize=False), a, b, [20, 20])


def test_unbiased_cka_matches_full_sample_u_statistic():
    a, b = paired(n=9, d_a=4, d_b=3, seed=7)
    got = float(feed(UnbiasedCKA(normalize=False), a, b, [4, 5]))
    assert got == pytest.approx(ref_minibatch_cka([(a, b)]), abs=1e-5)
    assert float(feed(CKA(unbiased=True, normalize=False), a, b, [2, 7])) == pytest.approx(got, abs=1e-6)


def test_streaming_cka_drops_padding_duplicates_in_the_last_batch():
    a, b = paired(n=40)
    metric = CKA(normalize=False)
    metric.update(a[:25], b[:25], index=torch.arange(25))
    dup = torch.tensor([3, 30])  # padding repeats samples 3 and 30 at the end of the stream
    last = torch.cat([torch.arange(25, 40), dup])
    metric.update(a[last], b[last], index=last)
    assert float(metric.compute()) == pytest.approx(ref_linear_cka(a, b), abs=1e-5)
    with_dups = ref_linear_cka(torch.cat([a, a[dup]]), torch.cat([b, b[dup]]))
    assert abs(with_dups - ref_linear_cka(a, b)) > 1e-4  # the duplicates would have changed the value


def test_streaming_cka_duplicate_outside_last_batch_is_an_error():
    a, b = paired(n=40)
    metric = CKA(normalize=False)
    metric.update(a[:20], b[:20], index=torch.arange(20))
    metric.update(a[:5], b[:5], index=torch.arange(5))
    metric.update(a[20:], b[20:], index=torch.arange(20, 40))
    with pytest.raises(ValueError, match="not in the last batch"):
        metric.compute()


def test_forward_gives_batch_value_and_keeps_global_state():
    a, b = paired()
    metric = CKA(normalize=False)
    batch_values = [float(metric(a[s : s + 20], b[s : s + 20])) for s in (0, 20, 40)]
    for s, value in zip((0, 20, 40), batch_values):
        assert value == pytest.approx(ref_linear_cka(a[s : s + 20], b[s : s + 20]), abs=1e-5)
    assert float(metric.compute()) == pytest.approx(ref_linear_cka(a, b), abs=1e-5)


def test_reset_allows_new_feature_sizes_and_changed_sizes_are_an_error():
    a, b = paired()
    metric = CKA(normalize=False)
    metric.update(a[:10], b[:10])
    with pytest.raises(ValueError, match="feature sizes changed"):
        metric.update(a[10:20, :5], b[10:20])
    metric.reset()
    assert float(feed(metric, a[:, :5], b, [60])) == pytest.approx(ref_linear_cka(a[:, :5], b), abs=1e-5)


def test_metric_collection_of_streaming_and_buffered_metrics():
    a, b = paired()
    collection = MetricCollection({"cka": CKA(normalize=False), "ucka": UnbiasedCKA(normalize=False), "mknn": MutualKNN(k=5, normalize=False)})
    for s in range(0, 60, 15):
        collection.update(a[s : s + 15], b[s : s + 15])
    out = collection.compute()
    assert float(out["cka"]) == pytest.approx(ref_linear_cka(a, b), abs=1e-5)
    assert 0.0 <= float(out["mknn"]) <= 1.0
    assert float(out["ucka"]) < float(out["cka"])  # unbiased estimator removes the positive bias
    collection.reset()
    with pytest.raises(RuntimeError, match="call update"):
        collection["cka"].compute()


def test_plot_returns_figure_for_values_over_epochs():
    a, b = paired()
    metric = CKA(normalize=False)
    values = []
    for s in range(0, 60, 20):
        metric.update(a[s : s + 20], b[s : s + 20])
        values.append(metric.compute())
    fig, ax = metric.plot(values)
    assert len(ax.lines) >= 1 and fig is ax.get_figure()
    import matplotlib.pyplot as plt

    plt.close(fig)
