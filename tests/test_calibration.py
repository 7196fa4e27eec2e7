"""calibrate() against the paper's formulas applied in the test to a brute-force loop that
rescores every layer pair under the same explicit permutations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prh_lightning.calibration import calibrate
from prh_lightning.functional import METRICS


def _layers(seed, n=48, count=2):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return [base @ torch.randn(4, 5, generator=g, dtype=torch.float64) + torch.randn(n, 5, generator=g, dtype=torch.float64) for _ in range(count)]


def _paper(observed, null, alpha, high):
    K = len(null)
    pooled = np.sort(np.concatenate([[observed], null]))
    tau = pooled[math.ceil((1 - alpha) * (K + 1)) - 1]
    p = (1 + np.sum(null >= observed)) / (K + 1)
    cal = min(max((observed - tau) / (high - tau), 0.0), 1.0)
    return tau, p, cal


@pytest.mark.parametrize(("metric", "kw"), [("mutual_knn", {"k": 5}), ("cka", {}), ("cknna", {"k": 5}), ("rsa", {}), ("svcca", {"dim": 3})])
def test_matches_a_brute_force_loop_over_the_same_permutations(metric, kw):
    xs, ys = _layers(0), _layers(0)[:1] + _layers(1)[:1]
    g = torch.Generator().manual_seed(3)
    perms = torch.stack([torch.randperm(48, generator=g) for _ in range(30)])
    out = calibrate(xs, ys, metric, permutations=perms, alpha=0.1, aggregate="max", **kw)
    fn = METRICS[metric]
    high = {"cknna": None}.get(metric, 1.0)
    brute_null = np.array([[[float(fn(x, y[p], **kw)) for y in ys] for x in xs] for p in perms])
    raw = np.array([[float(fn(x, y, **kw)) for y in ys] for x in xs])
    np.testing.assert_allclose(out.raw.numpy(), raw, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(out.null.numpy(), brute_null, rtol=1e-6, atol=1e-9)
    if high is not None:
        for i in range(2):
            for j in range(2):
                tau, p, cal = _paper(raw[i, j], brute_null[:, i, j], 0.1, high)
                assert float(out.tau[i, j]) == pytest.approx(tau, rel=1e-6, abs=1e-9)
                assert float(out.p_value[i, j]) == pytest.approx(p)
                assert float(out.calibrated[i, j]) == pytest.approx(cal, rel=1e-6, abs=1e-9)
        tau, p, cal = _paper(raw.max(), brute_null.reshape(30, -1).max(axis=1), 0.1, high)
        assert out.aggregate.p_value == pytest.approx(p)
        assert out.aggregate.calibrated == pytest.approx(cal, rel=1e-6, abs=1e-9)
        assert out.aggregate.null_mean == pytest.approx(brute_null.reshape(30, -1).max(axis=1).mean(), rel=1e-6)


def test_rotated_copy_gets_the_smallest_p_value_and_a_high_calibrated_score():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(80, 6, generator=g)
    q = torch.linalg.qr(torch.randn(6, 6, generator=g)).Q
    out = calibrate([a], [a @ q], "mutual_knn", n_permutations=49, generator=g, k=5)
    assert out.aggregate.p_value == pytest.approx(1 / 50)
    assert out.aggregate.calibrated > 0.9


def test_independent_features_calibrate_to_zero_with_roughly_uniform_p():
    ps, cal = [], []
    for seed in range(20):
        g = torch.Generator().manual_seed(100 + seed)
        a, b = torch.randn(60, 5, generator=g), torch.randn(60, 5, generator=g)
        out = calibrate([a], [b], "cka", n_permutations=39, generator=g)
        ps.append(out.aggregate.p_value)
        cal.append(out.aggregate.calibrated)
    assert np.mean(cal) < 0.05 and np.median(cal) == 0.0
    assert 0.3 < np.mean(ps) < 0.7  # uniform on (0, 1]: mean 0.5
    assert sum(p <= 0.05 for p in ps) <= 3


def test_best_of_layers_null_is_inflated_relative_to_a_single_cell():
    # 10 x 10 unrelated random layers: the max over 100 cells of each permuted matrix sits far
    # above any single cell's chance level, so aggregation-aware calibration differs from per cell.
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(50, 4, generator=g) for _ in range(10)]
    ys = [torch.randn(50, 4, generator=g) for _ in range(10)]
    out = calibrate(xs, ys, "mutual_knn", n_permutations=30, generator=g, k=5)
    assert out.aggregate.null_mean > float(out.null_mean.max())
    assert out.aggregate.p_value > float(out.p_value.min())


def test_bad_permutations_are_refused():
    a = torch.randn(10, 3)
    with pytest.raises(ValueError, match="permutation"):
        calibrate([a], [a], "cka", permutations=torch.zeros(3, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="aggregate"):
        calibrate([a], [a], "cka", aggregate="median")


# -- the batched nulls against independent dense references ------------------------------------


def _np_unit_rows(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_topk_mask(G, k, exclude_self):
    G = G.copy()
    if exclude_self:
        np.fill_diagonal(G, -np.inf)
    mask = np.zeros_like(G)
    np.put_along_axis(mask, np.argsort(-G, axis=1, kind="stable")[:, :k], 1.0, axis=1)
    return mask


def _np_hsic(K, L, unbiased):
    n = K.shape[0]
    if not unbiased:
        return float(((K - K.mean(axis=1, keepdims=True)) * (L - L.mean(axis=1, keepdims=True)).T).sum())
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    value = (Kt * Lt.T).sum() + Kt.sum() * Lt.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (Kt.sum(axis=0) @ Lt.sum(axis=1))
    return float(value / (n * (n - 3)))


def _np_cknna(a, b, k, unbiased):
    """CKNNA (Huh et al. 2024) from dense [n, n] masks, rows L2-normalised first."""
    K, L = _np_unit_rows(a) @ _np_unit_rows(a).T, _np_unit_rows(b) @ _np_unit_rows(b).T
    mask_k, mask_l = _np_topk_mask(K, k, unbiased), _np_topk_mask(L, k, unbiased)

    def sim(P, Q, M):
        return _np_hsic(M * P, M * Q, unbiased)

    return sim(K, L, mask_k * mask_l) / np.sqrt(sim(K, K, mask_k) * sim(L, L, mask_l))


def _np_mutual_knn(a, b, k):
    K, L = _np_unit_rows(a) @ _np_unit_rows(a).T, _np_unit_rows(b) @ _np_unit_rows(b).T
    return float((_np_topk_mask(K, k, True) * _np_topk_mask(L, k, True)).sum() / (K.shape[0] * k))


def _np_cka(a, b, unbiased):
    a, b = _np_unit_rows(a), _np_unit_rows(b)
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    K, L = a @ a.T, b @ b.T
    if not unbiased:
        return float((K * L).sum() / np.sqrt((K * K).sum() * (L * L).sum()))
    return _np_hsic(K, L, True) / np.sqrt(_np_hsic(K, K, True) * _np_hsic(L, L, True))


_REFERENCES = {
    "mutual_knn": lambda a, b: _np_mutual_knn(a, b, 4),
    "cknna": lambda a, b: _np_cknna(a, b, 4, True),
    "cknna_biased": lambda a, b: _np_cknna(a, b, 4, False),
    "cka": lambda a, b: _np_cka(a, b, False),
    "unbiased_cka": lambda a, b: _np_cka(a, b, True),
}
_CALLS = {
    "mutual_knn": ("mutual_knn", {"k": 4}),
    "cknna": ("cknna", {"k": 4}),
    "cknna_biased": ("cknna", {"k": 4, "unbiased": False}),
    "cka": ("cka", {}),
    "unbiased_cka": ("unbiased_cka", {}),
}


@pytest.mark.parametrize("small_blocks", [False, True])
@pytest.mark.parametrize("case", sorted(_REFERENCES))
def test_batched_nulls_match_dense_references_permutation_by_permutation(case, small_blocks, monkeypatch):
    # small_blocks: binary search instead of the dense slot map, one permutation per batch of
    # moved edges, many triangle chunks and a partial last batch in the CKA null
    import importlib

    if small_blocks:
        edge_null = importlib.import_module("prh_lightning.functional._edge_null")
        kernels = importlib.import_module("prh_lightning.functional.kernels")
        monkeypatch.setattr(edge_null, "_DENSE_MAP_BYTES", 0)
        monkeypatch.setattr(edge_null, "_QUERY_BUDGET", 1)
        monkeypatch.setattr(edge_null, "_TABLE_BYTES", 1)  # one y layer per union table
        monkeypatch.setattr(kernels, "_NULL_CHUNK", 97)
        monkeypatch.setattr(kernels, "_NULL_BATCH", 3)
    g = torch.Generator().manual_seed(11)
    n = 40
    shared = torch.randn(n, 3, generator=g, dtype=torch.float64)
    xs = [shared @ torch.randn(3, 6, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    ys = [shared @ torch.randn(3, 5, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(7)])
    metric, kw = _CALLS[case]
    out = calibrate(xs, ys, metric, permutations=perms, **kw)
    ref = _REFERENCES[case]
    raw = np.array([[ref(x.numpy(), y.numpy()) for y in ys] for x in xs])
    null = np.array([[[ref(x.numpy(), y[p].numpy()) for y in ys] for x in xs] for p in perms])
    np.testing.assert_allclose(out.raw.numpy(), raw, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.null.numpy(), null, rtol=1e-9, atol=1e-12)
    assert np.ptp(null) > 0.01  # the permutations do move the scores


# -- the CKA null within a memory budget ------------------------------------------------------


def _cka_null_under_budget(metric, xs, ys, perms, max_memory):
    """The CKA null as calibrate runs it, from layers prepared under ``max_memory``."""
    from prh_lightning.functional._plan import LayerContext, check_layers, get_plan, permuted_scores, prepare_layers

    plan = get_plan(metric)
    options = plan.bind({})
    names_x, names_y = [f"x{i}" for i in range(len(xs))], [f"y{i}" for i in range(len(ys))]
    n, dtype, device = check_layers(xs, ys, names_x, names_y)
    ctx = LayerContext(dtype, None, n, len(xs) + len(ys), device, max_memory)
    sx = prepare_layers(plan, xs, names_x, options, True, None, ctx)
    sy = prepare_layers(plan, ys, names_y, options, True, None, ctx)
    return permuted_scores(plan, sx, sy, perms, options)


def _smallest_grouped_budget(n, lx, ly, itemsize):
    """The smallest budget (bytes) at which the CKA null still builds tables: one layer per group."""
    from prh_lightning.functional.kernels import _null_layout

    low, high = 1, 2**40
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if _null_layout(n, lx, ly, itemsize, mid) is not None else (mid + 1, high)
    return low


def _budget_layers(seed, n, dtype):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 3, generator=g, dtype=torch.float64)
    make = lambda d: (shared @ torch.randn(3, d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    return [make(6), make(4), make(7)], [make(5), make(8), make(3)], torch.stack([torch.randperm(n, generator=g) for _ in range(6)])


@pytest.mark.parametrize("metric", ["cka", "unbiased_cka"])
def test_cka_null_in_one_layer_groups_and_streamed_fallback_match_float64(metric, monkeypatch):
    # a budget that fits exactly one x triangle and one y table per group, and one byte less (no
    # table at all: permuted features, streamed pair sums) give the numbers of the
    # ungrouped null and of numpy float64 CKA of y's permuted rows, permutation by permutation
    from prh_lightning.functional import kernels
    from prh_lightning.functional.kernels import _null_layout

    monkeypatch.setattr(kernels, "_NULL_SUM", 64)  # products over runs of 64 entries and a remainder
    n = 45
    xs, ys, perms = _budget_layers(3, n, torch.float64)
    smallest = _smallest_grouped_budget(n, len(xs), len(ys), 8)
    assert _null_layout(n, len(xs), len(ys), 8, smallest)[:2] == (1, 1)
    assert _null_layout(n, len(xs), len(ys), 8, smallest - 1) is None
    tables = []  # y layers per table, per group pass
    inner = kernels._permuted_inner
    monkeypatch.setattr(kernels, "_permuted_inner", lambda tri, diag, table, *a: tables.append(table.shape[1]) or inner(tri, diag, table, *a))
    whole = _cka_null_under_budget(metric, xs, ys, perms, None)
    assert tables == [3]
    grouped = _cka_null_under_budget(metric, xs, ys, perms, smallest)
    assert tables == [3] + [1] * 9  # 3 x groups x 3 y groups
    streamed = _cka_null_under_budget(metric, xs, ys, perms, smallest - 1)
    assert len(tables) == 10  # no table built
    ref = _REFERENCES[metric]
    expected = np.array([[[ref(x.numpy(), y[p].numpy()) for y in ys] for x in xs] for p in perms])
    for out in (whole, grouped, streamed):
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grouped.numpy(), whole.numpy(), rtol=1e-12, atol=1e-14)
    assert np.ptp(expected) > 0.01


def test_cka_null_allocations_stay_within_the_budget(monkeypatch):
    # float32 layers (4-byte tables): with one layer per group, no op output of the null is larger
    # than one y layer's packed triangle, and none exceeds the budget; float32 numbers still match
    # numpy float64. Gather chunks of 97 triangle entries (products over runs of 16): as at large
    # n, where the gather buffers (65,536 entries) are far smaller than a table
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LargestOutput(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.nbytes = max([self.nbytes, *sizes])
            return out

    from prh_lightning.functional import kernels

    monkeypatch.setattr(kernels, "_NULL_CHUNK", 97)
    monkeypatch.setattr(kernels, "_NULL_SUM", 16)
    n = 96
    xs, ys, perms = _budget_layers(4, n, torch.float32)
    budget = _smallest_grouped_budget(n, len(xs), len(ys), 4)
    with LargestOutput() as unbounded:
        _cka_null_under_budget("cka", xs, ys, perms, None)
    with LargestOutput() as largest:
        null = _cka_null_under_budget("cka", xs, ys, perms, budget)
    table = n * (n + 1) // 2 * 4  # one y layer's upper triangle with its diagonal, float32
    assert unbounded.nbytes >= 3 * table  # the default budget holds all y layers in one table
    assert largest.nbytes <= min(budget, table)
    expected = np.array([[[_np_cka(x.double().numpy(), y[p].double().numpy(), False) for y in ys] for x in xs] for p in perms])
    np.testing.assert_allclose(null.numpy(), expected, rtol=0, atol=1e-7)


# -- calibrate(max_memory=...) reaches the CKA null ----------------------------------------------


def _spy_on_the_cka_null(monkeypatch):
    """Record, per call of the CKA null, the budget its prepared states carry and the y layers of
    each table it builds."""
    from prh_lightning.functional import kernels

    seen = {"budgets": [], "tables": []}
    null, inner = kernels._cka_null, kernels._permuted_inner

    def spy_null(xs, ys, perms, **options):
        seen["budgets"].append({state.budget for state in xs + ys})
        return null(xs, ys, perms, **options)

    def spy_inner(tri, diag, table, *rest):
        seen["tables"].append(table.shape[1])
        return inner(tri, diag, table, *rest)

    monkeypatch.setattr(kernels, "_cka_null", spy_null)
    monkeypatch.setattr(kernels, "_permuted_inner", spy_inner)
    return seen


@pytest.mark.parametrize("metric", ["cka", "unbiased_cka"])
def test_calibrate_max_memory_groups_or_streams_the_null_with_the_same_numbers(metric, monkeypatch):
    # the budget travels from calibrate to the null: at the smallest grouped budget every table
    # holds one y layer, one byte less builds none (streamed); the raw scores, null, p-values and
    # calibrated scores stay those of the unbounded call and of numpy float64 CKA of permuted rows
    n = 45
    xs, ys, perms = _budget_layers(3, n, torch.float64)
    smallest = _smallest_grouped_budget(n, len(xs), len(ys), 8)
    seen = _spy_on_the_cka_null(monkeypatch)
    whole = calibrate(xs, ys, metric, permutations=perms)
    assert seen == {"budgets": [{None}], "tables": [3]}
    grouped = calibrate(xs, ys, metric, permutations=perms, max_memory=smallest)
    assert seen["budgets"][1] == {smallest} and seen["tables"][1:] == [1] * 9
    streamed = calibrate(xs, ys, metric, permutations=perms, max_memory=smallest - 1)
    assert seen["budgets"][2] == {smallest - 1} and len(seen["tables"]) == 10
    ref = _REFERENCES[metric]
    raw = np.array([[ref(x.numpy(), y.numpy()) for y in ys] for x in xs])
    null = np.array([[[ref(x.numpy(), y[p].numpy()) for y in ys] for x in xs] for p in perms])
    assert np.ptp(null) > 0.01
    for out in (whole, grouped, streamed):
        np.testing.assert_allclose(out.raw.numpy(), raw, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out.null.numpy(), null, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(out.p_value.numpy(), ((1 + (null >= raw).sum(axis=0)) / (len(perms) + 1)))
        np.testing.assert_allclose(out.calibrated.numpy(), whole.calibrated.numpy(), rtol=1e-9, atol=1e-12)
        assert out.aggregate.p_value == whole.aggregate.p_value


def test_calibrate_reads_max_memory_like_alignment_matrix(monkeypatch):
    seen = _spy_on_the_cka_null(monkeypatch)
    xs, ys, perms = _budget_layers(5, 30, torch.float32)
    calibrate(xs, ys, "cka", permutations=perms, max_memory="2MiB")
    calibrate(xs, ys, "cka", permutations=perms, max_memory="3.5MB")
    assert seen["budgets"] == [{2 * 2**20}, {3_500_000}]
    with pytest.raises(ValueError, match="max_memory"):
        calibrate(xs, ys, "cka", permutations=perms, max_memory="lots")
    with pytest.raises(ValueError, match="max_memory"):
        calibrate(xs, ys, "cka", permutations=perms, max_memory=0)


# -- the k-NN and CKNNA nulls within a memory budget ------------------------------------------


class _LargestOutput:
    """Context manager: the largest tensor (bytes) any torch op returns inside it."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        owner = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                sizes = [t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
                owner.nbytes = max([owner.nbytes, *sizes])
                return out

        self.nbytes, self._mode = 0, Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@pytest.mark.parametrize("case", ["mutual_knn", "cknna", "cknna_biased"])
def test_edge_nulls_keep_within_max_memory_with_the_dense_numbers(case, monkeypatch):
    # 3 x 3 layers, n = 60, k = 4, 50 permutations. Without a budget the null moves the edges of all
    # x layers under all 50 permutations at once (hundreds of kB per op); with max_memory = 100 kB it
    # must split x layers, y layers and permutations so that no op returns more than half the
    # budget, and still give the numpy dense-mask numbers permutation by permutation
    from prh_lightning.functional import _edge_null

    groups_seen = []
    layer_groups = _edge_null.layer_groups
    monkeypatch.setattr(_edge_null, "layer_groups", lambda *a: groups_seen.append(a[-1]) or layer_groups(*a))
    if case != "mutual_knn":
        import importlib

        monkeypatch.setattr(importlib.import_module("prh_lightning.functional.cknna"), "layer_groups", _edge_null.layer_groups)
    g = torch.Generator().manual_seed(21)
    n, budget = 60, 100_000
    shared = torch.randn(n, 3, generator=g, dtype=torch.float64)
    make = lambda d: shared @ torch.randn(3, d, generator=g, dtype=torch.float64) + 0.4 * torch.randn(n, d, generator=g, dtype=torch.float64)  # noqa: E731
    xs, ys = [make(6), make(5), make(7)], [make(4), make(6), make(5)]
    perms = torch.stack([torch.randperm(n, generator=g) for _ in range(50)])
    metric, kw = _CALLS[case]
    with _LargestOutput() as unbounded:
        whole = calibrate(xs, ys, metric, permutations=perms, **kw)
    with _LargestOutput() as bounded:
        small = calibrate(xs, ys, metric, permutations=perms, max_memory=budget, **kw)
    assert groups_seen[0] is None and budget in groups_seen  # the budget reached the null
    assert unbounded.nbytes > budget
    assert bounded.nbytes <= budget // 2
    ref = _REFERENCES[case]
    null = np.array([[[ref(x.numpy(), y[p].numpy()) for y in ys] for x in xs] for p in perms])
    assert np.ptp(null) > 0.01
    for out in (whole, small):
        np.testing.assert_allclose(out.null.numpy(), null, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(out.raw.numpy(), [[ref(x.numpy(), y.numpy()) for y in ys] for x in xs], rtol=1e-9, atol=1e-12)
