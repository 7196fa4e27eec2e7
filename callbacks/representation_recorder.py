"""`RepresentationRecorder`: save the model's per-layer features as `Representations` files.

::

    recorder = RepresentationRecorder("reps/", layers=["conv1", "conv2", "fc1"], stages=("validate", "test"))
    Trainer(callbacks=[recorder]).fit(model, dm)     # reps/validate-epoch000-step000050.safetensors, ...

During a validation, test or predict epoch the LightningModule is tapped (forward hooks), and at
the epoch's end the features of every rank are gathered and rank 0 writes one file, atomically.
With ``stages=("train", ...)`` and a fixed ``probe``, the model is also run on the probe (eval
mode, ``no_grad``, forked RNG) every N epochs or steps of training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from prh_lightning.callbacks._probe import make_probe, probe_features, split_batch
from prh_lightning.representations import Representations
from prh_lightning.taps import LayerTaps

STAGES = ("train", "validate", "test", "predict")


class RepresentationRecorder(Callback):
    """Record layer taps and save one :class:`Representations` file per epoch or per N steps.

    Args:
        dirpath: folder of the files.
        layers: layers to tap (``LayerTaps`` selection).
        reduce: pooling of the tapped outputs (see ``LayerTaps``).
        max_samples: most rows recorded per layer and rank in one epoch.
        stages: any of ``"validate"``, ``"test"``, ``"predict"`` (the stage's own batches) and
            ``"train"`` (the fixed ``probe``, during training).
        every_n_epochs: record every N-th epoch (fit's validation and training epochs).
        every_n_train_steps: with ``"train"``, also record the probe every N optimiser steps.
        probe: fixed probe inputs for ``"train"`` (DataLoader, tensor, ``(x, y)``, dict of tensors).
        max_probe_samples: most probe rows kept.
        filename: format string with ``{stage}``, ``{epoch}`` and ``{step}``.
        forward_fn: ``forward_fn(pl_module, x_chunk)`` for the probe pass (default ``pl_module(x)``).

    Files hold labels when batches are ``(x, y)`` pairs. Under DDP the rows of all ranks are
    gathered (interleaved back into sampler order when every rank has as many rows, which
    ``DistributedSampler`` ensures, padding included; otherwise rank after rank).
    """

    def __init__(
        self,
        dirpath: str | Path,
        layers: Any = "*",
        reduce: Any = "mean",
        max_samples: int | None = None,
        stages: Sequence[str] = ("validate",),
        every_n_epochs: int = 1,
        every_n_train_steps: int | None = None,
        probe: Any = None,
        max_probe_samples: int | None = 1024,
        filename: str = "{stage}-epoch{epoch:03d}-step{step:06d}.safetensors",
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        batch_size: int = 256,
    ) -> None:
        stages = (stages,) if isinstance(stages, str) else tuple(stages)
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise ValueError(f"stages={stages!r}: choose one or more of {STAGES}")
        if "train" in stages and probe is None:
            raise ValueError(
                "stages includes 'train', which records a fixed probe set: pass probe=<DataLoader or tensor>"
            )
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs <= 0:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        n = every_n_train_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise ValueError(f"every_n_train_steps must be a positive int or None, got {n!r}")
        try:
            filename.format(stage="validate", epoch=0, step=0)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"filename {filename!r} must be a format string using only {{stage}}, {{epoch}}, {{step}}: {err}"
            ) from None
        self.dirpath = Path(dirpath)
        self.layers = layers
        self.reduce = reduce
        self.max_samples = max_samples
        self.stages = stages
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.probe = None if probe is None else make_probe(probe, max_probe_samples)
        self.filename = filename
        self.forward_fn = forward_fn
        self.batch_size = batch_size
        self.saved: list[Path] = []  # files written (rank 0)
        self._taps: LayerTaps | None = None
        self._labels: list[torch.Tensor | None] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=str(self.dirpath), stages=self.stages)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        LayerTaps(pl_module, layers=self.layers)  # unknown layer names fail now, with the taps' message
        if self.probe is not None:
            self.probe = trainer.strategy.broadcast(self.probe, src=0)

    # -- tapping a stage's own batches ---------------------------------------------
    def _due(self, trainer: Trainer) -> bool:
        fitting = trainer.state.fn == "fit"
        return not fitting or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in self.stages or trainer.sanity_checking or not self._due(trainer):
            return
        self._labels = []
        self._taps = LayerTaps(pl_module, self.layers, self.reduce, max_samples=self.max_samples).attach()

    def _batch(self, batch: Any) -> None:
        if self._taps is not None:
            try:
                self._labels.append(split_batch(batch)[1])
            except TypeError:
                self._labels.append(None)

    def _finish(self, trainer: Trainer, stage: str) -> None:
        taps, self._taps = self._taps, None
        if taps is None:
            return
        taps.remove()
        features = {name: _gather_rows(trainer, value) for name, value in taps.features().items()}
        labels = None
        if self._labels and all(y is not None for y in self._labels):
            labels = _gather_rows(trainer, torch.cat([y.detach().cpu() for y in self._labels]))
        self._labels = []
        self._save(trainer, stage, features, labels)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "validate")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, "validate")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, "test")

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "predict")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch(batch)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, "predict")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._taps is not None:
            self._taps.remove()
            self._taps = None

    # -- the fixed probe during training -------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if "train" in self.stages and n is not None and trainer.global_step % n == 0:
            self._record_probe(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "train" in self.stages and self.every_n_train_steps is None and self._due(trainer):
            self._record_probe(trainer, pl_module)

    def _record_probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        features = probe_features(
            pl_module, self.probe.chunks(self.batch_size), self.layers, self.reduce, self.forward_fn,
            device=torch.device("cpu"),
        )
        self._save(trainer, "train", features, self.probe.y)

    # -- writing -------------------------------------------------------------------
    def _save(
        self, trainer: Trainer, stage: str, features: dict[str, torch.Tensor], labels: torch.Tensor | None
    ) -> None:
        """Rank 0 writes one file (atomically); every rank then waits for it."""
        if trainer.is_global_zero:
            name = self.filename.format(stage=stage, epoch=trainer.current_epoch, step=trainer.global_step)
            path = self.dirpath / name
            metadata = {
                "stage": stage,
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "model": type(trainer.lightning_module).__name__,
                "reduce": self.reduce if isinstance(self.reduce, str) or self.reduce is None else "callable",
                "world_size": trainer.world_size,
            }
            self.saved.append(Representations(features, labels=labels, metadata=metadata).save(path))
        trainer.strategy.barrier("RepresentationRecorder.save")


def _gather_rows(trainer: Trainer, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every rank, on CPU; every rank must call this (it is a collective)."""
    strategy = trainer.strategy
    if trainer.world_size == 1:
        return x
    device = strategy.root_device
    sizes = strategy.all_gather(torch.tensor([x.shape[0]], device=device)).flatten().tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    gathered = strategy.all_gather(padded).cpu()  # [world, max_rows, ...]
    if len(set(sizes)) == 1:  # DistributedSampler order: sample i of rank r is item i * world + r
        return gathered.transpose(0, 1).reshape(-1, *x.shape[1:])
    return torch.cat([gathered[r, : sizes[r]] for r in range(len(sizes))])
