"""Wall-time overhead of the Hugging Face front end (``AlignmentTrainerCallback``) at its defaults.

Trains with a real ``transformers.Trainer``, with and without ``AlignmentTrainerCallback.attach(
trainer, AlignmentTracker(every_n_steps=...))`` (tracker defaults: probe = 256 samples of the
training data, ``layers="auto"``, CKA + mutual k-NN, 20 calibration permutations, no
reference), same seed, runs interleaved in one process (plain, tracked, plain, tracked, ...).
Two workloads (``--task``):

- ``fashion`` (default, the run of ``monitor_overhead.py`` through the Hugging Face front end):
  FashionCNN on the real Fashion-MNIST training images (one epoch, batch 128, Adam 1e-3 as in
  the recipe), the model wrapped so that ``forward(pixel_values, labels)`` returns the loss
  the Trainer expects.
- ``minilm``: fine-tunes the offline all-MiniLM-L6-v2 (``AutoModelForSequenceClassification``,
  a fresh classification head) on a few hundred short template sentences (4 topics), batch 8;
  ``layers="auto"`` is one layer per transformer block. The probe's forward pass (256 texts
  through MiniLM) weighs far more against a training step here than for FashionCNN.
 Scalars go to TensorBoard
through ``report_to`` in both runs. Prints each pair's wall time of ``trainer.train()``, the
median ratio tracked / plain, the spread (min-max) of the pair ratios and the time spent inside
the callback's hooks, split into the probe's forward passes, the scoring (matrices and chance
levels) and the figures. The warm-up runs one plain and one tracked run first, so one-time
imports of either path (matplotlib, TensorBoard's writer) fall on neither side of a pair.

    python benchmarks/monitor_overhead_hf.py [--task fashion] [--repeats 3] [--every 50] [--layers auto]
    python benchmarks/monitor_overhead_hf.py --task minilm [--texts 400] [--epochs 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TOPICS = {
    "sports": ["striker", "goalkeeper", "coach", "referee", "runner", "team", "league", "match"],
    "weather": ["storm", "rain", "forecast", "wind", "snow", "heatwave", "cloud", "fog"],
    "food": ["soup", "bread", "recipe", "cheese", "salad", "oven", "spice", "dessert"],
    "music": ["guitar", "concert", "drummer", "melody", "choir", "album", "violin", "singer"],
}
ADJECTIVES = ["new", "old", "loud", "quiet", "famous", "strange", "local", "tiny", "huge", "early"]
VERBS = ["surprised", "delighted", "worried", "bored", "amazed", "annoyed"]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("fashion", "minilm"), default="fashion",
                        help="FashionCNN on Fashion-MNIST (default) or a MiniLM fine-tune on template sentences")
    parser.add_argument("--train-samples", type=int, default=60000, help="fashion: training images")
    parser.add_argument("--texts", type=int, default=400, help="minilm: training sentences")
    parser.add_argument("--epochs", type=int, default=None, help="default: 1 (fashion), 2 (minilm)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 (fashion, as the recipe), 8 (minilm)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (plain, tracked), interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    parser.add_argument("--every", type=int, default=50, help="tracker check interval in optimiser steps")
    parser.add_argument("--layers", default="auto", help="the tracker's layers= ('auto', one per block, is its default; '*': every leaf)")
    args = parser.parse_args(argv)
    fashion = args.task == "fashion"
    args.epochs = args.epochs if args.epochs is not None else (1 if fashion else 2)
    args.batch_size = args.batch_size if args.batch_size is not None else (128 if fashion else 8)
    return args


def sentences(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` short sentences ``"the <adj> <word> <verb> everyone"`` labelled by the word's topic."""
    g = torch.Generator().manual_seed(seed)
    topics = list(TOPICS)
    texts, labels = [], []
    for _ in range(n):
        t = int(torch.randint(len(topics), (1,), generator=g))
        words = TOPICS[topics[t]]
        pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
        texts.append(f"the {pick(ADJECTIVES)} {pick(words)} {pick(VERBS)} everyone at the {pick(words)}")
        labels.append(t)
    return texts, labels


class Texts(torch.utils.data.Dataset):
    def __init__(self, encodings: dict, labels: list[int]) -> None:
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.encodings.items()}, "labels": self.labels[i]}


class FashionImages(torch.utils.data.Dataset):
    """Fashion-MNIST images ``[1, 28, 28]`` in ``[0, 1]`` as the dicts a ``Trainer`` collates;
    ``targets`` lets the probe draw stratify by class."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i], "labels": self.targets[i]}


class FashionClassifier(torch.nn.Module):
    """FashionCNN with the ``forward(pixel_values, labels) -> {"loss", "logits"}`` a
    ``transformers.Trainer`` trains."""

    def __init__(self) -> None:
        super().__init__()
        from prh_lightning.models.fashion_cnn import FashionCNN

        self.cnn = FashionCNN()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.cnn(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


class Workload:
    """One benchmark task: its training data, a fresh model, the collator and learning rate."""

    def __init__(self, args: argparse.Namespace) -> None:
        import transformers

        self.task = args.task
        if self.task == "fashion":
            from torch.utils.data import Subset

            from prh_lightning.data.fashion_mnist import as_tensors, load_fashion_mnist

            images, targets = as_tensors(load_fashion_mnist(train=True))
            self.data = Subset(FashionImages(images, targets), range(min(args.train_samples, len(targets))))
            self.collator, self.lr = transformers.default_data_collator, 1e-3
            self.description = (f"FashionCNN on {len(self.data)} Fashion-MNIST training images, {args.epochs} "
                                f"epoch(s), batch {args.batch_size}")
        else:
            from prh_lightning.models.pretrained import minilm_path

            tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
            texts, labels = sentences(args.texts)
            self.data = Texts(dict(tokenizer(texts, truncation=True)), labels)
            self.collator, self.lr = transformers.DataCollatorWithPadding(tokenizer), 5e-5
            self.description = (f"MiniLM (all-MiniLM-L6-v2) sequence classification, {args.texts} sentences, "
                                f"{args.epochs} epoch(s), batch {args.batch_size}")

    def model(self) -> torch.nn.Module:
        if self.task == "fashion":
            return FashionClassifier()
        import transformers

        from prh_lightning.models.pretrained import minilm_path

        return transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(TOPICS))


_TIMED = []
_PARTS = {"probe forward": ("model_features",), "scoring": ("compute_matrices", "compute_chance")}


def time_tracker_parts(tracker, seconds: dict[str, float]) -> None:
    """Wrap ``tracker``'s probe pass and scoring methods (on the instance) so that their wall
    time adds up in ``seconds[part]``."""

    def timed(part: str, method):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - start

        return run

    for part, names in _PARTS.items():
        for name in names:
            setattr(tracker, name, timed(part, getattr(tracker, name)))


def timed_callback_class():
    """One ``TimedCallback`` class per process (created on first use: transformers imports late)."""
    if _TIMED:
        return _TIMED[0]
    from prh_lightning.integrations.huggingface import AlignmentTrainerCallback

    class TimedCallback(AlignmentTrainerCallback):
        """AlignmentTrainerCallback that adds up the wall time spent inside its own hooks."""

        seconds = 0.0
        parts: dict[str, float] = {}  # the probe forward, scoring and figures within ``seconds``

        def _timed(self, hook: str, *args, **kwargs):
            start = time.perf_counter()
            out = getattr(super(), hook)(*args, **kwargs)
            TimedCallback.seconds += time.perf_counter() - start
            return out

        def _log_figures(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._log_figures(*args, **kwargs)
            finally:
                parts = TimedCallback.parts
                parts["figures"] = parts.get("figures", 0.0) + time.perf_counter() - start

        def on_train_begin(self, *args, **kwargs):
            return self._timed("on_train_begin", *args, **kwargs)

        def on_step_end(self, *args, **kwargs):
            return self._timed("on_step_end", *args, **kwargs)

        def on_save(self, *args, **kwargs):
            return self._timed("on_save", *args, **kwargs)

        def on_evaluate(self, *args, **kwargs):
            return self._timed("on_evaluate", *args, **kwargs)

        def on_train_end(self, *args, **kwargs):  # the figures (heatmaps, curves) at the end of training
            return self._timed("on_train_end", *args, **kwargs)

    _TIMED.append(TimedCallback)
    return TimedCallback


def train_once(args: argparse.Namespace, work: Workload, tracked: bool, tmp: str) -> tuple[float, int, int]:
    """Seconds of one ``trainer.train()`` (model loading is outside the timing), checks run, model layers."""
    import transformers

    from prh_lightning.tracking import AlignmentTracker

    transformers.set_seed(0)
    model = work.model()
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(tmp, "tb")
    targs = transformers.TrainingArguments(
        output_dir=os.path.join(tmp, "out"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=work.lr, logging_steps=args.every, save_strategy="no", report_to=["tensorboard"], use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model, args=targs, train_dataset=work.data, data_collator=work.collator,
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # no log dicts on stdout
    tracker = None
    if tracked:  # defaults; only the interval (and, if asked, the layers) are ours
        tracker = AlignmentTracker(every_n_steps=args.every, **({} if args.layers == "auto" else {"layers": args.layers}))
        TimedCallback = timed_callback_class()
        time_tracker_parts(tracker, TimedCallback.parts)
        TimedCallback.attach(trainer, tracker)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return seconds, (tracker.n_checks if tracker is not None else 0), (len(tracker.model_layers) if tracker else 0)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    work = Workload(args)
    steps = args.epochs * -(-len(work.data) // args.batch_size)
    print(
        f"{work.description} ({steps} optimiser steps), {args.threads} thread(s); tracker: defaults "
        f"(probe 256 training samples, layers={args.layers!r}, cka + mutual_knn, calibration 20) + every "
        f"{args.every} steps; TensorBoard through report_to in both runs"
    )
    plain, tracked, inside, parts = [], [], [], []
    TimedCallback = timed_callback_class()
    with tempfile.TemporaryDirectory() as tmp:
        for tracked_warm_up in (False, True):  # warm-up (imports, allocator, first-call overheads) of both paths
            train_once(args, work, tracked_warm_up, tmp)
        for r in range(args.repeats):
            plain.append(train_once(args, work, False, tmp)[0])
            TimedCallback.seconds = 0.0
            TimedCallback.parts = {}
            seconds, checks, n_layers = train_once(args, work, True, tmp)
            tracked.append(seconds)
            inside.append(TimedCallback.seconds)
            parts.append(dict(TimedCallback.parts))
            print(f"  pair {r + 1}: plain {plain[-1]:7.2f} s   tracked {tracked[-1]:7.2f} s   "
                  f"ratio {tracked[-1] / plain[-1]:.3f}   (inside the callback {inside[-1]:.2f} s, "
                  f"{checks} checks, {n_layers} model layers)")
            print("          inside the callback: " + breakdown(inside[-1], parts[-1], checks))
    ratios = [t / p for t, p in zip(tracked, plain)]
    ratio = statistics.median(ratios)
    print(f"median plain {statistics.median(plain):.2f} s, median tracked {statistics.median(tracked):.2f} s")
    print(f"overhead ratio (median of pairs): {ratio:.3f}  -> {100 * (ratio - 1):+.1f}% wall time; "
          f"spread of pair ratios {min(ratios):.3f}-{max(ratios):.3f}")
    share = statistics.median(t / (m - t) for t, m in zip(inside, tracked))
    print(f"time inside the callback / rest of the tracked run (median): {share:.3f} -> {100 * share:+.1f}%")
    forward = statistics.median(p.get("probe forward", 0.0) / (m - t) for p, t, m in zip(parts, inside, tracked))
    print(f"of which the probe's forward passes alone (median): {forward:.3f} -> {100 * forward:+.1f}%")
    return 0


def breakdown(inside: float, parts: dict[str, float], checks: int) -> str:
    """``inside`` seconds split into the timed parts and the rest (logging, bookkeeping)."""
    rest = inside - sum(parts.values())
    named = [f"{part} {seconds:.2f} s" for part, seconds in parts.items()]
    per_check = parts.get("probe forward", 0.0) / max(checks, 1)
    return ", ".join(named + [f"other {rest:.2f} s"]) + f" ({per_check:.2f} s of forward per check)"


if __name__ == "__main__":
    raise SystemExit(main())
