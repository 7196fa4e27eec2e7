"""Two CPU processes (gloo) each update their DistributedSampler share of the samples,
padding duplicate included; compute() must equal the single-process value on the union."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data.distributed import DistributedSampler

import prh_lightning.functional as F
from prh_lightning.metrics import CKA, RSA, AlignmentMatrix, MutualKNN
from reference_formulas import ref_linear_cka, ref_mutual_knn

N, WORLD, BATCH = 45, 2, 8  # 45 samples over 2 ranks: the sampler repeats one sample as padding


def make_data() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    a = torch.randn(N, 7, generator=g)
    b = torch.tanh(a @ torch.randn(7, 5, generator=g)) + 0.3 * torch.randn(N, 5, generator=g)
    layers = {"l0": a, "l1": b, "l2": torch.randn(N, 3, generator=g)}
    return a, b, layers


def rank_indices(rank: int) -> torch.Tensor:
    return torch.tensor(list(DistributedSampler(range(N), num_replicas=WORLD, rank=rank, shuffle=True, seed=3)))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do after a fork
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        a, b, layers = make_data()
        cka, mknn, minibatch = CKA(normalize=False), MutualKNN(k=4, normalize=False), CKA(minibatch_unbiased=True, normalize=False)
        align = AlignmentMatrix(metric="mutual_knn", normalize=True, k=4)
        for chunk in rank_indices(rank).split(BATCH):
            cka.update(a[chunk], b[chunk], index=chunk)
            mknn.update(a[chunk], b[chunk], index=chunk)
            minibatch.update(a[chunk], b[chunk])
            align.update({name: x[chunk] for name, x in layers.items()}, index=chunk)
        rsa = RSA(normalize=False)  # no ids, no padding: ranks hold 23 and 22 samples (uneven gather)
        for chunk in torch.arange(N)[rank::WORLD].split(BATCH):
            rsa.update(a[chunk], b[chunk])
        out = {"cka": cka.compute(), "mknn": mknn.compute(), "minibatch": minibatch.compute(), "align": align.compute()}
        out["rsa"] = rsa.compute()
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_two_gloo_processes_equal_one_process_on_the_union(tmp_path):
    shares = [rank_indices(r) for r in range(WORLD)]
    both = torch.cat(shares)
    assert both.numel() == N + 1 and both.unique().numel() == N  # one padding duplicate, as in real DDP

    # fork: the children reuse the parent's imports (spawn would re-import torch, ~10 s each here)
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="fork")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    a, b, layers = make_data()
    unit = {name: x / x.norm(dim=1, keepdim=True) for name, x in layers.items()}
    expected_align = torch.tensor([[ref_mutual_knn(unit[p], unit[q], 4) for q in unit] for p in unit])

    single = CKA(minibatch_unbiased=True, normalize=False)  # same batches, one process (no de-duplication here)
    for share in shares:
        for chunk in share.split(BATCH):
            single.update(a[chunk], b[chunk])
    expected_minibatch = float(single.compute())

    for out in results:  # every rank gets the global value
        assert float(out["cka"]) == pytest.approx(ref_linear_cka(a, b), abs=1e-5)
        assert float(out["mknn"]) == pytest.approx(ref_mutual_knn(a, b, 4), abs=1e-6)
        assert float(out["minibatch"]) == pytest.approx(expected_minibatch, abs=1e-6)
        assert float(out["rsa"]) == pytest.approx(float(F.rsa(a, b)), abs=1e-6)  # RSA ignores sample order
        torch.testing.assert_close(out["align"].double(), expected_align.double(), atol=1e-6, rtol=0)
    # the duplicate matters: counted twice, the scores would differ
    assert abs(ref_linear_cka(a[both], b[both]) - ref_linear_cka(a, b)) > 1e-5
    assert abs(ref_mutual_knn(a[both], b[both], 4) - ref_mutual_knn(a, b, 4)) > 1e-3
