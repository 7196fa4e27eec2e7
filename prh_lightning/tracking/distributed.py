"""The collectives a tracker's check needs under ``torch.distributed`` (DDP in Lightning, Fabric,
the Hugging Face Trainer, a plain ``torchrun`` loop); no Lightning import.

Under DDP every rank holds the same model, so one check needs the model's features on the
probe once, not once per rank. The tracker splits the probe rows over the ranks
(:func:`shard_bounds`), each rank runs its rows, rank 0 gathers the features
(:meth:`Group.gather_rows`), computes every matrix and chance level alone, and broadcasts the
scalars (:meth:`Group.broadcast_json`), so every rank records and reports the same numbers.
Everything sent is tensors or JSON text: nothing is pickled.

>>> shard_bounds(10, world_size=3, rank=0), shard_bounds(10, 3, 1), shard_bounds(10, 3, 2)
((0, 4), (4, 7), (7, 10))
>>> current() is None  # not inside an initialised process group of 2 or more ranks
True
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import distributed as dist


def current() -> Group | None:
    """The default process group when ``torch.distributed`` is initialised with 2 or more ranks, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return Group(dist.get_rank(), dist.get_world_size(), device)


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that ``rank`` handles: consecutive blocks, in rank
    order, whose sizes differ by at most one (the first ``n % world_size`` ranks take one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class Group:
    """This process's ``rank`` of ``world_size`` and the ``device`` its collectives use (the
    current CUDA device for NCCL, else the CPU)."""

    rank: int
    world_size: int
    device: torch.device

    def broadcast_json(self, obj: Any = None, src: int = 0) -> Any:
        """``obj`` of rank ``src`` (plain JSON values; NaN allowed) on every rank."""
        data = json.dumps(obj).encode() if self.rank == src else b""
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(length, src)
        buffer = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        if self.rank == src:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buffer, src)
        return obj if self.rank == src else json.loads(buffer.cpu().numpy().tobytes())

    def all_gather_json(self, obj: Any) -> list[Any]:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (plain JSON values)."""
        data = json.dumps(obj).encode()
        length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        lengths = [torch.empty_like(length) for _ in range(self.world_size)]
        dist.all_gather(lengths, length)
        longest = max(int(t.item()) for t in lengths)
        mine = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        if data:
            mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        return [json.loads(p[: int(n.item())].cpu().numpy().tobytes()) for p, n in zip(parts, lengths)]

    def gather_rows(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """Rank 0: ``Tensor[sum(counts), d]``, every rank's ``rows [counts[rank], d]`` in rank
        order; other ranks: ``None``. Every rank must pass the same ``counts`` and ``d``."""
        longest = max(counts)
        padded = torch.zeros(longest, rows.shape[1], dtype=rows.dtype, device=self.device)
        padded[: rows.shape[0]] = rows.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(padded, parts, dst=0)
        if self.rank != 0:
            return None
        return torch.cat([p[:c] for p, c in zip(parts, counts)])
