"""Cost of the live calibration of AlignmentTracker / AlignmentMonitor per check.

FashionCNN (every leaf layer tapped) on a probe of ``--probe`` random 28 x 28 images,
against a frozen reference (a second FashionCNN, its conv1 / conv2 / avgpool / classifier),
metrics CKA and mutual k-NN (k = 10), within-model and snapshot matrices on (the defaults).
For each ``calibration=K`` the median wall time of one check (after a first check that
computes the frozen reference once) is printed with its ratio to ``calibration=0``, measured
interleaved in one process; for scale, the median time of one training step (batch 128, Adam).

    python benchmarks/monitor_calibration.py [--probe 256] [--ks 0 20 50 200] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from prh_lightning.models.fashion_cnn import FashionCNN
from prh_lightning.tracking import AlignmentTracker, Reference


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 20, 50, 200])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, other = FashionCNN(), FashionCNN()
    x = torch.rand(args.probe, 1, 28, 28)
    reference = Reference(other, layers=["conv1", "conv2", "avgpool", "classifier"])
    trackers = {k: AlignmentTracker(probe=x, references={"other": reference}, calibration=k) for k in args.ks}
    for tracker in trackers.values():
        tracker.check(model, 0)  # the frozen reference's features (and prepared states) once
    times: dict[int, list[float]] = {k: [] for k in args.ks}
    for step in range(1, args.repeats + 1):
        for k, tracker in trackers.items():
            start = time.perf_counter()
            tracker.check(model, step)
            times[k].append(time.perf_counter() - start)

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch, labels = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    steps = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        optimiser.zero_grad()
        F.cross_entropy(model(batch), labels).backward()
        optimiser.step()
        steps.append(time.perf_counter() - start)

    base = statistics.median(times[args.ks[0]])
    layers = len(next(iter(trackers.values())).model_layers)
    print(f"probe n={args.probe}, {layers} model layers x 4 reference layers, metrics cka + mutual_knn, threads={args.threads}")
    print(f"one training step (batch 128): {statistics.median(steps) * 1e3:.1f} ms")
    for k in args.ks:
        t = statistics.median(times[k])
        print(f"calibration={k:>4}: {t * 1e3:8.1f} ms per check  ({t / base:.2f}x calibration={args.ks[0]})")


if __name__ == "__main__":
    main()
