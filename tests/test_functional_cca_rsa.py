"""SVCCA against numpy QR/SVD and sklearn; RSA and RDMs against scipy."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform
from scipy.stats import kendalltau, pearsonr, spearmanr

from prh_lightning.functional import rdm, rsa, svcca


# These tests check each formula on the features as given; the default row normalisation
# (normalize=True in every entry point) is tested in test_numerics.py.
rsa = functools.partial(rsa, normalize=False)
svcca = functools.partial(svcca, normalize=False)


def _rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def pair():
    a = _rand(60, 12, 0)
    b = a @ _rand(12, 9, 1) + 0.5 * _rand(60, 9, 2)
    return a, b


def np_top_directions(x, dim):
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    u, _, _ = np.linalg.svd(z, full_matrices=False)
    return u[:, :dim]


def np_svcca(a, b, dim):
    ua, ub = np_top_directions(a, dim), np_top_directions(b, dim)
    qa, _ = np.linalg.qr(ua - ua.mean(0))
    qb, _ = np.linalg.qr(ub - ub.mean(0))
    return np.linalg.svd(qa.T @ qb, compute_uv=False).mean()


def test_svcca_matches_numpy_qr_svd(pair):
    a, b = pair
    assert float(svcca(a, b, dim=5)) == pytest.approx(np_svcca(a.numpy(), b.numpy(), 5), rel=1e-9)


def test_svcca_close_to_sklearn_cca(pair):
    from sklearn.cross_decomposition import CCA

    a, b = pair
    ua, ub = np_top_directions(a.numpy(), 4), np_top_directions(b.numpy(), 4)
    cca = CCA(n_components=4, max_iter=5000, tol=1e-12, scale=False).fit(ua, ub)
    xa, xb = cca.transform(ua, ub)
    sk = np.mean([np.corrcoef(xa[:, i], xb[:, i])[0, 1] for i in range(4)])
    assert float(svcca(a, b, dim=4)) == pytest.approx(sk, abs=1e-3)  # sklearn's CCA is iterative


def test_svcca_properties(pair):
    a, b = pair
    assert float(svcca(a, a, dim=5)) == pytest.approx(1.0, abs=1e-9)
    assert float(svcca(a, b, dim=5)) == pytest.approx(float(svcca(b, a, dim=5)), rel=1e-9)
    # deterministic: exact SVD, no random sketch
    assert float(svcca(a.float(), b.float(), dim=5)) == float(svcca(a.float(), b.float(), dim=5))
    # constant (dead) features are ignored rather than producing NaN
    padded = torch.cat([a, torch.zeros(60, 3, dtype=a.dtype)], dim=1)
    assert float(svcca(padded, b, dim=5)) == pytest.approx(float(svcca(a, b, dim=5)), rel=1e-9)


def test_svcca_rejects_dim_above_rank(pair):
    a, b = pair
    with pytest.raises(ValueError, match="exceeds the rank"):
        svcca(a, b, dim=10)  # b has 9 features
    with pytest.raises(ValueError, match="exceeds the rank"):
        svcca(torch.ones(60, 12, dtype=torch.float64), b, dim=2)
    with pytest.raises(ValueError, match="positive int"):
        svcca(a, b, dim=0)


@pytest.mark.parametrize("distance", ["correlation", "cosine", "euclidean"])
def test_rdm_matches_scipy_pdist(pair, distance):
    a, _ = pair
    np.testing.assert_allclose(rdm(a, distance).numpy(), squareform(pdist(a.numpy(), distance)), atol=1e-12)


@pytest.mark.parametrize("compare", ["spearman", "pearson", "kendall"])
@pytest.mark.parametrize("distance", ["correlation", "euclidean"])
def test_rsa_matches_scipy(pair, distance, compare):
    a, b = pair
    u, v = pdist(a.numpy(), distance), pdist(b.numpy(), distance)
    ref = {"spearman": spearmanr, "pearson": pearsonr, "kendall": kendalltau}[compare](u, v).statistic
    assert float(rsa(a, b, distance=distance, compare=compare)) == pytest.approx(ref, rel=1e-9)


def test_rsa_spearman_with_ties_matches_scipy():
    # Integer features on a small grid give many tied distances.
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 3, (25, 3), generator=g).double()
    b = torch.randint(0, 3, (25, 2), generator=g).double()
    u, v = pdist(a.numpy(), "euclidean"), pdist(b.numpy(), "euclidean")
    assert float(rsa(a, b, "euclidean", "spearman")) == pytest.approx(spearmanr(u, v).statistic, rel=1e-9)
    assert float(rsa(a, b, "euclidean", "kendall")) == pytest.approx(kendalltau(u, v).statistic, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distance", ["euclidean", "correlation"])
def test_rsa_with_duplicate_rows_matches_scipy_in_any_row_order(dtype, distance):
    # Identical rows must give exactly tied dissimilarities wherever they sit; a Gram-based RDM can
    # round the same row differently at different offsets (seen on an AVX-512 machine: Spearman
    # 0.018 instead of 0.324 at n = 5). scipy's pdist works on the rows directly.
    g = torch.Generator().manual_seed(2)
    for n, d in [(5, 4), (40, 33), (300, 768)]:
        a = torch.randn(n, d, generator=g, dtype=dtype)
        b = a + torch.randn(n, d, generator=g, dtype=dtype)
        b[n - 1] = b[n - 2]
        b[1] = b[n - 2]
        for perm in (torch.arange(n), torch.randperm(n, generator=g)):
            bp = b[perm]
            ref = spearmanr(pdist(a.double().numpy(), distance), pdist(bp.double().numpy(), distance)).statistic
            # float32: distinct distances closer than float32 rounding may swap ranks (n = 300: 1.5e-5)
            tol = 1e-9 if dtype == torch.float64 else 1e-4
            assert float(rsa(a, bp, distance, "spearman", normalize=False)) == pytest.approx(ref, rel=tol, abs=tol)


def test_rsa_symmetric_and_one_for_identical(pair):
    a, b = pair
    assert float(rsa(a, b)) == pytest.approx(float(rsa(b, a)), rel=1e-12)
    assert float(rsa(a, a)) == pytest.approx(1.0)


def test_rsa_bad_inputs(pair):
    a, b = pair
    zero_row = a.clone()
    zero_row[5] = 0
    with pytest.raises(ValueError, match="zero-norm"):
        rsa(zero_row, b, distance="cosine")
    with pytest.raises(ValueError, match="all dissimilarities equal"):
        rsa(torch.eye(10, dtype=torch.float64), b[:10], distance="euclidean", compare="pearson")
    with pytest.raises(ValueError, match="distance must be one of"):
        rsa(a, b, distance="manhattan")
    with pytest.raises(ValueError, match="compare must be one of"):
        rsa(a, b, compare="cosine")
    with pytest.raises(ValueError, match="at least 3"):
        rsa(a[:2], b[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("ties", [False, True])
def test_rankdata_matches_scipy(dtype, ties):
    # float32/float64 on CPU take the numpy path, float16 the torch.sort path
    from scipy.stats import rankdata as scipy_rankdata

    from prh_lightning.functional.utils import rankdata

    g = torch.Generator().manual_seed(5)
    v = torch.randint(0, 40, (500,), generator=g).to(dtype) if ties else torch.randn(500, generator=g).to(dtype)
    got = rankdata(v)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.double().numpy(), scipy_rankdata(v.double().numpy()))


def test_rsa_matrix_with_and_without_ties_matches_scipy():
    # the ranked state skips centring when an RDM has no ties; with ties it takes the general path
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (30, 3), generator=g).double()]
    ys = [torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randint(0, 2, (30, 4), generator=g).double()]
    from prh_lightning import alignment_matrix

    got = alignment_matrix(xs, ys, metric="rsa", distance="euclidean", normalize=False)
    ref = [[spearmanr(pdist(x.numpy()), pdist(y.numpy())).statistic for y in ys] for x in xs]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9)
