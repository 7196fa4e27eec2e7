"""AlignmentTracker under DDP: probe pass sharded over the ranks and gathered on rank 0
(``distributed_probe="shard"``) vs the whole probe pass on rank 0 (``"rank0"``).

Two processes (gloo, CPU, one thread each, as Lightning's CPU DDP sets them) hold the same
FashionCNN (every leaf layer tapped) and a probe of ``--probe`` random 28 x 28 images. Timed on
rank 0, from a barrier to a barrier, with both modes interleaved (order alternating) in the
same processes:

- ``probe pass``: a check with no matrices (no reference, no within-model, no snapshots): the
  model's pass over the probe plus the collectives (header exchange, gather, broadcast);
- ``full check``: the defaults (CKA + mutual k-NN, within-model, snapshots, a frozen
  reference, ``calibration=20``), computed on rank 0 in both modes.

Prints the median and the [min, max] of ``--repeats`` checks per mode and the ratio
shard / rank0 of the medians; the single-process time of the same probe pass is the baseline
(rank 0 alone, no collectives). The values of both modes are checked to agree.

    python benchmarks/monitor_ddp.py [--probe 512] [--repeats 7] [--world 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp
from torch import distributed as dist

from prh_lightning.models.fashion_cnn import FashionCNN
from prh_lightning.tracking import AlignmentTracker, Reference

MODES = ("shard", "rank0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(tracker: AlignmentTracker, model, step: int) -> tuple[float, dict[str, float]]:
    dist.barrier()
    start = time.perf_counter()
    values = tracker.check(model, step)
    dist.barrier()
    return time.perf_counter() - start, values


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model, other = FashionCNN(), FashionCNN()
        x = torch.rand(args.probe, 1, 28, 28)
        reference = {"other": Reference(other, layers=["conv1", "conv2", "avgpool", "classifier"])}
        bare = dict(within_model=False, snapshots=False, calibration=0)
        trackers = {
            ("probe pass", m): AlignmentTracker(probe=x, distributed_probe=m, **bare) for m in MODES
        } | {("full check", m): AlignmentTracker(probe=x, references=reference, distributed_probe=m) for m in MODES}
        for tracker in trackers.values():  # warm-up; the frozen reference's features once
            tracker.check(model, 0)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in trackers}
        last: dict[tuple[str, str], dict[str, float]] = {}
        for step in range(1, args.repeats + 1):
            for what in ("probe pass", "full check"):
                for mode in MODES if step % 2 else reversed(MODES):
                    seconds, last[what, mode] = _timed(trackers[what, mode], model, step)
                    times[what, mode].append(seconds)
        single = []
        if rank == 0:  # baseline: the same probe pass in this process alone, no collectives
            tracker = trackers["probe pass", "rank0"]
            for _ in range(args.repeats):
                start = time.perf_counter()
                tracker.model_features(model)
                single.append(time.perf_counter() - start)
        dist.barrier()
        if rank != 0:
            return
        a, b = last["full check", "shard"], last["full check", "rank0"]
        worst = max(abs(a[t] - b[t]) for t in a if a[t] == a[t])
        print(f"world={world} (gloo, 1 thread each), probe n={args.probe}, FashionCNN "
              f"{len(trackers['full check', 'shard'].model_layers)} layers, repeats={args.repeats}")
        print(f"single process, probe pass alone: median {statistics.median(single) * 1e3:.1f} ms "
              f"[{min(single) * 1e3:.1f}, {max(single) * 1e3:.1f}]")
        for what in ("probe pass", "full check"):
            med = {m: statistics.median(times[what, m]) for m in MODES}
            for m in MODES:
                t = times[what, m]
                print(f"{what:>10} {m:>5}: median {med[m] * 1e3:7.1f} ms [{min(t) * 1e3:.1f}, {max(t) * 1e3:.1f}]")
            print(f"{what:>10} ratio shard / rank0 (medians): {med['shard'] / med['rank0']:.2f}")
        print(f"max |shard - rank0| over the {len(a)} logged values of the last check: {worst:.2e}")
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average (1, 5, 15 min) at the end: {load} on {os.cpu_count()} CPUs (other jobs slow both modes)")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args(argv)
    mp.spawn(_worker, args=(args.world, _free_port(), args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
