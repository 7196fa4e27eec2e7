"""Alignment during training: how similar are independently trained runs at each point of
training, and how far does each run drift from its final representation?

Offline (default): several Lightning runs (FashionCNN and/or grayscale ResNet-18, different
seeds) train on Fashion-MNIST; ``RepresentationRecorder`` saves the features of a fixed
probe set (Fashion-MNIST test images) every N steps, and the initial state is recorded too.
Online: Hugging Face model revisions (``--hf-models EleutherAI/pythia-70m,EleutherAI/pythia-160m
--revisions step1000,step2000,...``) go through the same analysis, on Flickr8k captions.

At every recorded step: mutual k-NN between every pair of runs at the compared layer (with a
percentile bootstrap over probe images, scipy.stats.bootstrap) and at the best layer pair;
within-run drift: each checkpoint against the run's final one and its previous one.

    python recipes/training_dynamics.py --out runs/dynamics --quick
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

if __package__ in (None, ""):  # run as a script: python recipes/training_dynamics.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prh_lightning.alignment import alignment_matrix
from prh_lightning.data.paired import default_flickr_dir
from prh_lightning.functional.knn import mutual_knn_from_indices
from prh_lightning.recipes import _vision_set as vs
from prh_lightning.reporting import Report, markdown_table, save_figure, write_json
from prh_lightning.representations import Representations

FULL = {"seeds": 3, "max_steps": 940, "every": 40, "probe_size": 1000, "bootstrap": 300, "archs": "fashion_cnn,resnet18"}
QUICK = {"seeds": 3, "max_steps": 200, "every": 20, "probe_size": 300, "bootstrap": 50, "archs": "fashion_cnn"}
ARCHS = ("fashion_cnn", "resnet18")
COMPARED_LAYER = "avgpool"  # present in both FashionCNN and GrayResNet18

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
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--hf-models", help="online mode: comma-separated Hugging Face model ids (e.g. EleutherAI/pythia-70m)")
    p.add_argument("--revisions", help="online mode: comma-separated revisions, in training order (e.g. step1000,step2000)")
    p.add_argument("--texts", type=int, default=256, help="online mode: probe captions (default 256)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_args(args: argparse.Namespace) -> list[str]:
    """Validated architectures; raises :class:`RecipeInputError` on impossible settings."""
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if not archs or any(a not in ARCHS for a in archs):
        raise vs.RecipeInputError(f"--archs must be a comma-separated subset of {', '.join(ARCHS)}, got {args.archs!r}")
    if args.hf_models is None and len(archs) * args.seeds < 2:
        raise vs.RecipeInputError("need at least two runs: raise --seeds or add an architecture")
    if args.every < 1 or args.max_steps < 2 * args.every:
        raise vs.RecipeInputError(f"--max-steps ({args.max_steps}) must be at least 2 x --every ({args.every})")
    if args.bootstrap < 10:
        raise vs.RecipeInputError(f"--bootstrap must be >= 10, got {args.bootstrap}")
    if (args.hf_models is None) != (args.revisions is None):
        raise vs.RecipeInputError("--hf-models and --revisions go together")
    return archs


# -- offline: our own Lightning runs ------------------------------------------------------------------
def fashion_tensors(train: bool, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Fashion-MNIST images ``[n, 1, 28, 28]`` in ``[0, 1]`` and labels ``[n]``."""
    from prh_lightning.data.fashion_mnist import FashionMNISTNotFound, load_fashion_mnist

    try:
        data = load_fashion_mnist(train=train)
    except FashionMNISTNotFound as err:
        raise vs.RecipeInputError(str(err)) from None
    if n > len(data.data):
        raise vs.RecipeInputError(f"asked for {n} images but the split has {len(data.data)}")
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
    from prh_lightning.taps import LayerTaps

    model.eval()
    with torch.no_grad(), LayerTaps(model, layers=layers, reduce="mean") as taps:
        model(probe)
        reps = taps.representations()
    model.train()
    return reps


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


def own_runs(archs: list[str], args: argparse.Namespace) -> tuple[Checkpoints, torch.Tensor]:
    """Train every (arch, seed) run; returns their checkpoints and the probe labels."""
    n_train = args.max_steps * args.batch_size
    train = fashion_tensors(True, min(n_train, 60000), args.seed)
    probe, labels = fashion_tensors(False, args.probe_size, args.seed + 1)
    runs = {}
    for arch, s in itertools.product(archs, range(args.seeds)):
        name = f"{arch}-seed{args.seed + s}"
        vs.log(f"training {name}")
        runs[name] = train_run(arch, args.seed + s, train, probe, args, args.out / "representations" / name)
    return runs, labels


# -- online: Hugging Face revisions -------------------------------------------------------------------
def flickr_captions(n: int) -> list[str]:
    """The first ``n`` captions of Flickr8k's ``metadata.csv`` (``$PRH_FLICKR_DIR`` or the shared copy)."""
    import csv

    path = default_flickr_dir() / "metadata.csv"
    if not path.is_file():
        raise vs.RecipeInputError(f"no captions file at {path}; set PRH_FLICKR_DIR to the Flickr8k folder holding metadata.csv")
    with open(path, newline="") as f:
        return [row["text"] for row in csv.DictReader(f)][:n]


def revision_step(revision: str) -> int:
    """``"step1000"`` -> 1000 (the x axis); other names -> their order is used instead."""
    match = re.search(r"(\d+)", revision)
    if match is None:
        raise vs.RecipeInputError(f"revision {revision!r} has no step number (expected e.g. step1000)")
    return int(match.group(1))


@torch.no_grad()
def hf_features(model_id: str, revision: str, texts: list[str]) -> Representations:
    """Token-mean hidden states of every layer of ``model_id@revision`` on ``texts``."""
    from transformers import AutoModel, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_id, revision=revision)
        model = AutoModel.from_pretrained(model_id, revision=revision).eval()
    except Exception as err:  # hub / network errors come in many types
        raise vs.RecipeInputError(
            f"could not load {model_id} at revision {revision} ({type(err).__name__}). The online mode needs "
            "internet access to the Hugging Face hub, or these revisions in the local HF cache."
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    layers: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(texts), 32):
        batch = tok(texts[start : start + 32], return_tensors="pt", padding=True)
        hidden = model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"][..., None].float()
        for i, h in enumerate(hidden):
            layers.setdefault(f"hidden.{i}", []).append((h * mask).sum(1) / mask.sum(1))
    return Representations({k: torch.cat(v) for k, v in layers.items()}, metadata={"model": model_id, "revision": revision})


def hf_runs(args: argparse.Namespace) -> Checkpoints:
    """Every model at every revision; models are the 'runs', revision steps the x axis."""
    texts = flickr_captions(args.texts)
    models = [m.strip() for m in args.hf_models.split(",") if m.strip()]
    revisions = [r.strip() for r in args.revisions.split(",") if r.strip()]
    if len(models) < 1 or len(revisions) < 2:
        raise vs.RecipeInputError("online mode needs one or more --hf-models and two or more --revisions")
    return {m: {revision_step(r): hf_features(m, r, texts) for r in revisions} for m in models}


# -- analysis --------------------------------------------------------------------------------------
def compared_layer(reps: Representations) -> str:
    """The layer whose alignment is tracked: ``avgpool`` if present, else the last layer."""
    return COMPARED_LAYER if COMPARED_LAYER in reps.layers else reps.layers[-1]


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def between_runs(runs: Checkpoints, k: int, n_boot: int, seed: int) -> dict:
    """Mutual k-NN between every pair of runs at every common step: compared layer (with a
    bootstrap interval of the mean over pairs) and best layer pair."""
    names = list(runs)
    steps = sorted(set.intersection(*(set(c) for c in runs.values())))
    pairs = list(itertools.combinations(names, 2))
    per_pair = {f"{a} vs {b}": [] for a, b in pairs}
    best = {f"{a} vs {b}": [] for a, b in pairs}
    mean, low, high = [], [], []
    for step in steps:
        feats = {n: unit(runs[n][step][compared_layer(runs[n][step])]) for n in names}
        for a, b in pairs:
            per_pair[f"{a} vs {b}"].append(vs.resampled_mutual_knn(feats[a], feats[b], k))
            best[f"{a} vs {b}"].append(float(alignment_matrix(runs[a][step], runs[b][step], metric="mutual_knn", k=k).max()))

        def statistic(idx: np.ndarray) -> float:
            lists = {name: vs.neighbour_lists(x, k, idx) for name, x in feats.items()}
            return float(np.mean([mutual_knn_from_indices(lists[a], lists[b]) for a, b in pairs]))

        n = next(iter(feats.values())).shape[0]
        res = stats.bootstrap((np.arange(n),), statistic, vectorized=False, n_resamples=n_boot,
                              method="percentile", rng=np.random.default_rng(seed + step))
        mean.append(float(np.mean([per_pair[f"{a} vs {b}"][-1] for a, b in pairs])))
        low.append(float(res.confidence_interval.low))
        high.append(float(res.confidence_interval.high))
    return {"steps": steps, "per_pair": per_pair, "best_layer_pair": best, "mean": mean, "ci_low": low, "ci_high": high}


def drift(runs: Checkpoints, k: int) -> dict:
    """Per run, mutual k-NN of the compared layer at each step against the final step and
    against the previous recorded step."""
    out = {}
    for name, ckpts in runs.items():
        steps = sorted(ckpts)
        feats = [unit(ckpts[s][compared_layer(ckpts[s])]) for s in steps]
        out[name] = {
            "steps": steps,
            "vs_final": [vs.resampled_mutual_knn(f, feats[-1], k) for f in feats],
            "vs_previous": [None] + [vs.resampled_mutual_knn(feats[i - 1], feats[i], k) for i in range(1, len(feats))],
        }
    return out


def change_over_training(between: dict, k: int, n: int) -> dict:
    """Start vs end of the between-run curve, and where it peaks."""
    mean = np.asarray(between["mean"])
    return {
        "first_step": between["steps"][0], "last_step": between["steps"][-1],
        "first": mean[0], "first_ci": [between["ci_low"][0], between["ci_high"][0]],
        "last": mean[-1], "last_ci": [between["ci_low"][-1], between["ci_high"][-1]],
        "peak_step": between["steps"][int(np.argmax(mean))], "peak": float(mean.max()),
        "trough_step": between["steps"][int(np.argmin(mean))], "trough": float(mean.min()),
        "trough_ci": [between["ci_low"][int(np.argmin(mean))], between["ci_high"][int(np.argmin(mean))]],
        "chance": k / (n - 1),
    }


# -- figures and report ---------------------------------------------------------------------------
def _axes(title: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.6, 3.9), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def between_figure(between: dict, chance: float):
    fig, ax = _axes("Alignment between runs along training (compared layer)", "mutual k-NN")
    steps = between["steps"]
    for name, values in between["per_pair"].items():
        ax.plot(steps, values, linewidth=0.9, alpha=0.7, label=name)
    ax.fill_between(steps, between["ci_low"], between["ci_high"], color="C3", alpha=0.25, label="mean, bootstrap 95% CI")
    ax.plot(steps, between["mean"], color="C3", linewidth=2)
    ax.axhline(chance, color="grey", linestyle=":", label="chance k/(n-1)")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def drift_figure(drifts: dict):
    fig, ax = _axes("Within-run drift (compared layer)", "mutual k-NN")
    for i, (name, d) in enumerate(drifts.items()):
        ax.plot(d["steps"], d["vs_final"], color=f"C{i}", label=f"{name}: vs final")
        ax.plot(d["steps"][1:], d["vs_previous"][1:], color=f"C{i}", linestyle="--", label=f"{name}: vs previous")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def write_report(out: Path, between: dict, drifts: dict, change: dict, runs: list[str], args, seconds: float) -> None:
    diff_text = (
        f"Between-run alignment goes from {change['first']:.3f} (95% CI {change['first_ci'][0]:.3f}-"
        f"{change['first_ci'][1]:.3f}) at step {change['first_step']} to {change['last']:.3f} "
        f"({change['last_ci'][0]:.3f}-{change['last_ci'][1]:.3f}) at step {change['last_step']}, peaking at "
        f"{change['peak']:.3f} at step {change['peak_step']}; chance k/(n-1) = {change['chance']:.3f}."
    )
    best = np.mean(list(between["best_layer_pair"].values()), axis=0)
    diff_text += (f" At the best layer pair the mean goes from {best[0]:.3f} to {best[-1]:.3f}.")
    if change["peak_step"] == change["first_step"]:
        diff_text += (" The untrained runs agree most (a likely reason: mean-pooled features of random "
                      "convolutions mostly follow simple image statistics such as brightness and contrast, "
                      "which every run sees alike).")
    rows = [[s, float(m), float(lo), float(hi)] for s, m, lo, hi in zip(between["steps"], between["mean"], between["ci_low"], between["ci_high"])]
    source = (f"Hugging Face models {args.hf_models} at revisions {args.revisions}, on {args.texts} Flickr8k captions"
              if args.hf_models else
              f"{len(runs)} Lightning runs ({', '.join(runs)}) on Fashion-MNIST, {args.max_steps} steps of batch "
              f"{args.batch_size}, probe of {args.probe_size} test images recorded every {args.every} steps and at step 0")
    report = Report(
        "Alignment between runs during training",
        f"{source}. Compared layer: `{COMPARED_LAYER}` (last layer for HF models), mean-pooled, rows "
        f"L2-normalised; mutual k-NN with k = {args.k}; {args.bootstrap} bootstrap resamples over probe "
        f"images. Run time {seconds:.0f} s.",
    )
    report.section("Between runs", diff_text, figure="figures/between_runs.png",
                   table=markdown_table(["step", "mean over pairs", "CI low", "CI high"], rows))
    final_prev = {n: d["vs_previous"][-1] for n, d in drifts.items()}
    report.section(
        "Within-run drift",
        "Each checkpoint against the run's final one (solid) and its previous one (dashed). Last-interval "
        "self-similarity: " + ", ".join(f"{n}: {v:.3f}" for n, v in final_prev.items()) + ".",
        figure="figures/drift.png",
    )
    grew = change["last_ci"][0] > change["first_ci"][1]
    rebound = change["last_ci"][0] > change["trough_ci"][1]
    phases = (f" Phases: lowest {change['trough']:.3f} ({change['trough_ci'][0]:.3f}-{change['trough_ci'][1]:.3f}) at "
              f"step {change['trough_step']}; " + ("the runs then grow more alike again (end CI above trough CI)."
                                                   if rebound else "no clear rise after it."))
    report.section(
        "Against the seed",
        "The seed tracked six LLMs over 100 checkpoints but reported no result, only the aim of finding "
        "phases of rising or falling similarity, so its claim **cannot be checked** (cannot tell). What our "
        "runs show: " + ("runs become more aligned with training (end CI above start CI)." if grew else
                         "no clear rise of between-run alignment from start to end (the intervals overlap or fall).")
        + phases
        + " Pythia revisions run through the same code with --hf-models/--revisions when online.",
    )
    report.write(out / "report.md")


def run(args: argparse.Namespace) -> dict:
    start = time.time()
    archs = check_args(args)
    if args.hf_models:
        runs, n_probe = hf_runs(args), args.texts
    else:
        runs, labels = own_runs(archs, args)
        n_probe = len(labels)
    if len(runs) < 2:
        raise vs.RecipeInputError("need at least two runs (models) to compare")
    vs.log("alignment between runs")
    between = between_runs(runs, args.k, args.bootstrap, args.seed)
    drifts = drift(runs, args.k)
    change = change_over_training(between, args.k, n_probe)
    save_figure(between_figure(between, change["chance"]), args.out / "figures" / "between_runs.png")
    save_figure(drift_figure(drifts), args.out / "figures" / "drift.png")
    seconds = time.time() - start
    summary = {
        "recipe": "training-dynamics",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": list(runs), "between_runs": between, "drift": drifts, "change": change, "seconds": seconds,
    }
    write_json(args.out / "summary.json", summary)
    write_report(args.out, between, drifts, change, list(runs), args, seconds)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def describe(summary: dict) -> str:
        c = summary["change"]
        return (f"training-dynamics: between-run alignment {c['first']:.3f} at step {c['first_step']} -> "
                f"{c['last']:.3f} at step {c['last_step']}; wrote {args.out}")

    return vs.run_cli("training-dynamics", run, args, describe)

if __name__ == "__main__":
    sys.exit(main())
