"""Reduce one layer output to ``[n, d]`` inside the hook, so memory stays small.

Layouts (decided per module when the hook is built):

- ``[n, d]``: already features; every named reduction keeps it as it is.
- ``[n]``: one number per sample, kept as ``[n, 1]``.
- ``[n, T, d]`` (sequence, tokens): the default for 3-d outputs of any module that is not
  a convolution, batch/instance norm or pooling layer.
- ``[n, C, *spatial]`` (channels first): 4-d and larger outputs, and 3-d outputs of
  ``Conv1d``/``BatchNorm1d``/pooling modules, and of shape-preserving modules (``ReLU``,
  ``GELU``, ...) applied to such an output (``LayerTaps`` follows the tensor from the conv; a
  non-conv module that changes the shape in between, or a functional call such as
  ``torch.relu`` between a tapped module and the conv, is not followed: tap the conv, or give
  ``reduce=`` a callable).
- ``[T, n, d]`` (sequence first): 3-d outputs of ``nn.MultiheadAttention``, the
  ``nn.Transformer*`` modules and ``nn.RNN``/``LSTM``/``GRU`` built with ``batch_first=False``
  are transposed to ``[n, T, d]`` first. Other modules inside such a model (a ``Linear`` on
  ``[T, n, d]``) cannot be told apart from ``[n, T, d]``; ``LayerTaps`` then finds layers with
  different row counts and raises.

Modes: ``"mean"`` over positions (tokens weighted by the attention mask when one of shape
``[n, T]`` is known), ``"max"`` over positions (padding excluded), ``"cls"``/``"first"``
(position 0), ``"last"`` (last non-padded token), ``"flatten"`` (``[n, prod(rest)]``),
``None`` (raw output, any shape), or a callable ``f(x)`` / ``f(x, attention_mask)``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

Reducer = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
ReduceSpec = str | Callable[..., torch.Tensor] | None

REDUCE_MODES = ("mean", "max", "cls", "first", "last", "flatten")

_CHANNEL_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)


_SEQUENCE_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
    nn.modules.rnn.RNNBase,
)


def is_channels_first(module: nn.Module) -> bool:
    """Whether a 3-d output of ``module`` is ``[n, C, L]`` rather than ``[n, T, d]``."""
    return isinstance(module, _CHANNEL_FIRST_TYPES)


def is_sequence_first(module: nn.Module) -> bool:
    """Whether a 3-d output of ``module`` is ``[T, n, d]`` (a ``batch_first=False`` attention,
    transformer or RNN module).

    >>> is_sequence_first(nn.MultiheadAttention(8, 2)), is_sequence_first(nn.LSTM(4, 4, batch_first=True))
    (True, False)
    """
    if not isinstance(module, _SEQUENCE_FIRST_TYPES):
        return False
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        module = module.layers[0] if len(module.layers) else module
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    return not getattr(module, "batch_first", True)


class ScalarOutput(ValueError):
    """A layer returned a 0-dim tensor."""


def _as_tokens(x: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """View ``x`` as ``[n, positions, d]``."""
    if x.ndim == 3 and not channels_first:
        return x
    return x.flatten(2).transpose(1, 2)


def _mask_for(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as ``[n, T, 1]`` in ``x``'s dtype, if it fits the token axis of ``x``, else ``None``."""
    if mask is None or mask.shape != x.shape[:2]:
        return None
    return mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)


def _low_rank(x: torch.Tensor) -> torch.Tensor | None:
    if x.ndim == 2:
        return x
    if x.ndim == 1:
        return x.unsqueeze(1)
    if x.ndim == 0:
        raise ScalarOutput("a 0-dim tensor (a scalar such as an auxiliary loss) has no batch dimension to record")
    return None


def make_reducer(reduce: ReduceSpec, channels_first: bool, sequence_first: bool = False) -> Reducer:
    """A function ``(x [n, ...], attention_mask [n, T] | None) -> [n, d]`` for one module
    (``sequence_first``: 3-d inputs are ``[T, n, d]`` and are transposed first)."""
    if sequence_first:
        inner = make_reducer(reduce, channels_first=False)
        return lambda x, mask: inner(x.transpose(0, 1) if x.ndim == 3 else x, mask)
    if reduce is None:
        return lambda x, mask: x
    if callable(reduce):
        return _wrap_callable(reduce)
    if reduce not in REDUCE_MODES:
        raise ValueError(f"unknown reduce={reduce!r}; use one of {REDUCE_MODES}, None (raw) or a callable")

    def reducer(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        low = _low_rank(x)
        if low is not None:
            return low
        if reduce == "flatten":
            return x.flatten(1)
        if x.ndim >= 3 and channels_first and reduce in ("mean", "max"):
            return spatial_mean(x) if reduce == "mean" else x.flatten(2).amax(-1)
        tokens = _as_tokens(x, channels_first)
        if reduce == "mean" and x.ndim >= 4 and _mask_for(tokens, mask) is None:
            return spatial_mean(x)  # a 4-d map after a non-conv module (ReLU, add): same mean, one pass
        if reduce in ("cls", "first"):
            return tokens[:, 0]
        m = _mask_for(tokens, mask)
        if reduce == "mean":
            if m is None:
                return tokens.mean(1)
            return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        if reduce == "max":
            if m is None:
                return tokens.amax(1)
            return tokens.masked_fill(m == 0, float("-inf")).amax(1)
        # "last": the last position whose mask is 1 (works for left and right padding)
        if m is None:
            return tokens[:, -1]
        positions = torch.arange(tokens.shape[1], device=tokens.device, dtype=tokens.dtype)
        last = (m.squeeze(-1) * (positions + 1)).argmax(1)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]

    return reducer


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a channels-first ``x [n, C, *spatial]`` over its positions: ``[n, C]``, a new tensor.

    Contiguous float CPU maps (a network's large early feature maps) take one matrix-vector
    product with a cached ``1 / P`` vector: one read of the map, about 20 % faster than
    ``mean`` there; the result equals ``mean`` up to float rounding (about 4e-7 relative).

    >>> spatial_mean(torch.arange(8.0).view(1, 2, 2, 2))
    tensor([[1.5000, 5.5000]])
    """
    flat = x.flatten(2)
    positions = flat.shape[-1]
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous() or positions < 64:
        return flat.mean(-1)
    return torch.mv(flat.view(-1, positions), _inverse_counts(positions, x.dtype)).view(flat.shape[:2])


@functools.lru_cache(maxsize=32)
def _inverse_counts(positions: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((positions,), 1.0 / positions, dtype=dtype)


def _wrap_callable(fn: Callable[..., torch.Tensor]) -> Reducer:
    """Call ``fn(x, mask)`` if it takes two positional arguments, else ``fn(x)``."""
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
        takes_mask = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    except (TypeError, ValueError):  # builtins without a signature
        takes_mask = False
    if takes_mask:
        return fn
    return lambda x, mask: fn(x)
