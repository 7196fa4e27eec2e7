"""Metric classes logged from a LightningModule in a real Trainer run (CSVLogger read back)."""

from __future__ import annotations

import csv

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MetricCollection

from prh_lightning.metrics import CKA, MutualKNN
from reference_formulas import ref_linear_cka, ref_mutual_knn


class TwoLayerNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(6, 12)
        self.l2 = torch.nn.Linear(12, 8)
        self.head = torch.nn.Linear(8, 1)
        self.val_cka = CKA(normalize=False)
        self.val_align = MetricCollection({"mknn": MutualKNN(k=5, normalize=False), "cka_x_h2": CKA(normalize=False)}, prefix="val_")

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = torch.relu(self.l1(x))
        return h1, torch.tanh(self.l2(h1))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return self.head(self.features(x)[1]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        x, index = batch
        h1, h2 = self.features(x)
        self.val_cka.update(h1, h2, index=index)
        self.log("val_cka", self.val_cka)
        self.val_align["mknn"].update(h1, h2, index=index)
        self.val_align["cka_x_h2"].update(x, h2)
        self.log_dict(self.val_align)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_metrics_logged_from_a_lightning_module_equal_full_batch_values(tmp_path):
    torch.manual_seed(0)
    x_train, x_val = torch.randn(32, 6), torch.randn(48, 6)
    train = DataLoader(TensorDataset(x_train, torch.arange(32)), batch_size=16)
    val = DataLoader(TensorDataset(x_val, torch.arange(48)), batch_size=16)
    model = TwoLayerNet()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=3,
        logger=CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train, val)  # includes the 2-batch sanity check, whose state must not leak

    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    logged = {key: float(row[key]) for row in rows for key in ("val_cka", "val_mknn", "val_cka_x_h2") if row.get(key)}

    model.eval()
    with torch.no_grad():
        h1, h2 = model.features(x_val)
    assert abs(logged["val_cka"] - ref_linear_cka(h1, h2)) < 1e-5
    assert abs(logged["val_cka_x_h2"] - ref_linear_cka(x_val, h2)) < 1e-5
    assert abs(logged["val_mknn"] - ref_mutual_knn(h1, h2, 5)) < 1e-6
    # the sanity check saw only 32 samples: a value on those would differ
    assert abs(ref_linear_cka(h1[:32], h2[:32]) - ref_linear_cka(h1, h2)) > 1e-4
