"""`record_representations`: one pass over a dataloader with :class:`LayerTaps`, and
:func:`batch_indices`, the dataset indices a DataLoader's batches hold."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DistributedSampler, SequentialSampler
from tqdm.auto import tqdm

from prh_lightning.representations import Representations
from prh_lightning.taps import LayerTaps
from prh_lightning.taps.layer_taps import call_model

ForwardFn = Callable[[nn.Module, Any], Any]
_LABEL_KEYS = ("labels", "label")


def record_representations(
    model: nn.Module,
    dataloader: Iterable[Any],
    layers: Any = "*",
    reduce: Any = "mean",
    max_samples: int | None = None,
    device: str | torch.device | None = None,
    forward_fn: ForwardFn | None = None,
    progress: bool = True,
    metadata: Mapping[str, Any] | None = None,
    **tap_kwargs: Any,
) -> Representations:
    """Record per-layer features of ``model`` over ``dataloader``.

    The pass runs in eval mode under ``torch.no_grad()``; every module's training flag is
    restored afterwards, also after an error.

    Args:
        model: any ``nn.Module``.
        dataloader: an iterable of batches, each a tensor (the input), a tuple/list
            ``(x, y, ...)`` (``x`` is the input; an integer tensor ``y`` with one entry per
            sample is kept as labels), or a dict passed as ``model(**batch)`` (tokenizer
            output; a ``"labels"``/``"label"`` entry is kept as labels and not passed on).
        layers, reduce: as in :class:`~prh_lightning.taps.LayerTaps` (``"auto"`` for the
            family defaults).
        max_samples: stop after this many samples (the last batch is cut to fit).
        device: move batches (and the model) here; ``None`` leaves both where they are.
        forward_fn: ``forward_fn(model, batch)`` for batches of any other shape (labels are
            then not collected).
        progress: show a tqdm progress bar.
        metadata: extra JSON metadata stored in the result.
        **tap_kwargs: further :class:`LayerTaps` arguments (``output``, ``dtype``, ``repeated``,
            ``max_bytes``, ...).

    Returns:
        :class:`Representations` with features ``[n, d]`` per layer, labels when found, and
        the dataset indices as ``sample_ids`` when the DataLoader's sampler tells them (see
        :func:`batch_indices`).
    """
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples <= 0):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if device is not None:
        model.to(device)
    modes = {module: module.training for module in model.modules()}
    labels: list[torch.Tensor] = []
    seen = 0
    total = _total_batches(dataloader)
    try:
        model.eval()
        with torch.no_grad(), LayerTaps(model, layers=layers, reduce=reduce, **tap_kwargs) as taps:
            for batch in tqdm(dataloader, total=total, disable=not progress, desc="recording", leave=False):
                if max_samples is not None:
                    batch = _truncate(batch, max_samples - seen)
                if forward_fn is not None:
                    forward_fn(model, _to_device(batch, device))
                    seen = taps.n
                else:
                    inputs, batch_labels, size = _split_batch(batch)
                    call_model(model, _to_device(inputs, device))
                    seen += size
                    if batch_labels is not None:
                        labels.append(batch_labels.detach().cpu())
                if max_samples is not None and seen >= max_samples:
                    break
            features = taps.features()
    finally:
        for module, mode in modes.items():
            module.training = mode
    label_tensor = torch.cat(labels) if labels else None
    n = next(iter(features.values())).shape[0]
    if label_tensor is not None and label_tensor.shape[0] != n:
        label_tensor = None  # labels did not line up with the recorded rows; better none than wrong ones
    meta = {"model": type(model).__name__, "reduce": reduce if isinstance(reduce, str) or reduce is None else "callable"}
    meta.update(metadata or {})
    return Representations(features, sample_ids=_sample_ids(dataloader, n, seen), labels=label_tensor, metadata=meta)


def _sample_ids(dataloader: Iterable[Any], rows: int, seen: int) -> list[int] | None:
    """The dataset indices of the ``rows`` recorded rows, when the sampler tells them and the
    model made one row per sample (``seen`` samples fed)."""
    batches = batch_indices(dataloader)
    if batches is None or rows != seen:
        return None
    flat = [i for batch in batches for i in batch]
    return flat[:rows] if len(flat) >= rows else None


def _deterministic(sampler: Any) -> bool:
    """Whether iterating ``sampler`` again gives the order the DataLoader uses, without touching
    the global RNG: ``SequentialSampler``, and ``DistributedSampler`` (seeded by seed + epoch)
    over a dataset or over Lightning's wrapper of a deterministic sampler."""
    if isinstance(sampler, SequentialSampler):
        return True
    if isinstance(sampler, DistributedSampler):
        inner = getattr(sampler.dataset, "_sampler", None)  # Lightning's DistributedSamplerWrapper
        return inner is None or _deterministic(inner)
    return False


def batch_indices(loader: Any) -> list[list[int]] | None:
    """The dataset indices of every batch ``loader`` yields (this epoch, on this rank), or
    ``None`` when its sampler does not tell them reliably (a ``RandomSampler``, a custom batch
    sampler, an ``IterableDataset``).

    >>> from torch.utils.data import DataLoader, DistributedSampler
    >>> data = list(range(5))
    >>> batch_indices(DataLoader(data, batch_size=2))
    [[0, 1], [2, 3], [4]]
    >>> batch_indices(DataLoader(data, batch_size=2, sampler=DistributedSampler(data, 2, 1, shuffle=False)))
    [[1, 3], [0]]
    >>> batch_indices(DataLoader(data, shuffle=True)) is None
    True
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    batch_sampler = getattr(batch_sampler, "_batch_sampler", batch_sampler)  # Lightning's predict wrapper
    if type(batch_sampler) is not BatchSampler or not _deterministic(batch_sampler.sampler):
        return None
    with torch.random.fork_rng(devices=[]):
        return [[int(i) for i in batch] for batch in batch_sampler]


def _total_batches(dataloader: Iterable[Any]) -> int | None:
    try:
        return len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _batch_size(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.ndim else 1
    if isinstance(value, Mapping):
        return _batch_size(next(v for v in value.values() if isinstance(v, torch.Tensor)))
    if isinstance(value, (tuple, list)) and value:
        return _batch_size(value[0])
    raise TypeError(f"cannot tell the batch size of a {type(value).__name__}; pass forward_fn=...")


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor | None, int]:
    """``(model inputs, labels or None, batch size)``."""
    if isinstance(batch, torch.Tensor):
        return batch, None, _batch_size(batch)
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        label = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        size = _batch_size(inputs)
        return inputs, _as_labels(label, size), size
    if isinstance(batch, (tuple, list)) and batch:
        size = _batch_size(batch[0])
        label = batch[1] if len(batch) > 1 else None
        return batch[0], _as_labels(label, size), size
    raise TypeError(
        f"batches must be a tensor, a tuple/list (x, y, ...) or a dict; got {type(batch).__name__}. "
        "Pass forward_fn=lambda model, batch: ... for other batch types"
    )


def _as_labels(value: Any, size: int) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor) and value.ndim == 1 and value.shape[0] == size and not value.is_floating_point():
        return value
    return None


def _truncate(batch: Any, keep: int) -> Any:
    """The first ``keep`` samples of every tensor in ``batch`` (with the batch's leading size)."""
    size = _batch_size(batch)
    if keep >= size:
        return batch
    return _slice(batch, keep, size)


def _slice(value: Any, keep: int, size: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:keep] if value.ndim and value.shape[0] == size else value
    if isinstance(value, Mapping):
        return {k: _slice(v, keep, size) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_slice(v, keep, size) for v in value)
    return value


def _to_device(value: Any, device: str | torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    return value
