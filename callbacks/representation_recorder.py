"""`RepresentationRecorder`: save the model's per-layer features as `Representations` files.

::

    recorder = RepresentationRecorder("reps/", layers=["conv1", "conv2", "fc1"], stages=("validate", "test"))
    Trainer(callbacks=[recorder]).fit(model, dm)     # reps/validate-epoch000-step000050.safetensors, ...

During a validation, test or predict epoch the LightningModule is tapped (forward hooks), and at
the epoch's end the features of every rank are gathered and rank 0 writes one file per
dataloader, atomically. With ``stages=("train", ...)`` and a fixed ``probe``, the model is also
run on the probe (eval mode, ``no_grad``, forked RNG) every N epochs or optimizer steps.

Rows are samples in dataset order, with their dataset indices as ``sample_ids``, whenever the
dataloader's sampler says which samples each batch holds (``SequentialSampler``, and
``DistributedSampler``, the one Lightning puts in under DDP, shuffled or not): the rows of all
ranks are put back in dataset order and the duplicates ``DistributedSampler`` pads with are
dropped, so one process and N processes write the same file. With other samplers (a
``RandomSampler``, an ``IterableDataset``) the rows stay in the order seen (rank after rank) and
carry no ids; the metadata says so (``"sample_order"``).

A compiled model (``torch.compile``) runs eagerly while it is tapped, see
:mod:`prh_lightning.taps.compiled`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from prh_lightning.callbacks._probe import (
    call_model,
    make_probe,
    module_device,
    module_dtype,
    move_inputs,
    side_effect_free,
    split_batch,
)
from prh_lightning.recording import batch_indices
from prh_lightning.representations import Representations
from prh_lightning.taps import LayerTaps

STAGES = ("train", "validate", "test", "predict")
_LOADERS = {"validate": "val_dataloaders", "test": "test_dataloaders", "predict": "predict_dataloaders"}


class RepresentationRecorder(Callback):
    """Record layer taps and save one :class:`Representations` file per epoch (and dataloader)
    or per N optimizer steps.

    Args:
        dirpath: folder of the files.
        layers: layers to tap (``LayerTaps`` selection).
        reduce: pooling of the tapped outputs (see ``LayerTaps``).
        max_samples: most rows recorded per dataloader and rank in one epoch.
        stages: any of ``"validate"``, ``"test"``, ``"predict"`` (the stage's own batches) and
            ``"train"`` (the fixed ``probe``, during training).
        every_n_epochs: record every N-th epoch (fit's validation and training epochs).
        every_n_train_steps: with ``"train"``, record the probe every N optimizer steps (once
            per step, also with ``accumulate_grad_batches``).
        probe: fixed probe inputs for ``"train"`` (DataLoader, tensor, ``(x, y)``, dict of tensors).
        max_probe_samples: most probe rows kept.
        filename: format string with ``{stage}``, ``{epoch}``, ``{step}`` and optionally
            ``{dataloader_idx}``; without it a stage with several dataloaders writes
            ``<name>-dl<i>.safetensors`` per dataloader.
        forward_fn: ``forward_fn(pl_module, batch)`` for the probe pass (default: the batch
            handed to ``forward`` as its signature asks, see ``call_model``).
        batch_size: probe rows per forward pass.
        tap_kwargs: further ``LayerTaps`` arguments (``mask_key``, ``output``, ``repeated``, ...).

    Files hold float32 features (also for bf16/fp16 models), labels when batches are ``(x, y)``
    pairs or dicts with a label key, dataset indices as ``sample_ids`` (see the module notes),
    and metadata: stage, epoch, global step, dataloader index, world size, sample order.
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
        tap_kwargs: dict[str, Any] | None = None,
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
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples <= 0):
            raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
        try:
            filename.format(stage="validate", epoch=0, step=0, dataloader_idx=0)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"filename {filename!r} must be a format string using only {{stage}}, {{epoch}}, {{step}}, "
                f"{{dataloader_idx}}: {err}"
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
        self.tap_kwargs = dict(tap_kwargs or {})
        self.saved: list[Path] = []  # files written (rank 0)
        self._taps: LayerTaps | None = None
        self._stage: str | None = None
        self._parts: dict[int, _Part] = {}  # dataloader index -> what was recorded
        self._current: _Part | None = None
        self._index_lists: dict[int, list[list[int]] | None] = {}
        self._rows_before = 0
        self._last_probe_step: int | None = None

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
        self._stage, self._parts, self._current, self._index_lists = stage, {}, None, {}
        self._taps = LayerTaps(pl_module, self.layers, self.reduce, **self.tap_kwargs).attach()

    def _batch_start(self, trainer: Trainer, dataloader_idx: int) -> None:
        taps = self._taps
        if taps is None:
            return
        if self._current is None or self._current.dataloader_idx != dataloader_idx:
            self._flush()
            self._current = self._parts.setdefault(dataloader_idx, _Part(dataloader_idx))
            if dataloader_idx not in self._index_lists:
                self._index_lists[dataloader_idx] = batch_indices(_loader(trainer, self._stage, dataloader_idx))
        taps.enabled = self.max_samples is None or self._current.rows + taps.n < self.max_samples
        self._rows_before = taps.n

    def _batch_end(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        taps, part = self._taps, self._current
        if taps is None or part is None or not taps.enabled:
            return
        rows = taps.n - self._rows_before
        try:
            part.labels.append(split_batch(batch)[1])
        except TypeError:
            part.labels.append(None)
        index_lists = self._index_lists.get(dataloader_idx)
        if part.ids is not None:
            ids = index_lists[batch_idx] if index_lists is not None and batch_idx < len(index_lists) else None
            if ids is None or len(ids) != rows:
                if ids is not None:
                    warnings.warn(
                        f"RepresentationRecorder: batch {batch_idx} gave {rows} rows for {len(ids)} samples "
                        "(the model ran more than once per batch?); this file's rows carry no sample ids",
                        stacklevel=2,
                    )
                part.ids = None
            else:
                part.ids.extend(ids)

    def _flush(self) -> None:
        """Move what the taps hold into the current dataloader's part."""
        taps, part = self._taps, self._current
        if taps is None or part is None or taps.n == 0:
            return
        part.chunks.append(taps.features())
        part.rows += taps.n
        taps.clear()

    def _finish(self, trainer: Trainer, stage: str) -> None:
        taps = self._taps
        if taps is None:
            return
        try:
            self._flush()
        finally:
            taps.remove()
            self._taps, self._current = None, None
        parts, self._parts = self._parts, {}
        count = len(parts)
        for idx in sorted(parts):
            features, ids, labels = parts[idx].collect(self.max_samples)
            gathered = _gather(trainer, features, ids, labels)
            self._save(trainer, stage, *gathered, dataloader_idx=idx if count > 1 else None)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "validate")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start(trainer, dataloader_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, "validate")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start(trainer, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, "test")

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "predict")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start(trainer, dataloader_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(batch, batch_idx, dataloader_idx)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, "predict")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._taps is not None:
            self._taps.remove()
            self._taps, self._current, self._parts = None, None, {}

    # -- the fixed probe during training -------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n, step = self.every_n_train_steps, trainer.global_step
        # called once per batch: with gradient accumulation global_step only moves on optimizer steps
        if "train" in self.stages and n is not None and step > 0 and step % n == 0 and step != self._last_probe_step:
            self._last_probe_step = step
            self._record_probe(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if "train" in self.stages and self.every_n_train_steps is None and self._due(trainer):
            self._record_probe(trainer, pl_module)

    def _record_probe(self, trainer: Trainer, pl_module: LightningModule) -> None:
        features = None
        if trainer.is_global_zero:  # every rank holds the same model: one pass is enough
            features = probe_pass(
                pl_module, self.probe.chunks(self.batch_size), self.forward_fn,
                trainer.precision_plugin.forward_context, layers=self.layers, reduce=self.reduce, **self.tap_kwargs,
            )
        ids = list(range(self.probe.n))
        self._save(trainer, "train", features, ids, self.probe.y, order="probe order")

    # -- writing -------------------------------------------------------------------
    def _path(self, trainer: Trainer, stage: str, dataloader_idx: int | None) -> Path:
        fields = dict(stage=stage, epoch=trainer.current_epoch, step=trainer.global_step)
        name = self.filename.format(**fields, dataloader_idx=dataloader_idx or 0)
        if dataloader_idx is not None and "{dataloader_idx" not in self.filename:
            stem, dot, suffix = name.rpartition(".")
            name = f"{stem}-dl{dataloader_idx}.{suffix}" if dot else f"{name}-dl{dataloader_idx}"
        return self.dirpath / name

    def _save(
        self,
        trainer: Trainer,
        stage: str,
        features: dict[str, torch.Tensor] | None,
        sample_ids: list[int] | None,
        labels: torch.Tensor | None,
        order: str = "",
        dataloader_idx: int | None = None,
    ) -> None:
        """Rank 0 writes one file (atomically); every rank then waits for it."""
        if trainer.is_global_zero:
            metadata = {
                "stage": stage,
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "dataloader_idx": dataloader_idx or 0,
                "model": type(trainer.lightning_module).__name__,
                "reduce": self.reduce if isinstance(self.reduce, str) or self.reduce is None else "callable",
                "world_size": trainer.world_size,
                "sample_order": order,
            }
            reps = Representations(features, sample_ids=sample_ids, labels=labels, metadata=metadata)
            self.saved.append(reps.save(self._path(trainer, stage, dataloader_idx)))
        trainer.strategy.barrier("RepresentationRecorder.save")


def probe_pass(
    model: nn.Module,
    chunks: Any,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
    context: Callable[[], Any],
    **tap_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """``{layer: Tensor[n, d]}`` (float32, on CPU) of ``model`` on the probe ``chunks``, without side
    effects (eval mode, ``no_grad``, forked RNG, training flags restored); each chunk is moved to
    the model's device and floating inputs cast to its dtype, and run inside ``context()`` (the
    precision plugin's autocast)."""
    forward = forward_fn or call_model
    device, dtype = module_device(model), module_dtype(model)
    with side_effect_free(model), LayerTaps(model, device="cpu", dtype=torch.float32, **tap_kwargs) as taps:
        for chunk in chunks:
            with context():
                forward(model, move_inputs(chunk, device, dtype))
        return taps.features()


class _Part:
    """What one rank recorded from one dataloader: feature chunks, dataset indices, labels."""

    def __init__(self, dataloader_idx: int) -> None:
        self.dataloader_idx = dataloader_idx
        self.chunks: list[dict[str, torch.Tensor]] = []
        self.rows = 0
        self.ids: list[int] | None = []
        self.labels: list[torch.Tensor | None] = []

    def collect(self, max_samples: int | None) -> tuple[dict[str, torch.Tensor], list[int] | None, torch.Tensor | None]:
        names = list(self.chunks[0])
        features = {name: torch.cat([c[name] for c in self.chunks]) for name in names}
        rows = next(iter(features.values())).shape[0]
        keep = rows if max_samples is None else min(rows, max_samples)
        features = {name: value[:keep] for name, value in features.items()}
        labels = None
        if self.labels and all(y is not None for y in self.labels):
            labels = torch.cat([y.detach().cpu() for y in self.labels])
            labels = labels[:keep] if labels.shape[0] == rows else None
        ids = self.ids[:keep] if self.ids is not None and len(self.ids) == rows else None
        return features, ids, labels


def _loader(trainer: Trainer, stage: str | None, dataloader_idx: int) -> Any:
    loaders = getattr(trainer, _LOADERS.get(stage or "", ""), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[dataloader_idx] if dataloader_idx < len(loaders) else None
    if isinstance(loaders, dict):
        values = list(loaders.values())
        return values[dataloader_idx] if dataloader_idx < len(values) else None
    return loaders if dataloader_idx == 0 else None


def _gather(
    trainer: Trainer, features: dict[str, torch.Tensor], ids: list[int] | None, labels: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], list[int] | None, torch.Tensor | None, str]:
    """Rows of every rank, in dataset order without the sampler's padding duplicates when the
    sample ids are known (on every rank), else rank after rank. A collective: every rank calls it."""
    world = trainer.world_size
    id_tensor = torch.tensor(ids if ids is not None else [], dtype=torch.long)
    known = ids is not None
    if world > 1:
        known = bool(_gather_rows(trainer, torch.tensor([int(known)])).min())
        have_labels = bool(_gather_rows(trainer, torch.tensor([int(labels is not None)])).min())
        features = {name: _gather_rows(trainer, value) for name, value in features.items()}
        labels = _gather_rows(trainer, labels) if have_labels else None
        id_tensor = _gather_rows(trainer, id_tensor if known else torch.zeros(0, dtype=torch.long))
    if not known:
        order = "as seen, rank after rank (the sampler does not tell sample ids)" if world > 1 else "as seen"
        if world > 1:
            warnings.warn(
                "RepresentationRecorder: the dataloader's sampler does not say which samples each rank got "
                "(not a SequentialSampler or DistributedSampler); rows are saved rank after rank, with any "
                "padding duplicates, and without sample ids",
                stacklevel=2,
            )
        return features, None, labels, order
    sorted_ids, perm = torch.sort(id_tensor, stable=True)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]  # DistributedSampler pads with repeated samples
    index = perm[first]
    features = {name: value[index] for name, value in features.items()}
    labels = None if labels is None else labels[index]
    return features, sorted_ids[first].tolist(), labels, "dataset order"


def _gather_rows(trainer: Trainer, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every rank, rank after rank, on CPU; every rank must call this."""
    strategy = trainer.strategy
    device = strategy.root_device
    sizes = strategy.all_gather(torch.tensor([x.shape[0]], device=device)).flatten().tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    gathered = strategy.all_gather(padded).cpu()  # [world, max_rows, ...]
    return torch.cat([gathered[r, : sizes[r]] for r in range(len(sizes))])
