"""The median-heuristic bandwidth by blocked selection equals the median of the full distance
matrix (torch.kthvalue over every pair, and scipy's pdist), without forming that matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from prh_lightning.functional import cka
from prh_lightning.functional._bandwidth import median_bandwidth, select_ranks, triangle_blocks
from prh_lightning.functional.kernels import median_distance, rbf_kernel


def dense_median(x: torch.Tensor) -> torch.Tensor:
    """Brute force in x's dtype: the whole [n, n] squared-distance matrix (the library's formula,
    entries below its rounding error zeroed), every i < j entry, kthvalue of the two middle ranks."""
    sq = (x * x).sum(dim=1)
    total = sq[:, None] + sq[None, :]
    d2 = total - 2.0 * (x @ x.T)
    d2 = d2.masked_fill(d2 <= 16 * torch.finfo(x.dtype).eps * total, 0.0)
    iu = torch.triu_indices(len(x), len(x), offset=1)
    dist = d2[iu[0], iu[1]].sqrt()
    m = dist.numel()
    return (torch.kthvalue(dist, (m + 1) // 2).values + torch.kthvalue(dist, m // 2 + 1).values) / 2

# small blocks, buckets and cap: several counting passes before the exact selection
FORCED = {"rows": 23, "bins": 8, "cap": 50}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [300, 301])  # an even and an odd number of pairs
def test_blocked_median_equals_the_median_of_the_full_matrix(n, dtype):
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(n), dtype=dtype)
    dense = dense_median(x)  # kthvalue over all n (n - 1) / 2 distances of the [n, n] matrix
    assert median_bandwidth(x, **FORCED) == dense
    assert median_bandwidth(x) == dense
    assert median_distance(x) == dense
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert float(median_bandwidth(x, **FORCED)) == pytest.approx(np.median(pdist(x.double().numpy())), rel=rtol)


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).repeat(30, 1),  # most distances exact copies
        torch.randint(0, 3, (150, 2), generator=torch.Generator().manual_seed(1)).double(),  # few distinct values
    ],
)
def test_ties_and_repeated_values_are_selected_exactly(x):
    assert median_bandwidth(x, **FORCED) == dense_median(x)
    assert median_bandwidth(x, rows=1, bins=2, cap=1) == dense_median(x)
    assert median_distance(x) == dense_median(x)


def test_beyond_the_dense_size_matches_scipy():
    x = torch.randn(4500, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert float(median_bandwidth(x, rows=512)) == pytest.approx(np.median(pdist(x.numpy())), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_median_distance_and_rbf_kernel_bandwidth_stream_beyond_the_dense_size(dtype):
    # n = 5,000 > 4,096: several row blocks and counting passes, no [n, n] matrix for the median
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(5000, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)).to(dtype)
    expected = np.median(pdist(x.double().numpy()))  # float64, scipy
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert float(median_distance(x)) == pytest.approx(expected, rel=rtol)
    small = x[:300]
    d2 = pdist(small.double().numpy(), "sqeuclidean")
    k = rbf_kernel(small)
    iu = np.triu_indices(300, 1)
    np.testing.assert_allclose(k.double().numpy()[iu], np.exp(-d2 / (2 * np.median(np.sqrt(d2)) ** 2)), rtol=1e-5 if dtype == torch.float32 else 1e-10)


def test_median_distance_refuses_bad_input():
    with pytest.raises(ValueError, match=r"\[n, d\] tensor"):
        median_distance(torch.ones(5))
    with pytest.raises(ValueError, match=">= 2 samples"):
        median_distance(torch.ones(1, 3))


def test_no_block_holds_more_than_its_rows():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(3))
    source = triangle_blocks(x, 16)
    sizes = [v.numel() for v in source()]
    assert sum(sizes) == 200 * 199 // 2 and max(sizes) <= 16 * 199
    m = 200 * 199 // 2
    values = torch.sort(torch.from_numpy(pdist(x.numpy()) ** 2).float()).values
    got = select_ranks(source, (1, m // 3, m), (0.0, 1.0), torch.float32, x.device, bins=4, cap=10)
    torch.testing.assert_close(torch.stack(got), values[[0, m // 3 - 1, m - 1]], rtol=1e-5, atol=1e-6)


def test_rbf_cka_with_the_median_heuristic_matches_the_dense_bandwidth():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(120, 5, generator=g, dtype=torch.float64)
    b = torch.tanh(a @ torch.randn(5, 4, generator=g, dtype=torch.float64))
    # the same data with each side's bandwidth given explicitly, from scipy
    ac, bc = a - a.mean(0), b - b.mean(0)
    ka = np.exp(-squareform_sq(ac) / (2 * np.median(pdist(ac.numpy())) ** 2))
    kb = np.exp(-squareform_sq(bc) / (2 * np.median(pdist(bc.numpy())) ** 2))
    h = np.eye(120) - 1 / 120
    hsic = lambda k, l: np.sum((h @ k @ h) * (h @ l @ h))  # noqa: E731
    expected = hsic(ka, kb) / np.sqrt(hsic(ka, ka) * hsic(kb, kb))
    assert float(cka(a, b, kernel="rbf", normalize=False)) == pytest.approx(expected, rel=1e-9)


def squareform_sq(x: torch.Tensor) -> np.ndarray:
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1).numpy()


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match=">= 2 samples"):
        median_bandwidth(torch.ones(1, 3))
