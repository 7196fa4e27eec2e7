"""Distributed linear CKA sends d x d sufficient statistics, not n x d features: the bytes that
cross the process group do not grow with n (two gloo processes), and the value is the
single-process one. A buffered metric, which gathers the samples, is the contrast."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference_formulas import ref_linear_cka

from prh_lightning.metrics import CKA, UnbiasedCKA

WORLD, DA, DB = 2, 6, 4


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, DA, generator=g, dtype=torch.float64)
    return a, torch.tanh(a @ torch.randn(DA, DB, generator=g, dtype=torch.float64)) + 0.3 * torch.randn(n, DB, generator=g, dtype=torch.float64)


def _worker(rank: int, init_file: str, out_dir: str, n: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    sent = {"bytes": 0}
    original = torch.distributed.all_gather

    def counting(tensor_list, tensor, *args, **kwargs):
        sent["bytes"] += tensor.numel() * tensor.element_size()
        return original(tensor_list, tensor, *args, **kwargs)

    try:
        a, b = make_data(n)
        out = {}
        for name, metric in (("cka", CKA(normalize=False)), ("buffered", UnbiasedCKA(normalize=False))):
            for chunk in torch.arange(n)[rank::WORLD].split(64):
                metric.update(a[chunk], b[chunk])
            sent["bytes"] = 0
            torch.distributed.all_gather = counting
            try:
                out[name] = float(metric.compute())
            finally:
                torch.distributed.all_gather = original
            out[f"{name}_bytes"] = sent["bytes"]
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, n: int) -> list[dict]:
    folder = tmp_path / str(n)
    folder.mkdir()
    mp.start_processes(_worker, args=(str(folder / "init"), str(folder), n), nprocs=WORLD, start_method="fork")
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_linear_cka_syncs_d_by_d_statistics_whose_size_does_not_grow_with_n(tmp_path):
    small, large = _run(tmp_path, 400), _run(tmp_path, 4000)
    for n, results in ((400, small), (4000, large)):
        a, b = make_data(n)
        for out in results:
            assert out["cka"] == pytest.approx(ref_linear_cka(a, b), abs=1e-6)
            # what was sent: about the moments (n, sums, d x d products) in float64, with metadata
            assert out["cka_bytes"] <= 8 * 4 * (1 + DA + DB + DA * DA + DB * DB + DA * DB)
    assert small[0]["cka_bytes"] == large[0]["cka_bytes"]
    # the buffered metric gathers every sample: its traffic grows with n
    assert large[0]["buffered_bytes"] >= 4000 // WORLD * (DA + DB) * 4
    assert large[0]["buffered_bytes"] > 5 * small[0]["buffered_bytes"]
