"""Wall-time overhead of AlignmentMonitor at its default settings on FashionCNN training.

Trains FashionCNN on real Fashion-MNIST with and without the monitor (defaults, checking every
``--every`` steps: the model against itself, layer x layer; with ``--reference minilm`` also
against MiniLM reading each probe image's class name, CKA), same seed, runs interleaved in one
process (plain, monitored, plain, monitored, ...) after one warm-up run of each, and prints each
pair's wall time, the median ratio monitored / plain and the spread (min-max) of the pair ratios.

    python benchmarks/monitor_overhead.py [--train-samples 60000] [--epochs 1] [--repeats 3] [--every 50] [--reference none]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from torchvision.transforms import ToTensor  # noqa: E402

from prh_lightning.callbacks import AlignmentMonitor, Reference  # noqa: E402
from prh_lightning.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist  # noqa: E402
from prh_lightning.models.fashion_cnn import FashionCNN  # noqa: E402
from prh_lightning.models.pretrained import load_minilm  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-samples", type=int, default=60000)
    parser.add_argument("--val-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128, help="as in recipes/fashion_mnist.py")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (plain, monitored), interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--every", type=int, default=50, help="monitor check interval in optimiser steps")
    parser.add_argument("--reference", choices=("none", "minilm"), default="none",
                        help="none: the monitor's defaults (no reference); minilm: MiniLM on class names (cka) besides")
    return parser.parse_args(argv)


class TimedMonitor(AlignmentMonitor):
    """AlignmentMonitor that adds up the wall time spent inside its own hooks."""

    seconds = 0.0

    def _timed(self, hook: str, *args, **kwargs) -> None:
        start = time.perf_counter()
        getattr(super(), hook)(*args, **kwargs)
        TimedMonitor.seconds += time.perf_counter() - start

    def setup(self, *args, **kwargs) -> None:
        self._timed("setup", *args, **kwargs)

    def on_train_start(self, *args, **kwargs) -> None:
        self._timed("on_train_start", *args, **kwargs)

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self._timed("on_train_batch_end", *args, **kwargs)

    def on_validation_end(self, *args, **kwargs) -> None:
        self._timed("on_validation_end", *args, **kwargs)

    def on_train_end(self, *args, **kwargs) -> None:
        self._timed("on_train_end", *args, **kwargs)


def train_once(args: argparse.Namespace, data: dict, monitor_factory, logdir: str) -> float:
    """Seconds for one ``Trainer.fit`` (model construction and data are outside the timing)."""
    L.seed_everything(0, verbose=False)
    model = FashionCNN()
    callbacks = [monitor_factory()] if monitor_factory else []
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=callbacks,
        logger=TensorBoardLogger(logdir), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )
    train = DataLoader(data["train"], batch_size=args.batch_size, shuffle=True)
    val = DataLoader(data["val"], batch_size=256)
    start = time.perf_counter()
    trainer.fit(model, train, val)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    test = load_fashion_mnist(train=False, transform=ToTensor())
    data = {
        "train": Subset(load_fashion_mnist(train=True, transform=ToTensor()), range(args.train_samples)),
        "val": Subset(test, range(args.val_samples)),
    }
    minilm = load_minilm() if args.reference == "minilm" else None

    def monitor() -> AlignmentMonitor:  # default settings; only the interval (and the reference asked for) are ours
        if minilm is None:
            return TimedMonitor(every_n_train_steps=args.every)
        names = Reference(minilm, class_names=CLASS_NAMES, metrics=("cka",))
        return TimedMonitor(references={"minilm": names}, every_n_train_steps=args.every)

    print(
        f"FashionCNN, {args.train_samples} train / {args.val_samples} val images, {args.epochs} epoch(s), "
        f"batch {args.batch_size}, {args.threads} thread(s); monitor: defaults (probe: 256 validation "
        f"samples, cka + mutual_knn, layers='*', images at validation end) + every {args.every} steps"
        + (", MiniLM on class names (cka)" if minilm is not None else ", no reference")
    )
    plain, monitored, inside = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        # warm-up of both paths (imports, allocator, first-call overheads), as the Hugging Face
        # benchmark does; the monitored warm-up's hook time shows the one-time cost of a process
        train_once(args, data, None, tmp)
        TimedMonitor.seconds = 0.0
        first = train_once(args, data, monitor, tmp)
        print(f"  warm-up monitored run {first:.2f} s (inside the hooks {TimedMonitor.seconds:.2f} s, one-time "
              "imports such as matplotlib included)")
        for r in range(args.repeats):
            plain.append(train_once(args, data, None, tmp))
            TimedMonitor.seconds = 0.0
            monitored.append(train_once(args, data, monitor, tmp))
            inside.append(TimedMonitor.seconds)
            print(f"  pair {r + 1}: plain {plain[-1]:7.2f} s   monitored {monitored[-1]:7.2f} s   "
                  f"ratio {monitored[-1] / plain[-1]:.3f}   (time inside the monitor's hooks {inside[-1]:.2f} s)")
    ratios = [m / p for m, p in zip(monitored, plain)]
    ratio = statistics.median(ratios)
    print(f"median plain {statistics.median(plain):.2f} s, median monitored {statistics.median(monitored):.2f} s")
    print(f"overhead ratio (median of pairs): {ratio:.3f}  -> {100 * (ratio - 1):+.1f}% wall time; "
          f"spread of pair ratios {min(ratios):.3f}-{max(ratios):.3f}")
    share = statistics.median(t / (m - t) for t, m in zip(inside, monitored))
    print(f"time inside the monitor / rest of the monitored run (median): {share:.3f} -> {100 * share:+.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
