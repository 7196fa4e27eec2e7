"""Shared pieces of the callback tests: a tiny LightningModule, synthetic data, brute-force
reference formulas (written independently of prh_lightning), and TensorBoard read-back."""

from __future__ import annotations

import glob
import os

import lightning as L
import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

TRAINER_KW = dict(
    accelerator="cpu",
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    enable_checkpointing=False,  # nothing written to the working directory
)


class EndDistributedCleanly(L.Callback):
    """Put last in a ``ddp_spawn`` test's callbacks: once a fit or predict run has ended normally
    and been torn down, every rank meets at a barrier and destroys the process group, so no gloo
    thread is left for the spawned worker's interpreter shutdown (where a worker has aborted with
    "terminate called without an active exception" after all its work was done). Nothing is done
    without a process group, or after a failure (a barrier could then wait for a dead rank)."""

    def __init__(self) -> None:
        self.ended = False

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ended = True

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ended = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        ended, self.ended = self.ended, False
        if ended and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def retry_once_on_exit_abort(run, *args, clean=None, **kwargs):
    """``run(*args, **kwargs)``; if a spawned worker died by SIGABRT (the exit-time abort above,
    which is torch's teardown, not what the tests check), ``clean()`` and run once more. Any
    other failure, or a second abort, propagates."""
    from torch.multiprocessing.spawn import ProcessExitedException

    try:
        return run(*args, **kwargs)
    except ProcessExitedException as err:
        if "SIGABRT" not in str(err):
            raise
    if clean is not None:
        clean()
    return run(*args, **kwargs)


class TinyNet(L.LightningModule):
    """conv1 -> tanh -> pool -> conv2 -> tanh -> global mean -> [dropout] -> fc, on [b, 1, 8, 8]."""

    def __init__(self, dropout: float = 0.0, batchnorm: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6) if batchnorm else nn.Identity()
        self.act1 = nn.Tanh()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = nn.Tanh()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act1(self.norm(self.conv1(x))))
        h = self.act2(self.conv2(h)).mean(dim=(2, 3))
        return self.fc(self.drop(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tiny_features(model: TinyNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """conv1 / conv2 (spatial mean) and fc features, by hand (no hooks), in eval mode."""
    model = model.eval()
    with torch.no_grad():
        c1 = model.conv1(x)
        c2 = model.conv2(model.pool(model.act1(model.norm(c1))))
        return {"conv1": c1.mean(dim=(2, 3)), "conv2": c2.mean(dim=(2, 3)), "fc": model(x)}


def synthetic_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [n, 1, 8, 8]`` and labels ``[n]`` that depend on ``x`` (so training learns something)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean(dim=(1, 2)) * 10 + x[:, 0, 4:].mean(dim=(1, 2)) * 3).long() % 10
    return x, y


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


# -- brute-force references (float64, textbook formulas) ---------------------------------
def unit_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=1, keepdim=True)


def brute_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    """Linear CKA of L2-normalised rows: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), H = I - 11^T/n."""
    a, b = unit_rows(a), unit_rows(b)
    n = a.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ a @ a.T @ h, h @ b @ b.T @ h
    return float((k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum()))


def brute_mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean over samples of |kNN_a(i) & kNN_b(i)| / k, cosine neighbours, self excluded."""

    def neighbours(x: torch.Tensor) -> list[set[int]]:
        x = unit_rows(x)
        sim = x @ x.T
        out = []
        for i in range(x.shape[0]):
            order = sorted((j for j in range(x.shape[0]) if j != i), key=lambda j: -float(sim[i, j]))
            out.append(set(order[:k]))
        return out

    na, nb = neighbours(a), neighbours(b)
    return sum(len(p & q) / k for p, q in zip(na, nb)) / len(na)


# -- TensorBoard read-back -----------------------------------------------------------------
def event_accumulator(logdir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard event file under {logdir}"
    acc = EventAccumulator(os.path.dirname(files[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def read_scalars(logdir: str, prefix: str = "alignment/") -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator(logdir)
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith(prefix)
    }


class HFTiny(nn.Module):
    """TinyNet behind a Hugging Face style forward: keyword inputs in, {"loss", "logits"} out."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": int(self.y[i])}
