"""Update-time input checks and sample-id de-duplication shared by the Metric classes.

Checks run on every ``update`` so that a bad batch fails where it is passed in, not at
``compute()`` an epoch later. (The functional core checks the full sample set again.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from prh_lightning.functional._validation import check_paired


def check_features_batch(x: Tensor, name: str) -> None:
    """Raise unless ``x`` is a finite floating ``[batch, d]`` tensor with ``batch, d >= 1``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [batch, d], got {type(x).__name__}")
    if x.ndim != 2:
        hint = f" (use {name}[:, None] for a single feature)" if x.ndim == 1 else " (pool or flatten it first)"
        raise ValueError(f"{name} must be 2-D [batch, d], got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}; call .float() first")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); every batch needs >= 1 sample and feature")


def check_finite(x: Tensor, name: str) -> None:
    """Raise if ``x`` holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or Inf in {bad} of {x.shape[0]} rows; clean the features first")


def check_index(index: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    """Validate optional sample ids ``[n]`` (integers); return them as int64 on ``device``."""
    if index is None:
        return None
    index = torch.as_tensor(index)
    if index.ndim != 1 or index.shape[0] != n:
        raise ValueError(f"index must hold one id per sample, shape [{n}], got shape {tuple(index.shape)}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"index must hold integer sample ids (e.g. dataset indices), got dtype {index.dtype}")
    return index.to(device=device, dtype=torch.long)


def check_pair_batch(a: Tensor, b: Tensor, index: Tensor | None = None) -> Tensor | None:
    """Check one paired batch ``a [batch, d_a]``, ``b [batch, d_b]``; return the checked ids or None."""
    check_features_batch(a, "a")
    check_features_batch(b, "b")
    check_paired(a, b)
    check_finite(a, "a")
    check_finite(b, "b")
    return check_index(index, a.shape[0], a.device)


def check_index_usage(seen_samples: bool, seen_index: bool, has_index: bool) -> None:
    """Sample ids must be given with every update or with none (else duplicates go unnoticed)."""
    if seen_samples and seen_index != has_index:
        raise ValueError(
            "pass `index` (sample ids) in every update or in none: earlier updates "
            f"{'had' if seen_index else 'had no'} ids, this one {'has' if has_index else 'has none'}"
        )


def first_occurrences(ids: Tensor) -> Tensor:
    """Positions ``[m]`` (ascending) of the first occurrence of each distinct id in ``ids [n]``."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return first.sort().values


def drop_duplicate_ids(ids: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Keep the first row of each sample id in every ``tensors[i] [n, ...]``.

    A duplicate (e.g. the padding a ``DistributedSampler`` adds) must carry the same
    features as its first copy; if not, the ids do not identify samples and this raises.
    """
    n = tensors[0].shape[0]
    if ids.numel() != n:
        raise ValueError(
            f"got {ids.numel()} sample ids for {n} samples; in DDP pass `index` on every rank or on none"
        )
    keep = first_occurrences(ids)
    if keep.numel() == n:
        return tensors
    uniq, inverse = torch.unique(ids, return_inverse=True)
    first_of = torch.empty_like(uniq)
    first_of[inverse[keep]] = keep  # id slot -> position of its first copy
    source = first_of[inverse]  # every row -> row of its first copy
    for x in tensors:
        if not torch.allclose(x, x[source], rtol=1e-3, atol=1e-5):
            raise ValueError(
                "rows with the same sample id have different features; `index` must identify samples "
                "(e.g. dataset indices), and the model must be deterministic (eval mode) while measuring"
            )
    return tuple(x[keep] for x in tensors)
