"""The fixed probe set and the side-effect-free pass of a model over it (no Lightning import).

A probe is materialised once (at most ``max_samples`` rows) from a DataLoader, a tensor, a
tuple / list of tensors (``(x, y)``, ``(inputs, target)``, ...) or a mapping of tensors. The
whole batch is kept, in the form the model's own steps receive it, so a model whose
``forward`` takes several inputs gets all of them. Batches padded to different lengths (Hugging
Face's ``DataCollatorWithPadding``) are padded once to the probe's longest length; the
attention mask is padded with zeros, so padding stays masked.

:func:`call_model` hands a batch to a model the way its ``forward`` signature asks for;
:func:`probe_features` runs a model over the probe with layer taps in eval mode under
``no_grad`` and a forked RNG and restores every module's training flag, so a training run that
hosts a monitor is bit-identical with or without it.

>>> probe = make_probe((torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 0, 1, 0, 1])), max_samples=4)
>>> probe.n, probe.labels.tolist()
(4, [0, 1, 0, 1])
>>> call_model(torch.nn.Linear(2, 1), probe.batch).shape  # forward(x) of an (x, y) batch: x
torch.Size([4, 1])
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prh_lightning.taps import LayerTaps

ForwardFn = Callable[[nn.Module, Any], Any]
TOKEN_POOLING = ("mean", "max", "cls", "first", "last")  # reductions that ignore padding (see taps.reduction)
_LABEL_KEYS = ("labels", "label", "y", "target", "targets")
_PAD_VALUES = {"labels": -100}  # Hugging Face's ignore index; every other key pads with 0


class ForwardError(TypeError):
    """The probe batch could not be handed to the model; the message says how to fix it."""


@dataclass
class Probe:
    """``n`` probe samples.

    Attributes:
        batch: the probe as one batch, in the form the data loader yields it: a tensor
            ``[n, ...]``, a tuple / list of ``[n, ...]`` tensors, or a mapping of ``[n, ...]`` tensors.
        labels: ``[n]`` class labels when the batch holds them (``(x, y)`` or a label key), else None.
    """

    batch: Any
    labels: torch.Tensor | None = None
    _plans: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        return num_rows(self.batch)

    @property
    def x(self) -> Any:
        """The model inputs without the labels (what a reference model reads by default)."""
        return split_batch(self.batch)[0]

    @property
    def y(self) -> torch.Tensor | None:
        return self.labels

    def chunks(self, batch_size: int) -> Iterable[Any]:
        """The whole batch in consecutive slices of ``batch_size`` rows."""
        for start in range(0, self.n, batch_size):
            yield slice_inputs(self.batch, start, start + batch_size)

    def length_sorted_chunks(self, batch_size: int) -> tuple[list[Any], torch.Tensor] | None:
        """Token batches by length: ``(chunks, order)``, where the rows ``order`` (``[n]``,
        shortest first) are cut into chunks of ``batch_size`` rows, each trimmed to its own
        longest row (the last non-zero ``attention_mask`` position), so short texts are not run
        at the probe's longest length. ``None`` when the batch is not a mapping with a ``[n, T]``
        ``attention_mask``. Built once per ``batch_size`` and kept (the probe is fixed)."""
        if batch_size not in self._plans:
            self._plans[batch_size] = _length_plan(self.batch, batch_size)
        return self._plans[batch_size]


def _length_plan(batch: Any, batch_size: int) -> tuple[list[Any], torch.Tensor] | None:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        return None
    n, width = mask.shape
    real = mask != 0
    # the position after the last real token: trimming there keeps every real token, whatever the padding side
    ends = torch.where(real.any(1), width - real.flip(1).int().argmax(1), torch.ones(n, dtype=torch.long))
    order = torch.argsort(ends, stable=True)
    chunks = []
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        keep = int(ends[rows].max())
        chunk = {}
        for key, value in batch.items():
            if _has_rows(value):
                value = value[rows]
                if value.ndim == 2 and value.shape[1] == width:  # token-level: input_ids, masks, token labels
                    value = value[:, :keep]
            chunk[key] = value
        chunks.append(chunk)
    return chunks, order


def probe_pass(
    model: nn.Module,
    probe: Probe,
    batch_size: int,
    layers: Any = "*",
    reduce: Any = "mean",
    forward_fn: ForwardFn | None = None,
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`probe_features` of ``model`` on the whole ``probe``, rows in probe order. A token
    probe (a mapping with an ``attention_mask``) pooled by a padding-aware ``reduce`` (one of
    :data:`TOKEN_POOLING`) runs in length-sorted batches trimmed to each batch's longest row
    (:meth:`Probe.length_sorted_chunks`); its rows are put back in probe order. The attention
    mask keeps padding out of every real token's value, so only float rounding differs from one
    pass at the probe's full length.

    >>> net = torch.nn.EmbeddingBag(10, 3, mode="sum")
    >>> ids = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 6], [7, 0, 0, 0]])
    >>> probe = Probe({"input": ids, "attention_mask": (ids > 0).long()})
    >>> probe.length_sorted_chunks(2)[1].tolist()  # shortest rows first
    [2, 0, 1]
    """
    plan = probe.length_sorted_chunks(batch_size) if isinstance(reduce, str) and reduce in TOKEN_POOLING else None
    if plan is None:
        return probe_features(model, probe.chunks(batch_size), layers, reduce, forward_fn, context=context)
    chunks, order = plan
    features = probe_features(model, chunks, layers, reduce, forward_fn, context=context)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return {name: value[inverse.to(value.device)] for name, value in features.items()}


def slice_inputs(x: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a tensor, a tuple / list of tensors, a mapping or a list of items."""
    if isinstance(x, Mapping):
        return {k: (v[start:stop] if _has_rows(v) else v) for k, v in x.items()}
    if isinstance(x, tuple) or (isinstance(x, list) and x and isinstance(x[0], torch.Tensor)):
        return type(x)(v[start:stop] if _has_rows(v) else v for v in x)
    return x[start:stop]


def _has_rows(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim >= 1


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels or None)`` of one batch: a tensor, ``(x, y, ...)``, or a dict with a label key.

    The labels are only read out (for stratified probes and references fed class names); the
    model still receives the whole batch (see :func:`call_model`).
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        y = batch[1] if len(batch) > 1 and _is_label_vector(batch[1], batch[0]) else None
        return batch[0], y
    if isinstance(batch, Mapping) and batch:
        key = next((k for k in _LABEL_KEYS if k in batch), None)
        x = {k: v for k, v in batch.items() if k != key}
        return x, (batch[key] if key is not None and x and _is_label_vector(batch[key], x) else None)
    raise TypeError(
        f"cannot read probe inputs from a batch of type {type(batch).__name__}; batches must be a tensor, "
        "a tuple / list of tensors or a dict of tensors"
    )


def _is_label_vector(y: Any, x: Any) -> bool:
    return isinstance(y, torch.Tensor) and y.ndim == 1 and not y.is_floating_point() and y.shape[0] == num_rows(x)


def num_rows(x: Any) -> int:
    """Rows of a batch: a tensor, a tuple / list of tensors (the first's rows), a mapping of
    tensors, or a list of items."""
    if isinstance(x, Mapping):
        return int(next(v for v in x.values() if _has_rows(v)).shape[0])
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return int(x[0].shape[0])
    return len(x)


def _pad_cat(parts: list[torch.Tensor], value: float = 0) -> torch.Tensor:
    """Concatenate along rows, padding trailing dimensions (sequence length) at the end to the
    longest part."""
    shape = [max(p.shape[d] for p in parts) for d in range(parts[0].ndim)]
    padded = []
    for p in parts:
        if list(p.shape[1:]) != shape[1:]:
            widths = [w for d in reversed(range(1, p.ndim)) for w in (0, shape[d] - p.shape[d])]
            p = F.pad(p, widths, value=value)
        padded.append(p)
    return torch.cat(padded)


def concat_batches(parts: list[Any]) -> Any:
    """One batch from several of the same form; tensors whose trailing sizes differ are padded."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return _pad_cat(parts)
    if isinstance(first, Mapping):
        return {
            k: (_pad_cat([p[k] for p in parts], _PAD_VALUES.get(k, 0)) if _has_rows(first[k]) else first[k])
            for k in first
        }
    if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor):
        return type(first)(concat_batches([p[i] for p in parts]) for i in range(len(first)))
    return [item for part in parts for item in part]


def make_probe(probe: Any, max_samples: int | None) -> Probe:
    """Materialise ``probe`` (DataLoader / iterable of batches, tensor, tuple / list of tensors,
    mapping) as a :class:`Probe` of at most ``max_samples`` rows. Any RNG use (a shuffling
    sampler) is forked, so it does not shift the training run's random stream."""
    if isinstance(probe, Probe):
        return _truncate(probe, max_samples)
    if isinstance(probe, (torch.Tensor, Mapping)) or (isinstance(probe, (tuple, list)) and _is_one_batch(probe)):
        return _truncate(Probe(probe, split_batch(probe)[1]), max_samples)
    if not isinstance(probe, Iterable) or isinstance(probe, (str, bytes)):
        raise TypeError(
            "probe must be a DataLoader, a tensor [n, ...], a tuple of tensors such as (x, y), or a dict of "
            f"tensors; got {type(probe).__name__}"
        )
    return _probe_from_batches(probe, max_samples)


def _probe_from_batches(batches_in: Iterable[Any], max_samples: int | None) -> Probe:
    batches, n = [], 0
    with torch.random.fork_rng(devices=[]):
        for batch in batches_in:
            split_batch(batch)  # a clear error for a batch form we cannot read
            batches.append(batch)
            n += num_rows(batch)
            if max_samples is not None and n >= max_samples:
                break
    if not batches:
        raise ValueError("the probe DataLoader yielded no batches; give it at least one sample per k-NN neighbour + 1")
    batch = concat_batches(batches)
    return _truncate(Probe(batch, split_batch(batch)[1]), max_samples)


def _is_one_batch(value: Sequence) -> bool:
    """A tuple / list of tensors with equal row counts (one batch), not a list of batches."""
    if not value or not all(isinstance(v, (torch.Tensor, Mapping)) for v in value):
        return False
    if not isinstance(value[0], torch.Tensor):
        return len(value) == 2
    rows = {v.shape[0] for v in value if isinstance(v, torch.Tensor) and v.ndim >= 1}
    return len(rows) == 1 and (isinstance(value, tuple) or len(value) <= 3)


def _truncate(probe: Probe, max_samples: int | None) -> Probe:
    if max_samples is None or probe.n <= max_samples:
        return probe
    labels = None if probe.labels is None else probe.labels[:max_samples]
    return Probe(slice_inputs(probe.batch, 0, max_samples), labels)


def move_inputs(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``x`` with every tensor on ``device``; floating tensors cast to ``dtype`` when given
    (the model's parameter dtype, e.g. bfloat16 for ``precision="bf16-true"``). Other inputs
    (lists of strings) are returned unchanged."""
    if isinstance(x, torch.Tensor):
        cast = dtype if dtype is not None and x.is_floating_point() else None
        return x.to(device, dtype=cast, non_blocking=True) if cast else x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: move_inputs(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return type(x)(move_inputs(v, device, dtype) for v in x)
    return x


def module_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (CPU when it has none)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def module_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter (None when it has none)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


# -- handing a batch to the model -------------------------------------------------------------
def _forward_params(model: nn.Module) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one probe ``batch`` the way its ``forward`` signature asks for.

    - a tensor: ``model(batch)``;
    - a mapping: ``model(**batch)``, keeping only the keys ``forward`` accepts (all of them when it
      takes ``**kwargs``); no key is dropped for its name alone;
    - a tuple / list: ``model(*batch)`` when ``forward`` requires exactly that many inputs (e.g.
      ``forward(inputs, target)``) or takes ``*args``; ``model(batch)`` when its one parameter is
      called ``batch``; else the leading elements it requires (``model(x)`` for a classifier's
      ``(x, y)``).

    Raises :class:`ForwardError` naming ``forward_fn`` when the model has no ``forward`` or the
    batch cannot be matched to its signature.
    """
    params = _forward_params(model)
    name = type(model).__name__
    if params is not None and _has_no_forward(model):
        raise ForwardError(
            f"{name} has no forward(); pass forward_fn=lambda model, batch: ... returning the model's output "
            "for a probe batch (for a LightningModule, e.g. lambda m, b: m.net(b[0]))"
        )
    if params is None or isinstance(batch, torch.Tensor):
        return model(batch)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    required = [p for p in positional if p.default is p.empty]
    if isinstance(batch, Mapping):
        if any(p.kind == p.VAR_KEYWORD for p in params):
            return model(**batch)
        names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        kwargs = {k: v for k, v in batch.items() if k in names}
        missing = [p.name for p in required if p.name not in kwargs]
        if missing and len(positional) == 1:
            return model(batch)  # forward(self, features: dict)
        if missing:
            raise ForwardError(
                f"{name}.forward needs {missing} but the probe batch has keys {sorted(batch)}; pass "
                "forward_fn=lambda model, batch: model(...) to say how a probe batch is fed to the model"
            )
        return model(**kwargs)
    if isinstance(batch, (tuple, list)):
        if len(positional) == 1 and positional[0].name == "batch" and not varargs:
            return model(batch)
        if varargs or len(required) == len(batch):
            return model(*batch)
        if len(required) < len(batch) and positional:
            return model(*batch[: max(len(required), 1)])
        raise ForwardError(
            f"{name}.forward takes {len(required)} required input(s) ({[p.name for p in required]}) but the probe "
            f"batch is a {type(batch).__name__} of {len(batch)}; pass forward_fn=lambda model, batch: model(...) to "
            "say how a probe batch is fed to the model"
        )
    return model(batch)


def _has_no_forward(model: nn.Module) -> bool:
    return type(model).forward is nn.Module.forward or getattr(type(model).forward, "__qualname__", "").startswith(
        "LightningModule."
    )


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
    context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, torch.Tensor]:
    """Ordered ``{layer: Tensor[n, d]}`` (float32) of ``model`` on the probe ``chunks``.

    Each chunk is moved to the model's device (floating inputs cast to its parameter dtype) and
    handed to ``forward_fn(model, chunk)`` (default :func:`call_model`), without side effects
    (see :func:`side_effect_free`), inside ``context()`` when given (e.g. a precision plugin's
    autocast). Features stay on ``device`` (default: the model's device).
    """
    forward = forward_fn or call_model
    target = module_device(model)
    dtype = module_dtype(model)
    ctx = context or contextlib.nullcontext
    with side_effect_free(model), LayerTaps(model, layers=layers, reduce=reduce, device=device or target) as taps:
        for chunk in chunks:
            with ctx():
                forward(model, move_inputs(chunk, target, dtype))
        return {name: value.float() for name, value in taps.features().items()}


def check_layer_selection(model: nn.Module, layers: Any) -> None:
    """Raise the taps' clear error now if ``layers`` names modules ``model`` does not have."""
    LayerTaps(model, layers=layers)


# -- a probe drawn from a training or validation DataLoader -------------------------------------
def dataset_labels(dataset: Any) -> torch.Tensor | None:
    """``[len(dataset)]`` class labels when the dataset exposes them cheaply (``targets`` /
    ``labels`` attribute, also through ``torch.utils.data.Subset``), else None."""
    from torch.utils.data import Subset

    if isinstance(dataset, Subset):
        base = dataset_labels(dataset.dataset)
        return None if base is None else base[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is None:
            continue
        try:
            labels = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError):
            continue
        if labels.ndim == 1 and labels.shape[0] == len(dataset) and not labels.is_floating_point():
            return labels
    return None


def sample_indices(n_total: int, size: int, seed: int, labels: torch.Tensor | None = None) -> list[int]:
    """``min(size, n_total)`` distinct indices in increasing order, drawn with ``seed``; with
    ``labels`` each class gets its proportional share (stratified).

    >>> idx = sample_indices(100, 10, seed=0, labels=torch.arange(100) % 2)
    >>> len(idx), sum(i % 2 for i in idx)
    (10, 5)
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_total, generator=g)
    if labels is not None:
        rank = torch.empty(n_total)
        shuffled = labels[order]
        for c in shuffled.unique():
            where = (shuffled == c).nonzero().flatten()
            rank[where] = (torch.arange(len(where), dtype=torch.float64) + 0.5).float() / len(where)
        order = order[torch.argsort(rank, stable=True)]
    return sorted(order[: min(size, n_total)].tolist())


def probe_from_loader(loader: Any, size: int, seed: int = 0) -> Probe:
    """A probe of ``size`` samples of a DataLoader's map-style dataset (drawn with ``seed``,
    stratified when the dataset exposes its labels), batched with the loader's own
    ``collate_fn`` (so padding collators work); an iterable dataset gives its first ``size`` rows."""
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None)
    if dataset is None or collate is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return make_probe(loader, size)
    indices = sample_indices(len(dataset), size, seed, dataset_labels(dataset))
    chunk = max(1, getattr(loader, "batch_size", None) or 64)
    with torch.random.fork_rng(devices=[]):
        batches = [collate([dataset[i] for i in indices[s : s + chunk]]) for s in range(0, len(indices), chunk)]
    return _probe_from_batches(batches, size)
