"""The fixed probe set shared by the callbacks, and the side-effect-free pass over it.

A probe is materialised once (at most ``max_samples`` rows) from a DataLoader, a tensor, an
``(x, y)`` pair or a mapping of tensors. :func:`probe_features` runs a model on it with taps,
in eval mode under ``no_grad`` and a forked RNG, then restores every module's training flag,
so the training run that hosts the callback is bit-identical with or without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from prh_lightning.taps import LayerTaps

ForwardFn = Callable[[nn.Module, Any], Any]
_LABEL_KEYS = ("labels", "label", "y", "target", "targets")


@dataclass
class Probe:
    """``n`` probe samples: ``x`` (a ``[n, ...]`` tensor, a mapping of ``[n, ...]`` tensors, or a
    list of ``n`` items) and optional ``y`` (``[n]`` labels)."""

    x: torch.Tensor | dict[str, torch.Tensor] | list
    y: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return num_rows(self.x)

    def chunks(self, batch_size: int) -> Iterable[Any]:
        """The inputs ``x`` in consecutive slices of ``batch_size`` rows."""
        for start in range(0, self.n, batch_size):
            yield slice_inputs(self.x, start, start + batch_size)


def slice_inputs(x: Any, start: int, stop: int) -> Any:
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels or None)`` of one batch: a tensor, ``(x, y, ...)``, or a dict with a label key."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        y = batch[1] if len(batch) > 1 and _is_label_vector(batch[1], batch[0]) else None
        return batch[0], y
    if isinstance(batch, Mapping):
        key = next((k for k in _LABEL_KEYS if k in batch), None)
        x = {k: v for k, v in batch.items() if k != key}
        return x, (batch[key] if key is not None and _is_label_vector(batch[key], x) else None)
    raise TypeError(
        f"cannot read probe inputs from a batch of type {type(batch).__name__}; "
        "batches must be a tensor, an (x, y) tuple or a dict of tensors"
    )


def _is_label_vector(y: Any, x: Any) -> bool:
    return isinstance(y, torch.Tensor) and y.ndim == 1 and y.shape[0] == num_rows(x)


def num_rows(x: Any) -> int:
    """Rows of a batch of inputs: a tensor / sequence, or a mapping of tensors."""
    if isinstance(x, Mapping):
        return int(next(iter(x.values())).shape[0])
    return len(x)


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    return [item for part in parts for item in part]


def make_probe(probe: Any, max_samples: int | None) -> Probe:
    """Materialise ``probe`` (DataLoader / iterable of batches, tensor, ``(x, y)``, mapping) as a
    :class:`Probe` of at most ``max_samples`` rows. Any RNG use (a shuffling sampler) is forked,
    so it does not shift the training run's random stream."""
    if isinstance(probe, Probe):
        return _truncate(probe, max_samples)
    if isinstance(probe, (torch.Tensor, Mapping)) or (isinstance(probe, tuple) and _looks_like_pair(probe)):
        x, y = split_batch(probe)
        return _truncate(Probe(x, y), max_samples)
    if not isinstance(probe, (DataLoader, Iterable)) or isinstance(probe, (str, bytes)):
        raise TypeError(
            f"probe must be a DataLoader, a tensor [n, ...], an (x, y) tuple or a dict of tensors; "
            f"got {type(probe).__name__}"
        )
    xs, ys, n = [], [], 0
    with torch.random.fork_rng(devices=[]):
        for batch in probe:
            x, y = split_batch(batch)
            xs.append(x)
            ys.append(y)
            n += num_rows(x)
            if max_samples is not None and n >= max_samples:
                break
    if not xs:
        raise ValueError("the probe DataLoader yielded no batches; give it at least one sample per k-NN neighbour + 1")
    y = torch.cat(ys) if all(v is not None for v in ys) else None
    return _truncate(Probe(_concat(xs), y), max_samples)


def _looks_like_pair(value: tuple) -> bool:
    return len(value) == 2 and isinstance(value[0], (torch.Tensor, Mapping))


def _truncate(probe: Probe, max_samples: int | None) -> Probe:
    if max_samples is None or probe.n <= max_samples:
        return probe
    y = None if probe.y is None else probe.y[:max_samples]
    return Probe(slice_inputs(probe.x, 0, max_samples), y)


def move_inputs(x: Any, device: torch.device) -> Any:
    """``x`` (tensor or mapping of tensors) on ``device``; other inputs (lists of strings) unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    return x


def default_forward(model: nn.Module, x: Any) -> Any:
    """``model(**x)`` for a mapping, else ``model(x)``."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def module_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (CPU when it has none)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def side_effect_free(model: nn.Module) -> Iterator[None]:
    """Eval mode, ``no_grad`` and a forked torch RNG (CPU and the model's CUDA device); every
    sub-module's ``training`` flag is restored on exit."""
    modes = {m: m.training for m in model.modules()}
    device = module_device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            for module, mode in modes.items():
                module.training = mode


def probe_features(
    model: nn.Module,
    chunks: Iterable[Any],
    layers: Any = "*",
    reduce: Any = "mean",
    forward_fn: ForwardFn | None = None,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Ordered ``{layer: Tensor[n, d]}`` of ``model`` on the input ``chunks`` (each moved to the
    model's device), recorded without side effects (see :class:`side_effect_free`). Features stay
    on ``device`` (default: the model's device)."""
    forward = forward_fn or default_forward
    target = module_device(model)
    with side_effect_free(model), LayerTaps(model, layers=layers, reduce=reduce, device=device or target) as taps:
        for chunk in chunks:
            forward(model, move_inputs(chunk, target))
        return taps.features()


def check_layer_selection(model: nn.Module, layers: Any) -> None:
    """Raise the taps' clear error now if ``layers`` names modules ``model`` does not have."""
    LayerTaps(model, layers=layers)
