"""Alignment during training: how similar are independently trained runs at each point of
training, and how far does each run drift from its final representation?

Offline (default): several Lightning runs (FashionCNN and/or grayscale ResNet-18, different
seeds) train on Fashion-MNIST; ``RepresentationRecorder`` saves the features of a fixed
probe set (Fashion-MNIST test images) every N steps, and the initial state is recorded too.
Online: Hugging Face model revisions (``--hf-models EleutherAI/pythia-70m,EleutherAI/pythia-160m
--revisions step1000,step2000,...``) go through the same analysis, on Flickr8k captions.

At every recorded step (:mod:`prh_lightning.analysis.dynamics`): mutual k-NN between every pair
of runs at the compared layer (percentile bootstrap over probe images, the same resamples at
every step so start and end are compared with a paired interval) and at the best layer pair;
within-run drift: each checkpoint against the run's final one and its previous one. Every
between-run score is also calibrated against chance (:func:`prh_lightning.calibrate`,
``--permutations`` seeded shufflings of the probe): calibrated score, chance level and p-value.

    python recipes/training_dynamics.py --out runs/dynamics --quick
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from pathlib import Path

import torch

from prh_lightning.analysis.claims import corrected_confidence, verdict
from prh_lightning.analysis.calibrated import draw_permutations
from prh_lightning.analysis.dynamics import between_runs, calibrated_between_runs, drift, step_difference_interval
from prh_lightning.recipes import _common as common
from prh_lightning.recipes._dynamics_report import between_figure, drift_figure, write_report
from prh_lightning.reporting import save_figure, write_json
from prh_lightning.representations import Representations

FULL = {"seeds": 3, "max_steps": 940, "every": 40, "probe_size": 1000, "bootstrap": 300, "archs": "fashion_cnn,resnet18"}
QUICK = {"seeds": 3, "max_steps": 200, "every": 20, "probe_size": 300, "bootstrap": 50, "archs": "fashion_cnn"}
ARCHS = ("fashion_cnn", "resnet18")
COMPARED_LAYER = "avgpool"  # present in both FashionCNN and GrayResNet18 (also named in the report)

Checkpoints = dict[str, dict[int, Representations]]  # run name -> step -> probe features


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prh-lightning training-dynamics", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="small settings (3 FashionCNN seeds, 200 steps, every 20, 300 probe images)")
    p.add_argument("--archs", help=f"comma-separated of {', '.join(ARCHS)} (default {FULL['archs']}, quick {QUICK['archs']})")
    p.add_argument("--seeds", type=int, help="runs per architecture")
    p.add_argument("--max-steps", type=int, help="optimiser steps per run")
    p.add_argument("--every", type=int, help="record the probe every N steps")
    p.add_argument("--probe-size", type=int, help="probe images (Fashion-MNIST test set)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=10, help="neighbours for mutual k-NN (default 10)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples over probe images")
    p.add_argument("--permutations", type=int, default=200,
                   help="probe shufflings that calibrate every between-run score against chance (default 200)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--hf-models", help="online mode: comma-separated Hugging Face model ids (e.g. EleutherAI/pythia-70m)")
    p.add_argument("--revisions", help="online mode: comma-separated revisions, in training order (e.g. step1000,step2000)")
    p.add_argument("--texts", type=int, default=256, help="online mode: probe captions (default 256)")
    p.add_argument("--data-dir", help=f"online mode: Flickr8k folder with metadata.csv (default ${common.FLICKR_ENV}, "
                   "else ../shared/data/flickr8k-1024)")
    p.add_argument("--threads", default="auto", help=common.THREADS_HELP)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args: argparse.Namespace) -> list[str]:
    """Validated architectures; raises :class:`RecipeInputError` on impossible settings."""
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if not archs or any(a not in ARCHS for a in archs):
        raise common.RecipeInputError(f"--archs must be a comma-separated subset of {', '.join(ARCHS)}, got {args.archs!r}")
    if args.hf_models is None and len(archs) * args.seeds < 2:
        raise common.RecipeInputError("need at least two runs: raise --seeds or add an architecture")
    if args.every < 1 or args.max_steps < 2 * args.every:
        raise common.RecipeInputError(f"--max-steps ({args.max_steps}) must be at least 2 x --every ({args.every})")
    if args.bootstrap < 10:
        raise common.RecipeInputError(f"--bootstrap must be >= 10, got {args.bootstrap}")
    if args.permutations < 19:
        raise common.RecipeInputError(f"--permutations must be >= 19 (p = 1/(K+1) must reach 0.05), got {args.permutations}")
    if (args.hf_models is None) != (args.revisions is None):
        raise common.RecipeInputError("--hf-models and --revisions go together")
    return archs


# -- offline: our own Lightning runs ------------------------------------------------------------------
def fashion_tensors(train: bool, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Fashion-MNIST images ``[n, 1, 28, 28]`` in ``[0, 1]`` and labels ``[n]``."""
    from prh_lightning.data.fashion_mnist import FashionMNISTNotFound, load_fashion_mnist

    try:
        data = load_fashion_mnist(train=train, progress=False)
    except FashionMNISTNotFound as err:
        raise common.RecipeInputError(str(err)) from None
    if n > len(data.data):
        raise common.RecipeInputError(f"asked for {n} images but the split has {len(data.data)}")
    index = torch.randperm(len(data.data), generator=torch.Generator().manual_seed(seed))[:n]
    return data.data[index, None].float() / 255.0, data.targets[index]


def build_model(arch: str):
    """A fresh FashionCNN or GrayResNet18 (random initialisation from the global seed)."""
    if arch == "fashion_cnn":
        from prh_lightning.models.fashion_cnn import FashionCNN

        return FashionCNN()
    from prh_lightning.models.resnet import GrayResNet18

    return GrayResNet18()


def record_initial(model, probe: torch.Tensor, layers: list[str]) -> Representations:
    """Probe features of the untrained model (step 0)."""
    from prh_lightning import record_representations

    return record_representations(model, [probe], layers=layers, reduce="mean", progress=False)


def train_run(arch: str, seed: int, train: tuple[torch.Tensor, torch.Tensor], probe: torch.Tensor,
              args: argparse.Namespace, folder: Path) -> dict[int, Representations]:
    """Train one run with a ``RepresentationRecorder`` on the probe; returns step -> features."""
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    from prh_lightning.callbacks import RepresentationRecorder

    seed_everything(seed, workers=True, verbose=False)
    model = build_model(arch)
    layers = list(model.TAP_LAYERS)
    checkpoints = {0: record_initial(model, probe, layers)}
    recorder = RepresentationRecorder(folder, layers=layers, reduce="mean", stages=("train",),
                                      every_n_train_steps=args.every, probe=probe, max_probe_samples=None)
    loader = DataLoader(TensorDataset(*train), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = Trainer(max_steps=args.max_steps, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[recorder])
    trainer.fit(model, loader)
    for path in recorder.saved:
        reps = Representations.load(path)
        checkpoints[int(reps.metadata["global_step"])] = reps
    return checkpoints


def fashion_record(n_items: int) -> dict:
    """Path, checksum of the four Fashion-MNIST files, and ``n_items`` images used from them."""
    from prh_lightning.data.fashion_mnist import fashion_mnist_root

    root = Path(fashion_mnist_root(progress=False))
    files = sorted((root / "FashionMNIST" / "raw").glob("*-ubyte"))
    return {**common.fingerprint(files, root), "files": len(files), "n_items": n_items}


def own_runs(archs: list[str], args: argparse.Namespace) -> tuple[Checkpoints, torch.Tensor]:
    """Train every (arch, seed) run; returns their checkpoints and the probe labels."""
    n_train = args.max_steps * args.batch_size
    train = fashion_tensors(True, min(n_train, 60000), args.seed)
    probe, labels = fashion_tensors(False, args.probe_size, args.seed + 1)
    runs = {}
    for arch, s in itertools.product(archs, range(args.seeds)):
        name = f"{arch}-seed{args.seed + s}"
        common.log(f"training {name}")
        runs[name] = train_run(arch, args.seed + s, train, probe, args, args.out / "representations" / name)
    return runs, labels


# -- online: Hugging Face revisions -------------------------------------------------------------------
def flickr_captions(folder: Path, n: int) -> tuple[list[str], dict]:
    """The first ``n`` captions of ``folder/metadata.csv`` and the record of that file."""
    import csv

    path = folder / "metadata.csv"
    if not path.is_file():
        raise common.RecipeInputError(f"no captions file at {path}. {common.FLICKR_HELP}")
    with open(path, newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)][:n]
    return texts, {**common.fingerprint([path], folder), "n_items": len(texts)}


def revision_step(revision: str) -> int:
    """``"step1000"`` -> 1000 (the x axis); other names -> their order is used instead."""
    match = re.search(r"(\d+)", revision)
    if match is None:
        raise common.RecipeInputError(f"revision {revision!r} has no step number (expected e.g. step1000)")
    return int(match.group(1))


def hf_features(model_id: str, revision: str, texts: list[str]) -> Representations:
    """Caption-mean hidden states of every layer of ``model_id@revision`` on ``texts``
    (:func:`prh_lightning.extraction.language_features`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prh_lightning.extraction import language_features
    from prh_lightning.models.zoo import LoadedModel

    try:  # the zoo's hf-lm loader has no revision argument: load the revision, wrap it as the zoo does
        tok = AutoTokenizer.from_pretrained(model_id, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision).eval()
    except (OSError, ValueError) as err:  # offline / not found / no such revision
        raise common.RecipeInputError(
            f"could not load {model_id} at revision {revision} ({type(err).__name__}). The online mode needs "
            "internet access to the Hugging Face hub, or these revisions in the local HF cache."
        ) from None
    loaded = LoadedModel(model_id, "language", "hf_causal_lm", model, tokenizer=tok)
    feats, _ = language_features(loaded, texts, pool="avg")
    return Representations(feats, metadata={"model": model_id, "revision": revision})


def hf_runs(args: argparse.Namespace) -> tuple[Checkpoints, dict]:
    """Every model at every revision (models are the 'runs', revision steps the x axis), and the data record."""
    texts, data = flickr_captions(common.resolve_flickr_dir(args.data_dir), args.texts)
    models = [m.strip() for m in args.hf_models.split(",") if m.strip()]
    revisions = [r.strip() for r in args.revisions.split(",") if r.strip()]
    if len(models) < 1 or len(revisions) < 2:
        raise common.RecipeInputError("online mode needs one or more --hf-models and two or more --revisions")
    return {m: {revision_step(r): hf_features(m, r, texts) for r in revisions} for m in models}, data


# -- analysis --------------------------------------------------------------------------------------
def compared_layer(runs: Checkpoints) -> str | None:
    """``avgpool`` if every checkpoint has it (FashionCNN and GrayResNet18 do), else None (the last layer)."""
    every = all(COMPARED_LAYER in reps.layers for ckpts in runs.values() for reps in ckpts.values())
    return COMPARED_LAYER if every else None


def change_over_training(between: dict, k: int, n: int) -> dict:
    """Start vs end of the between-run curve with a paired bootstrap interval of the difference,
    Bonferroni-corrected for the two claims judged (runs grow more alike; runs grow less alike)."""
    mean, last = between["mean"], len(between["steps"]) - 1
    confidence = corrected_confidence(0.95, 2)
    diff, low, high = step_difference_interval(between, 0, last, confidence)
    return {
        "first_step": between["steps"][0], "last_step": between["steps"][-1],
        "first": mean[0], "first_ci": [between["ci_low"][0], between["ci_high"][0]],
        "last": mean[-1], "last_ci": [between["ci_low"][-1], between["ci_high"][-1]],
        "difference": diff, "difference_ci": [low, high], "confidence": confidence,
        "more_alike_at_end": verdict(low, high, "greater"), "less_alike_at_end": verdict(low, high, "less"),
        "chance": k / (n - 1),
    }


def run(args: argparse.Namespace) -> dict:
    start = time.time()
    archs = check_args(args)
    if args.hf_models:
        runs, data = hf_runs(args)
        n_probe = args.texts
    else:
        runs, labels = own_runs(archs, args)
        n_probe = len(labels)
        data = fashion_record(min(args.max_steps * args.batch_size, 60000) + n_probe)
    if len(runs) < 2:
        raise common.RecipeInputError("need at least two runs (models) to compare")
    common.log("alignment between runs")
    layer = compared_layer(runs)
    between = between_runs(runs, layer=layer, k=args.k, n_bootstrap=args.bootstrap, seed=args.seed)
    common.log(f"calibration ({args.permutations} probe shufflings per step and pair)")
    calibrated = calibrated_between_runs(runs, draw_permutations(n_probe, args.permutations, args.seed), layer=layer, k=args.k)
    drifts = drift(runs, layer=layer, k=args.k)
    change = change_over_training(between, args.k, n_probe)
    save_figure(between_figure(between, change["chance"], calibrated), args.out / "figures" / "between_runs.png")
    save_figure(drift_figure(drifts), args.out / "figures" / "drift.png")
    seconds = time.time() - start
    between = {key: v for key, v in between.items() if key != "replicates"}
    summary = {"recipe": "training-dynamics", "settings": common.settings_dict(args), "data": data,
               "runs": list(runs), "between_runs": between, "calibrated_between_runs": calibrated,
               "calibration": {"n_permutations": args.permutations, "seed": args.seed, "alpha": 0.05,
                               "permutations": "prh_lightning.analysis.draw_permutations(n_probe, n_permutations, seed); "
                                               "each reorders the probe rows of the second run of a pair"},
               "drift": drifts, "change": change, "seconds": seconds}
    write_json(args.out / "summary.json", summary)
    write_report(args.out, between, drifts, change, list(runs), args, seconds, calibrated)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def describe(summary: dict) -> str:
        c = summary["change"]
        return (f"training-dynamics: between-run alignment {c['first']:.3f} at step {c['first_step']} -> "
                f"{c['last']:.3f} at step {c['last_step']}; wrote {args.out}")

    return common.run_cli("training-dynamics", run, args, describe)


if __name__ == "__main__":
    sys.exit(main())
