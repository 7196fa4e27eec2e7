"""Alignment at large n: memory budgets (max_memory), the sorted-key k-NN / CKNNA lookups and
linear CKA from feature-space statistics. References are float64 formulas written here or in
tests/test_numerics.py; peak memory is measured in a child process (ru_maxrss)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_numerics import K, _cka, reference

from prh_lightning import alignment_matrix
from prh_lightning.functional._linear_cka import feature_space_cka
from prh_lightning.functional._plan import LayerContext, parse_memory


def _layers(n, dims, seed, dtype=torch.float32, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return [
        (base @ torch.randn(6, d, generator=g, dtype=torch.float64) + torch.randn(n, d, generator=g, dtype=torch.float64) + offset).to(dtype)
        for d in dims
    ]


@pytest.mark.parametrize(
    "text, expected",
    [("4GB", 4 * 10**9), ("512MB", 512 * 10**6), ("512 MiB", 2**29), ("1.5GiB", 3 * 2**29), ("100kb", 10**5), (123, 123), (None, None)],
)
def test_memory_budgets_are_read_as_bytes(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["4 parsecs", "GB", "-1GB", 0, -5, True, 1.5, "1.2.3GB"])
def test_bad_memory_budgets_are_refused(bad):
    with pytest.raises((ValueError, TypeError), match="max_memory"):
        parse_memory(bad)


def test_a_budget_too_small_for_one_row_is_refused_with_the_bytes_needed():
    x = _layers(5000, [4], 0)
    with pytest.raises(ValueError, match="max_memory=.*too small.*needs"):
        alignment_matrix(x, x, metric="mutual_knn", max_memory="10KB")


def test_the_budget_sets_the_blocks_and_turns_the_whole_gram_off():
    ctx = LayerContext(torch.float32, None, 10_000, 2, torch.device("cpu"), "40MB")
    assert ctx.block(10_000, 24) == 40 * 10**6 // (24 * 10_000)
    assert ctx.gram(10_000) is None  # 400 MB > half the budget
    roomy = LayerContext(torch.float32, None, 1_000, 2, torch.device("cpu"), "40MB")
    assert roomy.gram(1_000).shape == (1_000, 1_000)


CASES = ["mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cknna", "cka", "unbiased_cka"]


@pytest.mark.parametrize("case", CASES)
def test_a_tight_budget_streams_small_blocks_and_keeps_every_cell_equal_to_the_float64_reference(case):
    # 150 rows: a 1 MB budget allows blocks of a few rows and no whole Gram.
    xs, ys = _layers(150, [10, 7], 1, offset=3.0), _layers(150, [5], 2)
    kw = {"k": K} if case in ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cknna") else {}
    tight = alignment_matrix(xs, ys, metric=case, max_memory="100KB", **kw)
    for i, a in enumerate(xs):
        assert float(tight[i, 0]) == pytest.approx(reference(case, a, ys[0]), abs=2e-6), (case, i)


@pytest.mark.parametrize("case", ["mutual_knn", "cknna"])
def test_sorted_key_lookups_match_the_reference_on_tied_integer_features(case):
    # distinct integer rows, unnormalised: many exact ties of inner products, broken by lower index
    g = torch.Generator().manual_seed(3)
    a = torch.unique(torch.randint(0, 4, (120, 4), generator=g), dim=0)[:70].double()
    b = torch.unique(torch.randint(0, 4, (120, 5), generator=g), dim=0)[:70].double()
    assert len(a) == len(b) == 70
    got = alignment_matrix([a, b], [b, a], metric=case, k=K, normalize=False, max_memory="200KB")
    for i, x in enumerate([a, b]):
        for j, y in enumerate([b, a]):
            assert float(got[i, j]) == pytest.approx(reference(case, x, y, normalize=False), abs=1e-10)


@pytest.mark.parametrize("unbiased", [False, True])
def test_feature_space_linear_cka_equals_the_centred_kernel_formula(unbiased):
    xs, ys = _layers(300, [9, 4], 4, torch.float64, offset=50.0), _layers(300, [6], 5, torch.float64)
    centred = lambda x: x - x.mean(0)  # noqa: E731
    got = feature_space_cka([centred(x) for x in xs], [centred(y) for y in ys], unbiased)
    for i, x in enumerate(xs):
        a, b = centred(x).numpy(), centred(ys[0]).numpy()
        assert float(got[i, 0]) == pytest.approx(_cka(a @ a.T, b @ b.T, unbiased), abs=1e-10)


@pytest.mark.parametrize("metric, kw", [("cka", {}), ("cka", {"unbiased": True}), ("unbiased_cka", {}), ("cka", {"eps": 1e-3})])
def test_linear_cka_at_large_n_takes_the_feature_space_path_and_equals_the_kernel_path(metric, kw):
    from prh_lightning.functional._plan import score_layers

    xs, ys = _layers(5000, [12, 3], 6, offset=7.0), _layers(5000, [8], 7)
    fast = alignment_matrix(xs, ys, metric=metric, **kw)
    kernel = score_layers(metric, xs, ys, True, None, None, **kw)  # the registered (kernel) plan
    assert torch.allclose(fast.double(), kernel, atol=1e-6, rtol=0)


def _child(code: str) -> dict:
    script = textwrap.dedent(
        """
        import json, resource, torch
        torch.set_num_threads(2)
        from prh_lightning import alignment_matrix
        def peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        """
    ) + textwrap.dedent(code)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_knn_metrics_and_cknna_at_n_20000_stay_far_below_an_n_by_n_matrix():
    # n x n float32 would be 1.6 GB (and the former masks 400 MB + 3.6 GB); the budget is 128 MB.
    got = _child(
        """
        g = torch.Generator().manual_seed(0)
        n = 20_000
        z = torch.randn(n, 8, generator=g)
        a, b = z @ torch.randn(8, 16, generator=g), z @ torch.randn(8, 16, generator=g) + torch.randn(n, 16, generator=g)
        alignment_matrix([a[:100]], [b[:100]], metric="cknna")  # warm up the allocator and libraries
        base = peak()
        m = float(alignment_matrix([a], [b], metric="mutual_knn", max_memory="128MB")[0, 0])
        c = float(alignment_matrix([a], [b], metric="cknna", max_memory="128MB")[0, 0])
        print(json.dumps({"extra": peak() - base, "mutual": m, "cknna": c}))
        """
    )
    assert got["extra"] < 500 * 2**20, got
    assert 0.0 < got["mutual"] < 1.0 and 0.0 < got["cknna"] < 1.0


def test_linear_cka_at_n_200000_needs_no_n_by_n_memory():
    got = _child(
        """
        g = torch.Generator().manual_seed(0)
        n = 200_000
        z = torch.randn(n, 4, generator=g)
        a, b = z @ torch.randn(4, 8, generator=g), z @ torch.randn(4, 8, generator=g) + torch.randn(n, 8, generator=g)
        base = peak()
        v = float(alignment_matrix([a], [b], metric="cka", normalize=False, max_memory="64MB")[0, 0])
        ad, bd = (a.double() - a.double().mean(0)), (b.double() - b.double().mean(0))
        ref = float((ad.T @ bd).square().sum() / ((ad.T @ ad).norm() * (bd.T @ bd).norm()))
        print(json.dumps({"extra": peak() - base, "value": v, "ref": ref}))
        """
    )
    assert got["extra"] < 200 * 2**20, got
    assert got["value"] == pytest.approx(got["ref"], abs=1e-6)
