"""Buffered metrics with ``sharded=True``: two CPU processes (gloo) keep their own
DistributedSampler share (padding duplicate included) and compute across ranks without
gathering the features. Neighbour lists equal a float64 brute-force search on the union,
exactly; scores equal the single-process functional metric on the union within 1e-6; no
collective ever carries more than one rank's rows of features."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data.distributed import DistributedSampler

import prh_lightning.functional as F
from prh_lightning import alignment_matrix
from prh_lightning.metrics import CKA, CKNNA, LCSKNN, RSA, SVCCA, AlignmentMatrix, CycleKNN, EditDistanceKNN, MutualKNN, UnbiasedCKA
from prh_lightning.metrics._distributed import Shard, ShardGroup, deduplicate, sharded_neighbours
from reference_formulas import ref_mutual_knn

N, WORLD, BATCH, K, DA, DB = 45, 2, 8, 4, 7, 5


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    a = torch.randn(N, DA, generator=g)
    b = torch.tanh(a @ torch.randn(DA, DB, generator=g)) + 0.3 * torch.randn(N, DB, generator=g)
    grid = torch.cartesian_prod(*[torch.arange(-2.0, 3.0)] * 3)  # distinct integer rows: many tied products
    ties = grid[torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(5))[:N]]
    return a, b, ties


def rank_indices(rank: int) -> torch.Tensor:
    return torch.tensor(list(DistributedSampler(range(N), num_replicas=WORLD, rank=rank, shuffle=True, seed=3)))


def union_order() -> torch.Tensor:
    """The samples in rank-major order, padding duplicate dropped (first copy kept)."""
    seen, order = set(), []
    for r in range(WORLD):
        for i in rank_indices(r).tolist():
            if i not in seen:
                seen.add(i)
                order.append(i)
    return torch.tensor(order)


def brute_force_lists(x: torch.Tensor, k: int, normalize: bool) -> torch.Tensor:
    """Exact neighbours in float64: larger inner product first, then lower index."""
    x = x.double()
    if normalize:
        x = x / x.norm(dim=1, keepdim=True)
    g = x @ x.T
    g.fill_diagonal_(float("-inf"))
    return torch.sort(g, dim=1, descending=True, stable=True).indices[:, :k]


METRICS = {
    "mutual_knn": lambda: MutualKNN(k=K, sharded=True),
    "cycle_knn": lambda: CycleKNN(k=K, sharded=True),
    "lcs_knn": lambda: LCSKNN(k=K, sharded=True),
    "edit_distance_knn": lambda: EditDistanceKNN(k=K, sharded=True),
    "rbf_cka": lambda: CKA(kernel="rbf", sharded=True),
    "linear_unbiased_cka": lambda: CKA(unbiased=True, normalize=False, sharded=True),
    "unbiased_cka": lambda: UnbiasedCKA(sharded=True),
    "rbf_unbiased_cka": lambda: UnbiasedCKA(kernel="rbf", sigma=0.8, sharded=True),
    "cknna": lambda: CKNNA(k=K, sharded=True),
    "biased_cknna": lambda: CKNNA(k=K, unbiased=False, sharded=True),
    "svcca": lambda: SVCCA(dim=3, sharded=True),
}
MATRICES = {  # layer x layer, one model against itself and against another
    "mutual_knn": {"k": K},
    "cknna": {"k": K},
    "cka": {"kernel": "rbf"},
    "svcca": {"dim": 2, "clip_quantile": 0.9},
}


def layers(a: torch.Tensor, b: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return {"a": a, "b": b}, {"b": b, "ab": torch.cat([a, b], dim=1)[:, ::2], "sin": torch.sin(3 * a)}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    sent: list[tuple[str, tuple[int, ...], bool]] = []
    originals = {name: getattr(dist, name) for name in ("broadcast", "all_gather")}

    def counting(name):
        def call(*args, **kwargs):
            tensor = args[0] if name == "broadcast" else args[1]
            sent.append((name, tuple(tensor.shape), tensor.is_floating_point()))
            return originals[name](*args, **kwargs)

        return call

    try:
        a, b, ties = make_data()
        mine = rank_indices(rank)
        metrics = {name: make() for name, make in METRICS.items()}
        matrices = {name: AlignmentMatrix(metric=name.split("@")[0], sharded=True, **options) for name, options in MATRICES.items()}
        matrices["mutual_knn@self"] = AlignmentMatrix(metric="mutual_knn", k=K, sharded=True)
        xs, ys = layers(a, b)
        for chunk in mine.split(BATCH):
            for metric in metrics.values():
                metric.update(a[chunk], b[chunk], index=chunk)
            for name, matrix in matrices.items():
                in_y = None if name.endswith("@self") else {key: v[chunk] for key, v in ys.items()}
                matrix.update({key: v[chunk] for key, v in xs.items()}, in_y, index=chunk)
        for name in originals:
            setattr(dist, name, counting(name))
        try:
            lonely = UnbiasedCKA(sharded=True)  # rank 1 holds nothing: it still takes part
            if rank == 0:
                lonely.update(a[:20], b[:20])
            metrics["lonely"] = lonely
            out = {name: float(metric.compute()) for name, metric in metrics.items()}
            out["matrices"] = {name: matrix.compute() for name, matrix in matrices.items()}
            group = ShardGroup()
            lists = {}
            for key, x, normalize in (("a", a, True), ("ties", ties, False)):
                (local,), sizes = deduplicate(group, mine, x[mine])
                shard = Shard(group, local, sizes, key, normalize, torch.float32)
                lists[key] = group.gather_rows(sharded_neighbours(shard, K), sizes)
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)
        out["lists"], out["sent"] = lists, sent
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_sharded_compute_equals_one_process_on_the_union_without_gathering_features(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    a, b, ties = make_data()
    order = union_order()
    assert order.numel() == N
    ua, ub = a[order], b[order]
    expected = {name: float(getattr(F, name)(ua, ub, k=K)) for name in ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn")}
    # kernel CKA: blocked HSIC sums in float64, so against the float64 single-process value (at
    # n = 4,000 the single-process float32 RBF CKA is 3e-5 off it; the sharded one 5e-9)
    a64, b64 = ua.double(), ub.double()
    expected["rbf_cka"] = float(F.cka(a64, b64, kernel="rbf"))
    expected["linear_unbiased_cka"] = float(F.cka(a64, b64, unbiased=True, normalize=False))
    expected["unbiased_cka"] = float(F.unbiased_cka(a64, b64))
    expected["rbf_unbiased_cka"] = float(F.unbiased_cka(a64, b64, kernel="rbf", sigma=0.8))
    expected["cknna"] = float(F.cknna(ua, ub, k=K))
    expected["biased_cknna"] = float(F.cknna(ua, ub, k=K, unbiased=False))
    expected["svcca"] = float(F.svcca(ua, ub, dim=3))
    expected["lonely"] = float(F.unbiased_cka(a[:20].double(), b[:20].double()))
    xs, ys = layers(ua, ub)
    expected_matrices = {name: alignment_matrix(xs, ys, metric=name, **options) for name, options in MATRICES.items()}
    # sharded SVCCA and CKA work in float64 (SVCCA from [d, d] statistics); single-process float32 errs by ~2e-6
    x64, y64 = ({key: v.double() for key, v in side.items()} for side in (xs, ys))
    for name in ("svcca", "cka"):
        expected_matrices[name] = alignment_matrix(x64, y64, metric=name, **MATRICES[name]).float()
    expected_matrices["mutual_knn@self"] = alignment_matrix(xs, metric="mutual_knn", k=K)
    tied_lists = brute_force_lists(ties[order], K, normalize=False)
    for out in results:
        for name, value in expected.items():
            assert out[name] == pytest.approx(value, abs=1e-6), name
        for name, value in expected_matrices.items():
            torch.testing.assert_close(out['matrices'][name], value, atol=1e-6, rtol=0, msg=lambda m, name=name: f'{name}: {m}')
        assert torch.equal(out["lists"]["a"], brute_force_lists(ua, K, normalize=True))
        assert torch.equal(out["lists"]["ties"], tied_lists)
        # features travel one rank's panel at a time; all_gather carries ids, neighbour lists and kernel
        # values at the neighbours ([n_r, k]), vectors, and the padding duplicate's features (one row)
        panel_rows = max(rank_indices(r).numel() for r in range(WORLD))
        broadcasts = [shape for name, shape, _ in out["sent"] if name == "broadcast"]
        assert broadcasts and max(shape[0] for shape in broadcasts) <= panel_rows < N
        gathered = [(shape, floating) for name, shape, floating in out["sent"] if name == "all_gather"]
        assert all(len(shape) == 1 or not floating or shape[0] <= 1 or shape[1] == K for shape, floating in gathered)
    # the ties really are ties: the tie rule decides many of these lists
    g = ties[order] @ ties[order].T
    assert (g.sort(dim=1, descending=True).values[:, K - 1] == g.sort(dim=1, descending=True).values[:, K]).any()
    # and the duplicate matters: counted twice, mutual k-NN would differ
    both = torch.cat([rank_indices(r) for r in range(WORLD)])
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    assert expected["mutual_knn"] == pytest.approx(ref_mutual_knn(unit(ua), unit(ub), K), abs=1e-6)
    assert abs(ref_mutual_knn(unit(a[both]), unit(b[both]), K) - expected["mutual_knn"]) > 1e-3


def test_without_a_process_group_sharded_is_the_ordinary_compute():
    a, b, _ = make_data()
    metric = MutualKNN(k=K, sharded=True)
    metric.update(a, b)
    assert float(metric.compute()) == float(F.mutual_knn(a, b, k=K))


def test_sharded_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="available for"):
        RSA(sharded=True)
    with pytest.raises(ValueError, match="available for"):
        AlignmentMatrix(metric="rsa", sharded=True)
    with pytest.raises(ValueError, match="d x d statistics"):
        CKA(sharded=True)  # streaming linear CKA never gathers samples
    with pytest.raises(ValueError, match="sync_on_compute"):
        MutualKNN(sharded=True, sync_on_compute=True)
    with pytest.raises(TypeError, match="True or False"):
        MutualKNN(sharded="yes")
