"""Shards of the buffered metrics' samples, one per rank, and the collectives the sharded
compute runs on them (see :mod:`prh_lightning.metrics._distributed`): which ranks take part,
repeated sample ids dropped across ranks, rows conditioned with statistics reduced over
ranks, and the row panels each rank broadcasts in turn."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from prh_lightning.functional._numerics import CONSTANT_RTOL, power_of_two_scale
from prh_lightning.metrics._checks import first_occurrences

KNN_METRICS = ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn")
SHARDED_METRICS = KNN_METRICS + ("cknna", "cka", "unbiased_cka", "svcca")
_BLOCK = 2**24  # entries of one [rows, panel] block (64 MB in float32)
_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def shards_across_ranks(process_group: Any = None) -> bool:
    """Is there more than one process in ``process_group`` (torch.distributed initialised)?"""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


class ShardGroup:
    """The collectives the sharded compute needs, over one process group."""

    def __init__(self, process_group: Any = None):
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world = dist.get_world_size(process_group)

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """``t`` combined over ranks (``"sum"``, ``"min"`` or ``"max"``); a new tensor."""
        out = t.clone()
        dist.all_reduce(out, op=_OPS[op], group=self.group)
        return out

    def sizes(self, n_local: int, device: torch.device) -> list[int]:
        """Rows held by every rank."""
        out = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor([n_local], dtype=torch.long, device=device), group=self.group)
        return [int(t) for t in out]

    def gather_rows(self, t: Tensor, sizes: list[int]) -> Tensor:
        """Concatenate every rank's ``t [sizes[rank], ...]`` in rank order (for small tensors:
        ids, neighbour lists); uneven sizes are padded for the transfer."""
        width = max(sizes)
        padded = t.new_zeros((width, *t.shape[1:]))
        padded[: t.shape[0]] = t
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded, group=self.group)
        return torch.cat([o[:s] for o, s in zip(out, sizes)])

    def panels(self, x: Tensor, sizes: list[int]) -> Iterator[tuple[int, Tensor]]:
        """``(offset, panel [n_r, ...])`` for every rank ``r`` in order: its rows, broadcast to all.
        Only one other rank's panel is held at a time."""
        offset = 0
        for r, size in enumerate(sizes):
            if r == self.rank:
                panel = x.contiguous()
            else:
                panel = x.new_empty((size, *x.shape[1:]))
            if size:
                dist.broadcast(panel, src=self._global(r), group=self.group)
            yield offset, panel
            offset += size


# -- the samples: de-duplication and conditioning -------------------------------------------


def deduplicate(group: ShardGroup, ids: Tensor | None, *local: Tensor) -> tuple[list[Tensor], list[int]]:
    """Drop the rows whose sample id appeared earlier in rank-major order; returns the kept
    local rows and every rank's kept count. Repeated ids must carry the same features (as in
    ``_checks.drop_duplicate_ids``): the rows involved (few: a sampler's padding) are
    gathered and compared."""
    device = local[0].device
    sizes = group.sizes(local[0].shape[0], device)
    with_ids = int(group.all_reduce(torch.tensor(int(ids is not None), device=device)))
    if with_ids == 0:
        return list(local), sizes
    if with_ids < group.world or ids.numel() != local[0].shape[0]:
        raise ValueError("pass `index` (one sample id per sample) on every rank or on none")
    everyone = group.gather_rows(ids, sizes)  # [n_total] ints: small
    keep = torch.zeros(everyone.numel(), dtype=torch.bool, device=device)
    keep[first_occurrences(everyone)] = True
    start = sum(sizes[: group.rank])
    mine = keep[start : start + sizes[group.rank]]
    repeated = torch.unique(everyone[~keep])
    if repeated.numel():  # compare every copy with the first one (rank-major order is kept by the gather)
        involved = torch.isin(ids, repeated)
        counts = group.sizes(int(involved.sum()), device)
        who = group.gather_rows(ids[involved], counts)
        first = first_occurrences(who)
        _, slot = torch.unique(who, return_inverse=True)
        source = torch.empty_like(first)
        source[slot[first]] = first
        for x in local:
            rows = group.gather_rows(x[involved], counts)
            if not torch.allclose(rows, rows[source[slot]], rtol=1e-3, atol=1e-5):
                raise ValueError(
                    "rows with the same sample id have different features; `index` must identify samples "
                    "(e.g. dataset indices), and the model must be deterministic (eval mode) while measuring"
                )
    kept = group.sizes(int(mine.sum()), device)
    return [x[mine] for x in local], kept


def condition_rows(
    group: ShardGroup, x: Tensor, name: str, normalize: bool, clip_quantile: float | None = None
) -> Tensor:
    """``x [n_r, d]`` in float64, outliers clipped and rows L2-normalised as ``_numerics.condition``
    does on the union (the clipping threshold, a mean over samples, is reduced over ranks; a
    rank may hold fewer than 2 rows). An all-zero row raises on every rank."""
    x64 = x.detach().to(torch.float64)
    if clip_quantile is not None:
        number = isinstance(clip_quantile, (int, float)) and not isinstance(clip_quantile, bool)
        if not number or not 0.0 < clip_quantile <= 1.0:
            raise ValueError(f"clip_quantile must be in (0, 1], got {clip_quantile!r}")
        if clip_quantile < 1.0:
            rows = max(1, 2**23 // max(1, x64.shape[1]))  # torch.quantile refuses inputs above 2**24 elements
            starts = range(0, x64.shape[0], rows)
            chunks = [torch.quantile(x64[s : s + rows].abs(), clip_quantile, dim=1) for s in starts]
            per_sample = torch.cat(chunks) if chunks else x64.new_zeros(0)
            total = group.all_reduce(torch.stack([per_sample.sum(), x64.new_tensor(float(x64.shape[0]))]))
            t = total[0] / total[1]
            x64 = x64.clamp(-t, t)
    if not normalize:
        return x64
    if x.dtype == torch.float64 and x64.numel():  # exact power-of-two rescale against over/underflow
        x64 = x64 * power_of_two_scale(float(x64.abs().max()))
    norms = torch.linalg.vector_norm(x64, dim=1, keepdim=True)
    zero = int(group.all_reduce(torch.tensor(int((norms == 0).sum()), device=x.device)))
    if zero:
        raise ValueError(
            f"{name} has {zero} all-zero rows; they have no direction and cannot be L2-normalised; drop such "
            "samples or pass normalize=False"
        )
    return x64 / norms


class Shard:
    """One layer's rows on this rank after conditioning: ``x64 [n_r, d]`` (float64) and the global
    facts the metrics need (total ``n``, every rank's size, this rank's offset)."""

    def __init__(
        self,
        group: ShardGroup,
        x: Tensor,
        sizes: list[int],
        name: str,
        normalize: bool,
        dtype: torch.dtype,
        clip_quantile: float | None = None,
    ):
        self.group, self.sizes, self.name, self.dtype = group, sizes, name, dtype
        self.n = sum(sizes)
        self.offset = sum(sizes[: group.rank])
        self.input_eps = float(torch.finfo(x.dtype).eps)
        self.x64 = condition_rows(group, x, name, normalize, clip_quantile)

    def centred(self, exact_mean: bool) -> tuple[Tensor, Tensor, float]:
        """``(xc [n_r, d] compute dtype, mean [d] float64, scale)`` as ``_numerics.centre`` does on
        the union: column ranges and means reduced over ranks; constant data raises."""
        x64, g = self.x64, self.group
        d = x64.shape[1]
        inf = torch.full((d,), float("inf"), dtype=torch.float64, device=x64.device)
        low = g.all_reduce(x64.amin(dim=0) if x64.shape[0] else inf, "min")
        high = g.all_reduce(x64.amax(dim=0) if x64.shape[0] else -inf, "max")
        spread = float((high - low).max())
        size = max(-float(low.min()), float(high.max()))
        if spread <= CONSTANT_RTOL * self.input_eps * size:
            raise ValueError(
                f"{self.name} is constant across its {self.n} samples (constant features: every row equals the "
                "others up to rounding), so the score is undefined; check for collapsed or all-equal representations"
            )
        mean = g.all_reduce(x64.sum(dim=0)) / self.n
        if not exact_mean:  # _numerics.grid_pivot of the union: exact subtraction, ties kept
            step = math.ldexp(1.0, math.frexp(spread)[1] - 1)
            mean = torch.round(mean / step) * step
        scale = power_of_two_scale(float(torch.maximum(high - mean, mean - low).max()))
        return ((x64 - mean) * scale).to(self.dtype), mean * scale, scale


# -- k-NN: running top-k over panels ---------------------------------------------------------




def check_every_rank_has_samples(has: bool, process_group: Any = None) -> None:
    """Raise on every rank (no rank left waiting in a collective) unless all ranks hold samples."""
    group = ShardGroup(process_group)
    missing = group.world - int(group.all_reduce(torch.tensor(int(has))))
    if missing:
        raise RuntimeError(
            f"{missing} of {group.world} ranks hold no samples; every rank must update before a sharded compute()"
        )
