"""The callbacks under DDP (``ddp_spawn``, 2 CPU processes, gloo): the same numbers as one
process, rank 0 logs once, the recorder writes one gathered file, nothing hangs."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from callback_helpers import (
    TRAINER_KW,
    EndDistributedCleanly,
    TinyNet,
    loader,
    read_scalars,
    retry_once_on_exit_abort,
    synthetic_data,
)
from torch import distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from prh_lightning.callbacks import AlignmentMonitor, RepresentationRecorder
from prh_lightning.representations import Representations
from lightning.pytorch.loggers import TensorBoardLogger


class ShardedValNet(TinyNet):
    """Every rank trains on the same full batches (so DDP's averaged gradient equals the single
    process gradient exactly); validation is sharded over the ranks, in order."""

    def train_dataloader(self):
        return loader(*synthetic_data(64), batch_size=16)

    def val_dataloader(self):
        dataset = TensorDataset(*synthetic_data(32, seed=1))
        if dist.is_available() and dist.is_initialized():
            return DataLoader(dataset, batch_size=8, sampler=DistributedSampler(dataset, shuffle=False))
        return DataLoader(dataset, batch_size=8)


def run(tmp_path, name: str, devices: int) -> L.Trainer:
    L.seed_everything(11)
    model = ShardedValNet(lr=0.2)
    twin = TinyNet()
    px, py = synthetic_data(40, seed=123)
    monitor = AlignmentMonitor(
        probe=(px, py), references={"twin": twin}, layers=["conv1", "conv2", "fc"], k=5, every_n_train_steps=2
    )
    recorder = RepresentationRecorder(tmp_path / name / "reps", layers=["conv1", "fc"])
    kw = {**TRAINER_KW, "accelerator": "cpu", "devices": devices, "use_distributed_sampler": False}
    if devices > 1:
        kw["strategy"] = "ddp_spawn"
    trainer = L.Trainer(
        max_steps=4, val_check_interval=4, callbacks=[monitor, recorder, EndDistributedCleanly()],
        logger=TensorBoardLogger(tmp_path / name, name="tb"), **kw,
    )
    trainer.fit(model)
    return trainer


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_spawn_matches_single_process(tmp_path):
    torch.set_num_threads(1)
    one = run(tmp_path, "single", devices=1)
    two = retry_once_on_exit_abort(run, tmp_path, "ddp", devices=2, clean=lambda: shutil.rmtree(tmp_path / "ddp", ignore_errors=True))

    single, ddp = read_scalars(str(tmp_path / "single")), read_scalars(str(tmp_path / "ddp"))
    assert set(ddp) == set(single) and "alignment/cka/twin/best" in ddp
    for tag in single:
        # logged once, by rank 0, at the step self.log uses (global steps 0, 2, 4)
        assert [s for s, _ in ddp[tag]] == [s for s, _ in single[tag]] == [0, 1, 3], tag
        assert [v for _, v in ddp[tag]] == pytest.approx([v for _, v in single[tag]], abs=1e-6), tag

    # callback_metrics reach the launching process of ddp_spawn (EarlyStopping / ModelCheckpoint read them)
    tag = "alignment/cka/twin/best"
    assert two.callback_metrics[tag].item() == pytest.approx(one.callback_metrics[tag].item(), abs=1e-6)
    assert two.callback_metrics[tag].item() == pytest.approx(single[tag][-1][1], abs=1e-6)

    (one,) = (tmp_path / "single" / "reps").iterdir()
    (gathered,) = (tmp_path / "ddp" / "reps").iterdir()  # one file, not one per rank
    a, b = Representations.load(one), Representations.load(gathered)
    assert b.n == a.n == 32 and b.metadata["world_size"] == 2
    assert torch.equal(b.labels, a.labels)  # rows back in dataset order
    for layer in a.layers:
        torch.testing.assert_close(b[layer], a[layer], atol=1e-4, rtol=1e-4)
