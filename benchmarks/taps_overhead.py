"""Forward-time overhead of LayerTaps: resnet18 with every leaf layer tapped and mean-reduced,
against the same model untapped, timed alternately in one process (goal, issue 16: ratio <= 1.05).

    python benchmarks/taps_overhead.py [--batch 64] [--size 224] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from prh_lightning import LayerTaps


def timed_forward(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", default="*", help="LayerTaps selection (default: every leaf)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    taps = LayerTaps(model, layers=args.layers, reduce="mean")
    plain_times, tapped_times = [], []
    with torch.no_grad():
        model(x)  # warm-up (allocator, kernels)
        for repeat in range(args.repeats):
            if repeat % 2:  # alternate which runs first, so drift hits both alike
                plain_times.append(timed_forward(model, x))
            with taps:
                tapped_times.append(timed_forward(model, x))
            if not repeat % 2:
                plain_times.append(timed_forward(model, x))
            layers, rows = len(taps.features()), taps.n
            taps.clear()
    plain, tapped = statistics.median(plain_times), statistics.median(tapped_times)
    ratio = tapped / plain
    print(f"resnet18, batch {args.batch}, {args.size}x{args.size}, CPU, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"untapped forward (median): {plain * 1e3:8.1f} ms")
    print(f"tapped   forward (median): {tapped * 1e3:8.1f} ms   ({layers} layers x {rows} rows, mean-reduced)")
    print(f"ratio tapped/untapped:     {ratio:8.3f}   (goal <= 1.05)")
    return ratio


if __name__ == "__main__":
    main()
