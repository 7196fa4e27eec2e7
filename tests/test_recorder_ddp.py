"""RepresentationRecorder under DDP (``ddp_spawn``, 2 CPU processes, gloo) with Lightning's own
DistributedSampler: 33 validation samples (so the sampler pads one duplicate) and a predict
set of 33 give the same files as one process: dataset indices as ids, padding dropped, dataset
order, and features equal to a hand computation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from callback_helpers import TRAINER_KW, EndDistributedCleanly, TinyNet, loader, retry_once_on_exit_abort, synthetic_data, tiny_features
from torch.utils.data import DataLoader, TensorDataset

from prh_lightning.callbacks import RepresentationRecorder
from prh_lightning.representations import Representations

LAYERS = ["conv1", "fc"]


class Net(TinyNet):
    """lr = 0: the weights stay at their seeded initialisation, so 1 and 2 processes hold the same model."""

    def __init__(self) -> None:
        super().__init__(lr=0.0)

    def train_dataloader(self):
        return loader(*synthetic_data(32), batch_size=8)

    def val_dataloader(self):
        return loader(*synthetic_data(33, seed=1), batch_size=5)

    def predict_dataloader(self):
        return DataLoader(TensorDataset(synthetic_data(33, seed=2)[0]), batch_size=4)


def run(tmp_path, devices: int) -> list[str]:
    L.seed_everything(5)
    model = Net()
    recorder = RepresentationRecorder(tmp_path / "reps", layers=LAYERS, stages=("validate", "predict"))
    kw = {**TRAINER_KW, "devices": devices, "limit_train_batches": 2}
    if devices > 1:
        kw["strategy"] = "ddp_spawn"
    trainer = L.Trainer(max_steps=2, callbacks=[recorder, EndDistributedCleanly()], logger=False, **kw)
    trainer.fit(model)
    trainer.predict(model, return_predictions=False)
    return sorted(p.name for p in (tmp_path / "reps").iterdir())


def run_ddp(tmp_path) -> list[str]:
    """The 2-process run, once more if a worker aborted at exit (see ``retry_once_on_exit_abort``)."""
    import shutil

    return retry_once_on_exit_abort(run, tmp_path, devices=2, clean=lambda: shutil.rmtree(tmp_path / "reps", ignore_errors=True))


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_files_from_one_and_two_processes_are_identical(tmp_path):
    torch.set_num_threads(1)
    single = run(tmp_path / "single", devices=1)
    ddp = run_ddp(tmp_path / "ddp")
    # (after ddp_spawn the launching process's trainer keeps step 0, so predict files differ in name only)
    assert [n.split("-")[0] for n in single] == [n.split("-")[0] for n in ddp] == ["predict", "validate"]
    assert single[1] == ddp[1] == "validate-epoch000-step000002.safetensors"
    for name_a, name_b in zip(single, ddp):
        a = Representations.load(tmp_path / "single" / "reps" / name_a)
        b = Representations.load(tmp_path / "ddp" / "reps" / name_b)
        assert b.metadata["world_size"] == 2 and a.metadata["world_size"] == 1
        assert a.n == b.n == 33 and a.sample_ids == b.sample_ids == list(range(33))  # padding dropped
        assert b.metadata["sample_order"] == "dataset order"
        if name_a.startswith("validate"):
            assert torch.equal(a.labels, b.labels) and torch.equal(b.labels, synthetic_data(33, seed=1)[1])
        for layer in LAYERS:
            torch.testing.assert_close(b[layer], a[layer], atol=1e-6, rtol=1e-6)

    # and against a hand computation with the same (untrained) weights
    L.seed_everything(5)
    model = Net()
    b = Representations.load(tmp_path / "ddp" / "reps" / "validate-epoch000-step000002.safetensors")
    expected = tiny_features(model, synthetic_data(33, seed=1)[0])
    for layer in LAYERS:
        torch.testing.assert_close(b[layer], expected[layer], atol=1e-5, rtol=1e-5)
