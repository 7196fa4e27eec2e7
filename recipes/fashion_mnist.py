"""ResNet-18 vs FashionCNN vs all-MiniLM-L6-v2 on Fashion-MNIST, as one command.

Reproduces "Visualizing the Platonic Representation Hypothesis at a small scale" (the seed
study) with permutation p-values, bootstrap intervals and both Spearman and Pearson RSA::

    prh-lightning fashion-mnist --quick --out runs/fashion-mnist
    python recipes/fashion_mnist.py --out runs/full          # the seed's settings

Steps: load Fashion-MNIST (local first), train (or load) a grayscale ResNet-18, train
FashionCNN with an ``AlignmentMonitor`` (vs MiniLM on class names and vs ResNet, live in
TensorBoard), record both models' layers on N stratified test images, then: UMAP per layer,
layer x layer heatmaps (RSA Euclidean / cosine, CKA, mutual k-NN), class-centroid RSA
against MiniLM label embeddings (names and sentence templates) with a Mantel permutation
test, and test accuracies. Writes ``report.md``, ``figures/*.png``, ``summary.json`` and
``tensorboard/`` under ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prh_lightning.data.fashion_mnist import (
    CLASS_NAMES,
    FashionMNISTDataModule,
    FashionMNISTNotFound,
    fashion_mnist_root,
)
from prh_lightning.models.pretrained import PretrainedUnavailable

PROG = "prh-lightning fashion-mnist"
CNN_LAYERS = ["conv1", "conv2", "avgpool"]
RESNET_LAYERS = ["conv1", "layer1", "layer2", "layer3", "layer4", "avgpool"]
# Readable forms of the class names for the sentence templates.
SPOKEN_NAMES = ["T-shirt", "pair of trousers", "pullover", "dress", "coat",
                "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution picture of a {}.",
    "a {}, an item of clothing or an accessory.",
    "a product photo of a {} for an online shop.",
]
HEATMAPS = {  # name -> (metric, options, title)
    "rsa_euclidean": ("rsa", {"distance": "euclidean", "normalize": False}, "RSA (Euclidean RDMs, Spearman)"),
    "rsa_cosine": ("rsa", {"distance": "cosine", "normalize": False}, "RSA (cosine RDMs, Spearman)"),
    "cka": ("cka", {}, "linear CKA"),
    "mutual_knn": ("mutual_knn", {"k": 10}, "mutual k-NN (k=10)"),
}

NOTES = {  # a caveat appended to a heatmap's reading
    "rsa_euclidean": (
        " Caveat on conv1 / conv1: a convolution is linear and the tapped outputs are averaged over space, "
        "so on Fashion-MNIST's black-bordered images each conv1 feature is almost exactly a bias plus a multiple "
        "of the image's mean brightness; both models' Euclidean RDMs then rank image pairs by brightness difference, "
        "which gives RSA near 1 without any shared edge detectors (the seed read its 1.0 as shared edge detection)."
    ),
}


class RecipeInputError(ValueError):
    """Bad command-line input; the message says what to change."""


# -- settings ------------------------------------------------------------------------

@dataclass
class Settings:
    """Every knob of one run; ``--quick`` and the seed's full settings differ only in these."""

    out: Path
    data_dir: str | None = None
    download: bool = True
    n_samples: int = 1000
    train_size: int | None = None
    epochs: int = 10
    lr: float = 1e-2
    resnet_weights: str = "auto"
    resnet_epochs: int = 3
    resnet_train_size: int | None = None
    resnet_input_size: int | None = None
    test_size: int | None = None
    val_size: int = 1000
    batch_size: int = 128
    permutations: int = 10000
    bootstraps: int = 1000
    umap_points: int = 1000
    umap_epochs: int | None = None
    probe_size: int = 512
    monitor_every: int = 50
    seed: int = 0
    progress: bool = True
    quick: bool = False


# Quick mode keeps the seed's N = 1,000 and every training image, and cuts epochs and resamples:
# about 1.5 minutes on an idle 2-core CPU (the README's main job must stay under 10).
QUICK = dict(n_samples=1000, epochs=3, resnet_epochs=1, resnet_train_size=12000, val_size=1000,
             permutations=1000, bootstraps=200, umap_points=1000, umap_epochs=100,
             probe_size=256, monitor_every=100)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/fashion-mnist", help="output folder (default runs/fashion-mnist)")
    p.add_argument("--quick", action="store_true", help="small settings: about 2 minutes on a 2-core CPU, no GPU")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (torchvision root or the four files)")
    p.add_argument("--no-download", dest="download", action="store_false", default=True,
                   help="never download Fashion-MNIST (default: download it when no local copy is found)")
    p.add_argument("--download", dest="download", action="store_true", default=True, help=argparse.SUPPRESS)
    p.add_argument("--n-samples", type=int, help="stratified test images analysed (seed and quick: 1000)")
    p.add_argument("--train-size", type=int, help="FashionCNN training images (default: all 59k)")
    p.add_argument("--epochs", type=int, help="FashionCNN epochs (default 10; quick 3)")
    p.add_argument("--lr", type=float, default=1e-2, help="FashionCNN Adam learning rate (default 0.01)")
    p.add_argument("--resnet-weights", default="auto",
                   help="auto (default: ImageNet if obtainable, else scratch), imagenet, scratch, or a weights file")
    p.add_argument("--resnet-epochs", type=int, help="ResNet epochs, whole net (scratch) or linear probe (ImageNet) (default 3; quick 1)")
    p.add_argument("--resnet-train-size", type=int, help="ResNet training images (default all; quick 12000)")
    p.add_argument("--resnet-input-size", type=int, help="resize for ResNet (default 28 scratch, 64 ImageNet)")
    p.add_argument("--test-size", type=int, help="stratified test images for accuracy (default all 10k)")
    p.add_argument("--val-size", type=int, help="training images held out for validation (default 1000)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    p.add_argument("--permutations", type=int, help="permutations per Mantel test (default 10000; quick 1000)")
    p.add_argument("--bootstraps", type=int, help="bootstrap resamples per interval (default 1000; quick 200)")
    p.add_argument("--umap-points", type=int, help="points per UMAP panel (default N)")
    p.add_argument("--umap-epochs", type=int, help="UMAP optimisation epochs (default: umap's; quick 100)")
    p.add_argument("--probe-size", type=int, help="AlignmentMonitor probe images (default 512; quick 256)")
    p.add_argument("--monitor-every", type=int, help="AlignmentMonitor check every N steps (default 50; quick 100)")
    p.add_argument("--seed", type=int, default=0, help="seeds subsets, training and tests (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def settings_from_args(argv: Sequence[str] | None) -> Settings:
    """Parse ``argv``; unset options take the quick or the full (seed) defaults."""
    args = build_parser().parse_args(argv)
    base = asdict(Settings(out=Path(args.out)))
    if args.quick:
        base.update(QUICK)
    for key in base:
        value = getattr(args, key, None)
        if value is not None and key != "out":
            base[key] = value
    base.update(out=Path(args.out), quick=args.quick, progress=not args.no_progress,
                data_dir=args.data_dir, download=args.download)
    settings = Settings(**base)
    check_settings(settings)
    return settings


def check_settings(s: Settings) -> None:
    """Raise :class:`RecipeInputError` for values that cannot work."""
    positive = ["n_samples", "epochs", "resnet_epochs", "batch_size", "permutations", "bootstraps",
                "umap_points", "probe_size", "monitor_every"]
    for name in positive:
        if getattr(s, name) <= 0:
            raise RecipeInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(s, name)}")
    if s.n_samples < 30:
        raise RecipeInputError(f"--n-samples must be at least 30 (3 per class for centroids), got {s.n_samples}")
    if s.n_samples > 10000:
        raise RecipeInputError(f"--n-samples can be at most 10000 (the test split), got {s.n_samples}")
    for name in ("train_size", "resnet_train_size", "test_size"):
        value = getattr(s, name)
        if value is not None and value < 10:
            raise RecipeInputError(f"--{name.replace('_', '-')} must be at least 10 (one image per class), got {value}")
    if not 0 <= s.val_size <= 10000:
        raise RecipeInputError(f"--val-size must be between 0 and 10000, got {s.val_size}")
    if s.probe_size < 11:
        raise RecipeInputError(f"--probe-size must be at least 11 (k + 1 for mutual k-NN), got {s.probe_size}")
    if s.resnet_weights not in ("auto", "imagenet", "scratch") and not Path(s.resnet_weights).is_file():
        raise RecipeInputError(
            f"--resnet-weights must be auto, imagenet, scratch or an existing file; {s.resnet_weights!r} is none"
        )


# -- data, text and models -------------------------------------------------------------

def data_module(s: Settings, train_size: int | None) -> FashionMNISTDataModule:
    """A set-up data module with ``train_size`` training images (seeded, stratified)."""
    dm = FashionMNISTDataModule(s.data_dir, s.download, batch_size=s.batch_size, train_size=train_size,
                                val_size=s.val_size, test_size=s.test_size, seed=s.seed)
    dm.setup()
    return dm


def label_texts() -> dict[str, list[list[str]]]:
    """Per class, the texts MiniLM encodes: ``names`` (the bare label, as the seed) and ``templates``."""
    return {
        "names": [[name] for name in CLASS_NAMES],
        "templates": [[t.format(name) for t in TEMPLATES] for name in SPOKEN_NAMES],
    }


def encode_labels(minilm, texts: list[list[str]]) -> torch.Tensor:
    """MiniLM embeddings ``[10, 384]``: the mean of each class's unit-norm sentence embeddings."""
    flat = [t for group in texts for t in group]
    emb = minilm.encode(flat, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False).cpu()
    sizes = [len(group) for group in texts]
    return torch.stack([chunk.mean(0) for chunk in torch.split(emb, sizes)])


def resnet_weights(s: Settings) -> tuple[str, dict[str, torch.Tensor] | None, str]:
    """``(kind, state dict or None, note)`` for ``--resnet-weights``.

    ``auto`` tries ImageNet (cache, then download) and falls back to ``scratch`` with a note;
    ``imagenet`` raises :class:`PretrainedUnavailable` when the weights cannot be had.
    """
    from prh_lightning.models.resnet import imagenet_state_dict, load_state_file

    choice = s.resnet_weights
    if choice == "scratch":
        return "scratch", None, ""
    if choice not in ("auto", "imagenet"):
        try:
            return f"file:{choice}", load_state_file(choice), ""
        except ValueError as err:
            raise RecipeInputError(f"--resnet-weights {choice}: {err}") from None
    try:
        return "imagenet", imagenet_state_dict(), ""
    except PretrainedUnavailable as err:
        if choice == "imagenet":
            raise
        say(s, f"ResNet-18: {err}")
        return "scratch", None, "the ImageNet weights could not be had (offline?), so it was trained from scratch"


def build_resnet(s: Settings) -> tuple[Any, dict[str, Any]]:
    """Grayscale ResNet-18 and ``{weights, note, input_size, needs_training, training}``.

    Pretrained weights (ImageNet or a file) keep their backbone frozen and get a linear
    probe, unless the file also holds a 10-class head; scratch trains the whole network.
    """
    from prh_lightning.models.resnet import GrayResNet18

    kind, state, note = resnet_weights(s)
    pretrained = state is not None
    # RGB weights (ImageNet) expect ImageNet-normalised, larger images; gray ones are Fashion-MNIST's own.
    rgb = pretrained and state.get("conv1.weight", torch.empty(0, 1)).shape[1] == 3
    size = s.resnet_input_size or (64 if rgb else None)
    model = GrayResNet18(input_size=size, pretrained=rgb, freeze_backbone=pretrained, lr=1e-3)
    try:
        head_loaded = model.load_backbone(state) if pretrained else False
    except ValueError as err:
        raise RecipeInputError(f"--resnet-weights {s.resnet_weights}: {err}") from None
    training = "whole network" if not pretrained else ("none" if head_loaded else "linear probe (fc)")
    info = {"weights": kind, "note": note, "input_size": size or 28, "needs_training": not head_loaded,
            "training": training}
    return model, info


# -- training ----------------------------------------------------------------------------

def make_trainer(s: Settings, name: str, epochs: int, callbacks: list | None = None):
    """A CPU Trainer logging to ``OUT/tensorboard/<name>``."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(s.out), name="tensorboard", version=name, default_hp_metric=False)
    return Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks or [],
                   enable_checkpointing=False, enable_progress_bar=s.progress, enable_model_summary=False,
                   log_every_n_steps=10, num_sanity_val_steps=0, deterministic=False)


def fit_and_test(trainer, model, dm: FashionMNISTDataModule, train: bool = True) -> float:
    """Train (optionally) and return test accuracy on ``dm``'s test set."""
    if train:
        trainer.fit(model, datamodule=dm)
    result = trainer.test(model, datamodule=dm, verbose=False)
    return float(result[0]["test_acc"])


def alignment_monitor(s: Settings, probe: tuple[torch.Tensor, torch.Tensor], minilm, resnet):
    """Monitor FashionCNN's layers against MiniLM (the probe's class names) and ResNet."""
    from prh_lightning.callbacks import AlignmentMonitor, Reference

    def class_names(x: torch.Tensor, y: torch.Tensor) -> list[str]:
        return [CLASS_NAMES[i] for i in y.tolist()]

    references = {
        "minilm": Reference(minilm, inputs=class_names),
        "resnet": Reference(resnet, layers=RESNET_LAYERS),
    }
    return AlignmentMonitor(probe=probe, references=references, metrics=("cka", "mutual_knn"), layers=CNN_LAYERS,
                            every_n_train_steps=s.monitor_every, max_probe_samples=s.probe_size,
                            log_images=4, snapshots=False)


# -- analyses ------------------------------------------------------------------------------

def record(model, dataset, layers: list[str], s: Settings):
    """Mean-pooled features of ``layers`` on ``dataset``: ``Representations`` with labels."""
    from torch.utils.data import DataLoader

    from prh_lightning import record_representations

    loader = DataLoader(dataset, batch_size=256, shuffle=False)
    return record_representations(model, loader, layers=layers, reduce="mean", progress=s.progress)


def layer_heatmaps(cnn, resnet) -> dict[str, torch.Tensor]:
    """``{name: Tensor[3, 6]}``: FashionCNN layers x ResNet layers for each entry of HEATMAPS."""
    from prh_lightning import alignment_matrix

    out = {}
    for name, (metric, options, _) in HEATMAPS.items():
        out[name] = alignment_matrix(cnn, resnet, metric=metric, **options)
    return out


def best_cell_tests(cnn, resnet, matrices: dict[str, torch.Tensor], s: Settings) -> dict[str, dict[str, Any]]:
    """Permutation p-value of the best cell of the CKA and mutual k-NN heatmaps (images shuffled)."""
    from prh_lightning.alignment import prepare_layers
    from prh_lightning.functional import permutation_test

    out = {}
    for name in ("cka", "mutual_knn"):
        metric, options, _ = HEATMAPS[name]
        i, j = divmod(int(torch.argmax(matrices[name])), matrices[name].shape[1])
        a, b = prepare_layers([cnn[CNN_LAYERS[i]], resnet[RESNET_LAYERS[j]]], True, None, "layers")
        test = permutation_test(a, b, metric=metric, n_permutations=s.permutations, seed=s.seed, **options)
        out[name] = {"fashioncnn_layer": CNN_LAYERS[i], "resnet_layer": RESNET_LAYERS[j],
                     "score": test.score, "p_value": test.p_value, "z_score": test.z_score}
    return out


def class_centroids(x: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                    classes: int = 10) -> torch.Tensor:
    """Mean feature per class: ``x [n, d]``, ``labels [n]`` -> ``[classes, d]``.

    With ``weights [B, n]`` (how often each sample is counted, e.g. bootstrap counts) returns
    the ``B`` weighted centroid sets ``[B, classes, d]`` in one batched product.
    """
    onehot = torch.nn.functional.one_hot(labels, classes).to(x.dtype)  # [n, classes]
    if weights is None:
        return (onehot.T @ x) / onehot.sum(0)[:, None]
    member = weights.to(x.dtype)[:, :, None] * onehot  # [B, n, classes]
    return (member.transpose(1, 2) @ x) / member.sum(1)[:, :, None]


def condensed_cosine_rdms(x: torch.Tensor) -> torch.Tensor:
    """Cosine RDMs of a batch ``x [B, k, d]`` as their upper triangles ``[B, k(k-1)/2]``.

    Batched form of ``condensed(rdm(x[i], "cosine"))`` (``prh_lightning.functional``).
    """
    unit = torch.nn.functional.normalize(x, dim=-1)
    dissimilarity = 1.0 - unit @ unit.transpose(1, 2)
    iu = torch.triu_indices(x.shape[1], x.shape[1], offset=1)
    return dissimilarity[:, iu[0], iu[1]]


def correlate_rows(u: torch.Tensor, v: torch.Tensor, compare: str) -> torch.Tensor:
    """Spearman or Pearson correlation of each row of ``u [B, m]`` with ``v [m]`` -> ``[B]``."""
    from scipy.stats import rankdata

    u, v = u.double(), v.double()
    if compare == "spearman":
        u = torch.as_tensor(rankdata(u.numpy(), axis=1))
        v = torch.as_tensor(rankdata(v.numpy()))
    u = u - u.mean(dim=1, keepdim=True)
    v = v - v.mean()
    return (u @ v) / (u.norm(dim=1) * v.norm())


def stratified_bootstrap(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Indices ``[n]`` resampled with replacement within each class (class sizes kept)."""
    parts = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        parts.append(members[torch.randint(len(members), (len(members),), generator=gen)])
    return torch.cat(parts)


def bootstrap_centroid_rsa(x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, s: Settings) -> list[float]:
    """95% interval of centroid RSA (Spearman) over images resampled within class ``[low, high]``."""
    gen = torch.Generator().manual_seed(s.seed)
    counts = torch.stack([torch.bincount(stratified_bootstrap(labels, gen), minlength=len(labels))
                          for _ in range(s.bootstraps)])  # [B, n]
    centroids = class_centroids(x, labels, weights=counts)
    scores = correlate_rows(condensed_cosine_rdms(centroids), condensed_cosine_rdms(text[None])[0], "spearman")
    return [float(torch.quantile(scores, 0.025)), float(torch.quantile(scores, 0.975))]


def centroid_rsa(x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, s: Settings) -> dict[str, Any]:
    """RSA between class centroids of ``x [n, d]`` and label embeddings ``text [10, e]`` (cosine RDMs).

    Spearman and Pearson scores, Mantel p-values (class labels permuted), and a bootstrap
    interval over the images (resampled within class, centroids recomputed).
    """
    from prh_lightning.functional import permutation_test

    x, text = x.double(), text.double()
    centroids = class_centroids(x, labels)
    result: dict[str, Any] = {}
    for compare in ("spearman", "pearson"):  # Mantel test: the library's fast RSA null
        test = permutation_test(centroids, text, metric="rsa", distance="cosine", compare=compare,
                                n_permutations=s.permutations, seed=s.seed)
        result[compare] = test.score
        result[f"{compare}_p"] = test.p_value
        result[f"{compare}_z"] = test.z_score
    result["spearman_ci95"] = bootstrap_centroid_rsa(x, labels, text, s)
    return result


def rdm_pairs(x: torch.Tensor, labels: torch.Tensor, text: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The 45 centroid-pair cosine dissimilarities of the vision model and of the text model."""
    from prh_lightning.functional import condensed, rdm

    vision = condensed(rdm(class_centroids(x.double(), labels), "cosine"))
    return vision.numpy(), condensed(rdm(text.double(), "cosine")).numpy()


def centroid_study(reps, text: dict[str, torch.Tensor], s: Settings) -> dict[str, dict[str, Any]]:
    """``{text_kind: {layer: centroid_rsa(...)}}`` for every tapped layer of one model."""
    return {kind: {layer: centroid_rsa(reps[layer], reps.labels, emb, s) for layer in reps.layers}
            for kind, emb in text.items()}


# -- figures -------------------------------------------------------------------------------

def umap_embed(x: torch.Tensor, s: Settings) -> np.ndarray:
    """2-D UMAP of ``x [n, d]`` (standardised first); returns ``[n, 2]``."""
    import umap
    from sklearn.preprocessing import StandardScaler

    z = StandardScaler().fit_transform(x.double().numpy())
    reducer = umap.UMAP(n_components=2, n_neighbors=15, min_dist=0.1, n_epochs=s.umap_epochs,
                        random_state=s.seed, n_jobs=1)
    return reducer.fit_transform(z)


def umap_figure(reps, model_name: str, s: Settings):
    """One UMAP panel per layer, points coloured by class; returns a matplotlib Figure."""
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    keep = torch.arange(reps.n)[: s.umap_points]
    labels = reps.labels[keep].numpy()
    cols = min(3, len(reps.layers))
    rows = -(-len(reps.layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, layer in zip(axes.flat, tqdm(reps.layers, desc=f"UMAP {model_name}", disable=not s.progress)):
        xy = umap_embed(reps[layer][keep], s)
        for c, name in enumerate(CLASS_NAMES):
            mask = labels == c
            ax.scatter(xy[mask, 0], xy[mask, 1], s=4, color=cmap(c), label=name)
        ax.set_title(f"{model_name} {layer}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(reps.layers):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", markerscale=3, fontsize=8, frameon=False)
    fig.subplots_adjust(right=0.85)
    return fig


def scatter_figure(pairs: dict[str, tuple[np.ndarray, np.ndarray]], stats: dict[str, dict], model_name: str):
    """RSA scatter per text kind: vision centroid dissimilarity (x) vs MiniLM (y), with trend line."""
    import matplotlib.pyplot as plt
    from scipy.stats import linregress

    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.2), squeeze=False)
    for ax, (kind, (vx, ty)) in zip(axes.flat, pairs.items()):
        fit = linregress(vx, ty)
        line = np.linspace(vx.min(), vx.max(), 50)
        ax.scatter(vx, ty, s=14, alpha=0.8)
        ax.plot(line, fit.intercept + fit.slope * line, color="C3", label=f"y = {fit.slope:.2f}x + {fit.intercept:.2f}")
        st = stats[kind]
        ax.set_title(f"{model_name} avgpool vs MiniLM ({kind})\nSpearman {st['spearman']:.3f} "
                     f"(p={st['spearman_p']:.3g}), Pearson {st['pearson']:.3f}", fontsize=9)
        ax.set_xlabel(f"{model_name} centroid cosine dissimilarity")
        ax.set_ylabel("MiniLM label cosine dissimilarity")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def monitor_figure(history: dict[str, list[tuple[int, float]]]):
    """CKA of each FashionCNN layer vs MiniLM and vs ResNet (best ResNet layer) over training steps."""
    from prh_lightning.plotting import line_figure

    series = {}
    for reference, label in (("minilm", "vs MiniLM"), ("resnet", "vs ResNet")):
        for layer in CNN_LAYERS:
            points = history.get(f"alignment/cka/{reference}/{layer}", [])
            if points:
                steps, values = zip(*points)
                series[f"{layer} {label}"] = (list(steps), list(values))
    return line_figure(series, title="FashionCNN layers while training: linear CKA on the probe", ylabel="CKA")


def save_heatmaps(matrices: dict[str, torch.Tensor], figures: Path) -> dict[str, str]:
    """One PNG per layer x layer matrix; returns ``{name: relative path}``."""
    from prh_lightning.plotting import heatmap_figure
    from prh_lightning.reporting import save_figure

    paths = {}
    for name, matrix in matrices.items():
        fig = heatmap_figure(matrix, CNN_LAYERS, RESNET_LAYERS, title=f"FashionCNN x ResNet-18: {HEATMAPS[name][2]}",
                             xlabel="ResNet-18 layer", ylabel="FashionCNN layer", annotate=True)
        save_figure(fig, figures / f"heatmap_{name}.png")
        paths[name] = f"figures/heatmap_{name}.png"
    return paths


# -- report ---------------------------------------------------------------------------------

def _best(matrix: torch.Tensor) -> tuple[str, str, float]:
    i, j = divmod(int(torch.argmax(matrix)), matrix.shape[1])
    return CNN_LAYERS[i], RESNET_LAYERS[j], float(matrix[i, j])


def heatmap_reading(name: str, matrix: torch.Tensor, test: dict | None) -> str:
    """One paragraph: best and worst cells, early-vs-late trend, permutation result if any."""
    row, col, value = _best(matrix)
    flat = int(torch.argmin(matrix))
    lo_row, lo_col = CNN_LAYERS[flat // matrix.shape[1]], RESNET_LAYERS[flat % matrix.shape[1]]
    early, late = float(matrix[:, :3].mean()), float(matrix[:, 3:].mean())
    text = (f"The most similar pair is FashionCNN {row} / ResNet {col} ({value:.3f}); the least similar is "
            f"FashionCNN {lo_row} / ResNet {lo_col} ({float(matrix.min()):.3f}). Averaged over FashionCNN layers, "
            f"ResNet's early layers (conv1-layer2) score {early:.3f} and its late layers (layer3-avgpool) {late:.3f}, "
            f"so the two vision models agree {'more early' if early > late else 'more late'} in ResNet's depth.")
    if test is not None:
        text += (f" Shuffling which image is which (permutation test) puts the best cell at z = {test['z_score']:.1f}, "
                 f"p = {test['p_value']:.3g}.")
    return text


def rsa_reading(model: str, st: dict[str, dict], layer_table: dict[str, dict]) -> str:
    names, tmpl = st["names"], st["templates"]
    lo, hi = names["spearman_ci95"]
    best_layer = max(layer_table, key=lambda layer: layer_table[layer]["spearman"])
    verdict = "is" if names["spearman_p"] < 0.05 else "is not"
    return (f"Each point is one of the 45 pairs of classes: how far apart {model} puts the two class centroids "
            f"(avgpool, cosine) against how far apart MiniLM puts the two class names. Spearman RSA is "
            f"{names['spearman']:.3f} (95% bootstrap interval over images {lo:.3f} to {hi:.3f}, which covers only the choice "
            f"of images, not the small number of classes; the seed reported 0.347 for FashionCNN), Pearson {names['pearson']:.3f}. Against a Mantel null (class labels of one side shuffled, "
            f"p = {names['spearman_p']:.3g}) the agreement {verdict} significant at 5%. With sentence "
            f"templates instead of bare words (the seed's limitation 3) Spearman is {tmpl['spearman']:.3f} "
            f"(p = {tmpl['spearman_p']:.3g}). Over {model}'s layers, centroid RSA with the names peaks at {best_layer} "
            f"({layer_table[best_layer]['spearman']:.3f}).")


def monitor_reading(s: Settings, history: dict[str, list[tuple[int, float]]]) -> str:
    def change(tag: str) -> str:
        points = history.get(tag, [])
        return f"{points[0][1]:.3f} -> {points[-1][1]:.3f}" if points else "n/a"

    return (f"The AlignmentMonitor checked FashionCNN every {s.monitor_every} steps and at each validation on a probe "
            f"of {s.probe_size} test images (not used for training): CKA and mutual k-NN between each FashionCNN layer "
            "and MiniLM (the embedding of each probe image's class name) and each ResNet-18 layer. From the first "
            f"check (untrained) to the last, avgpool's CKA with MiniLM went {change('alignment/cka/minilm/avgpool')} and "
            f"with its best ResNet layer {change('alignment/cka/resnet/avgpool')}. All scalars "
            "(`alignment/<metric>/<reference>/<layer>`) and heatmap images are in TensorBoard: "
            f"`tensorboard --logdir {s.out / 'tensorboard'}`.")


def layer_rsa_table(study: dict[str, dict[str, dict]], layers: list[str]) -> str:
    from prh_lightning.reporting import markdown_table

    rows = [[layer, study["names"][layer]["spearman"], study["names"][layer]["spearman_p"],
             study["names"][layer]["pearson"], study["templates"][layer]["spearman"],
             study["templates"][layer]["spearman_p"]] for layer in layers]
    return markdown_table(["layer", "Spearman (names)", "p", "Pearson (names)", "Spearman (templates)", "p"], rows)


def write_report(s: Settings, summary: dict[str, Any], matrices: dict[str, torch.Tensor],
                 studies: dict[str, dict], tests: dict[str, dict]) -> None:
    """``report.md``: every figure with its numbers and one paragraph of reading."""
    from prh_lightning.reporting import Report, markdown_table

    acc = summary["test_accuracy"]
    rn = summary["resnet"]
    report = Report("ResNet-18 vs FashionCNN vs MiniLM on Fashion-MNIST", intro=(
        f"Settings: {'quick' if s.quick else 'full (seed)'} mode, N = {summary['n_samples']} stratified test images, "
        f"seed {s.seed}, {s.permutations} permutations per test, {s.bootstraps} bootstrap resamples. "
        f"ResNet-18 weights: **{rn['weights']}** ({rn['training']}, input {rn['input_size']}x{rn['input_size']})"
        f"{'; ' + rn['note'] if rn['note'] else ''}"
        f"{'. At 28x28 input ResNet layer4 is already 1x1, so layer4 and avgpool coincide' if rn['input_size'] <= 32 else ''}"
        f". Run time {summary['runtime_s']:.0f} s. "
        f"TensorBoard: `tensorboard --logdir {s.out / 'tensorboard'}`."))
    report.section("Test accuracy", table=markdown_table(
        ["model", "test accuracy", "test images"],
        [["FashionCNN", acc["fashioncnn"], summary["test_images"]], ["ResNet-18", acc["resnet"], summary["test_images"]]]),
        text=(f"Chance is 0.100. FashionCNN (two 3x3 conv layers, global average pooling, {s.epochs} epochs on "
              f"{summary['train_images']['fashioncnn']} images) reaches {acc['fashioncnn']:.3f}; ResNet-18 "
              f"({rn['weights']}, {rn['training']}) reaches {acc['resnet']:.3f}."))
    for model in ("resnet", "fashioncnn"):
        label = "ResNet-18" if model == "resnet" else "FashionCNN"
        report.section(f"UMAP of each {label} layer", figure=summary["figures"][f"umap_{model}"], text=(
            f"Each panel is a 2-D UMAP of one tapped layer (spatially averaged) on {summary['umap_points']} of the "
            f"analysis images, coloured by class. Well separated colours mean the layer already sorts the classes; "
            f"the footwear classes (Sandal, Sneaker, Ankle boot) are the easiest to find apart from the clothing. "
            f"Numbers for the same layers are in the heatmaps and the centroid RSA table below."))
    for name, matrix in matrices.items():
        report.section(f"FashionCNN x ResNet-18: {HEATMAPS[name][2]}", figure=summary["heatmaps"][name],
                       table=markdown_table(["FashionCNN \\ ResNet"] + RESNET_LAYERS,
                                            [[CNN_LAYERS[i]] + [float(v) for v in matrix[i]] for i in range(len(CNN_LAYERS))]),
                       text=heatmap_reading(name, matrix, tests.get(name)) + NOTES.get(name, ""))
    for model, label in (("fashioncnn", "FashionCNN"), ("resnet", "ResNet-18")):
        layers = CNN_LAYERS if model == "fashioncnn" else RESNET_LAYERS
        report.section(f"RSA: {label} class centroids vs MiniLM label embeddings", figure=summary["figures"][f"rsa_{model}"],
                       table=layer_rsa_table(studies[model], layers),
                       text=rsa_reading(label, {k: v["avgpool"] for k, v in studies[model].items()}, studies[model]["names"]))
    report.section("Alignment while FashionCNN trains", figure=summary["figures"]["monitor"],
                   text=monitor_reading(s, summary["monitor_history"]))
    report.write(s.out / "report.md")


# -- the run ----------------------------------------------------------------------------------

def quiet_libraries() -> None:
    """Keep the console to progress bars and our own lines."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "sentence_transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="umap")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def say(s: Settings, text: str) -> None:
    if s.progress:
        print(f"[fashion-mnist {time.strftime('%H:%M:%S')}] {text}", flush=True)


def train_models(s: Settings, minilm, resnet, info: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Train ResNet-18 if needed, then FashionCNN with the AlignmentMonitor; returns both and facts."""
    from prh_lightning.models.fashion_cnn import FashionCNN

    resnet_dm = data_module(s, s.resnet_train_size)
    say(s, f"ResNet-18: weights {info['weights']}, training: {info['training']}")
    resnet_acc = fit_and_test(make_trainer(s, "resnet", s.resnet_epochs), resnet, resnet_dm, train=info["needs_training"])
    resnet.eval()
    cnn_dm = data_module(s, s.train_size)
    probe_set = cnn_dm.analysis_set(s.probe_size, seed=s.seed + 1)
    monitor = alignment_monitor(s, probe_set.tensors, minilm, resnet)
    cnn = FashionCNN(lr=s.lr)
    say(s, f"FashionCNN: {s.epochs} epochs on {len(cnn_dm.train_set)} images, AlignmentMonitor every {s.monitor_every} steps")
    cnn_acc = fit_and_test(make_trainer(s, "fashion_cnn", s.epochs, [monitor]), cnn, cnn_dm)
    facts = {
        "resnet": info,
        "test_accuracy": {"fashioncnn": cnn_acc, "resnet": resnet_acc},
        "test_images": len(cnn_dm.test_set),
        "train_images": {"fashioncnn": len(cnn_dm.train_set),
                         "resnet": len(resnet_dm.train_set) if info["needs_training"] else 0},
        "monitor_final": {tag: points[-1][1] for tag, points in monitor.history.items() if tag.endswith("/best")},
        "monitor_history": {tag: points for tag, points in monitor.history.items() if tag.startswith("alignment/cka/")},
        "analysis_set": cnn_dm.analysis_set(s.n_samples),
    }
    return cnn, resnet, facts


def save_representations(s: Settings, cnn, resnet, texts: dict[str, torch.Tensor]) -> None:
    """``OUT/representations/*.safetensors``: both models' layers and MiniLM's label embeddings."""
    from prh_lightning import Representations

    folder = s.out / "representations"
    cnn.save(folder / "fashioncnn.safetensors")
    resnet.save(folder / "resnet.safetensors")
    Representations(texts, labels=torch.arange(len(CLASS_NAMES)),
                    metadata={"model": "all-MiniLM-L6-v2", "classes": CLASS_NAMES}).save(folder / "minilm_labels.safetensors")


def analyse(s: Settings, cnn, resnet, minilm, facts: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """Record both models, make every figure, compute every number.

    Returns ``(summary, heatmap matrices, centroid studies, best-cell tests)``.
    """
    from prh_lightning.reporting import save_figure

    figures = s.out / "figures"
    dataset = facts.pop("analysis_set")
    say(s, f"recording layers on {len(dataset)} test images")
    cnn_reps, resnet_reps = record(cnn, dataset, CNN_LAYERS, s), record(resnet, dataset, RESNET_LAYERS, s)
    texts = {kind: encode_labels(minilm, groups) for kind, groups in label_texts().items()}
    save_representations(s, cnn_reps, resnet_reps, texts)
    say(s, "layer x layer heatmaps and permutation tests")
    matrices = layer_heatmaps(cnn_reps, resnet_reps)
    tests = best_cell_tests(cnn_reps, resnet_reps, matrices, s)
    heatmap_paths = save_heatmaps(matrices, figures)
    say(s, "class-centroid RSA against MiniLM (Mantel tests, bootstrap)")
    studies = {"fashioncnn": centroid_study(cnn_reps, texts, s), "resnet": centroid_study(resnet_reps, texts, s)}
    paths = {}
    for model, reps, label in (("fashioncnn", cnn_reps, "FashionCNN"), ("resnet", resnet_reps, "ResNet-18")):
        pairs = {kind: rdm_pairs(reps["avgpool"], reps.labels, emb) for kind, emb in texts.items()}
        stats = {kind: studies[model][kind]["avgpool"] for kind in texts}
        save_figure(scatter_figure(pairs, stats, label), figures / f"rsa_{model}_minilm.png")
        paths[f"rsa_{model}"] = f"figures/rsa_{model}_minilm.png"
    save_figure(monitor_figure(facts["monitor_history"]), figures / "monitor_cka.png")
    paths["monitor"] = "figures/monitor_cka.png"
    say(s, "UMAP of every layer")
    for model, reps, label in (("resnet", resnet_reps, "ResNet-18"), ("fashioncnn", cnn_reps, "FashionCNN")):
        save_figure(umap_figure(reps, label, s), figures / f"umap_{model}.png")
        paths[f"umap_{model}"] = f"figures/umap_{model}.png"
    summary = build_summary(s, facts, matrices, tests, studies, heatmap_paths, paths, len(dataset))
    return summary, matrices, studies, tests


def build_summary(s, facts, matrices, tests, studies, heatmap_paths, figure_paths, n) -> dict[str, Any]:
    """The key numbers of the run (``summary.json``)."""
    fc, rn = studies["fashioncnn"], studies["resnet"]
    summary = {
        "rsa_fashioncnn_minilm": fc["names"]["avgpool"]["spearman"],
        "rsa_fashioncnn_minilm_p": fc["names"]["avgpool"]["spearman_p"],
        "rsa_resnet_minilm": rn["names"]["avgpool"]["spearman"],
        "rsa_resnet_minilm_p": rn["names"]["avgpool"]["spearman_p"],
        "rsa_fashioncnn_minilm_templates": fc["templates"]["avgpool"]["spearman"],
        "rsa_fashioncnn_minilm_templates_p": fc["templates"]["avgpool"]["spearman_p"],
        "rsa_resnet_minilm_templates": rn["templates"]["avgpool"]["spearman"],
        "rsa_resnet_minilm_templates_p": rn["templates"]["avgpool"]["spearman_p"],
        "resnet_weights": facts["resnet"]["weights"],
        "n_samples": n,
        "umap_points": min(n, s.umap_points),
        "centroid_rsa": studies,
        "heatmaps": heatmap_paths,
        "heatmap_matrices": {k: {"rows": CNN_LAYERS, "cols": RESNET_LAYERS, "values": v} for k, v in matrices.items()},
        "best_cell_permutation_tests": tests,
        "figures": figure_paths,
        "tensorboard": str(s.out / "tensorboard"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
    }
    summary.update(facts)
    return summary


def run(s: Settings) -> dict[str, Any]:
    """The whole study; writes every output under ``s.out`` and returns the summary."""
    from prh_lightning.models.pretrained import load_minilm
    from prh_lightning.reporting import write_json

    start = time.perf_counter()
    quiet_libraries()
    torch.manual_seed(s.seed)
    fashion_mnist_root(s.data_dir, download=s.download, progress=s.progress)  # fail fast (exit 2) when the data is missing
    resnet, info = build_resnet(s)
    say(s, "loading all-MiniLM-L6-v2")
    minilm = load_minilm()
    cnn, resnet, facts = train_models(s, minilm, resnet, info)
    summary, matrices, studies, tests = analyse(s, cnn, resnet, minilm, facts)
    summary["runtime_s"] = time.perf_counter() - start
    write_report(s, summary, matrices, studies, tests)
    write_json(s.out / "summary.json", summary)
    return summary


def print_results(s: Settings, summary: dict[str, Any]) -> None:
    acc = summary["test_accuracy"]
    print(f"FashionCNN test accuracy {acc['fashioncnn']:.3f}, ResNet-18 ({summary['resnet_weights']}) {acc['resnet']:.3f}")
    print(f"RSA FashionCNN-MiniLM {summary['rsa_fashioncnn_minilm']:.3f} (p = {summary['rsa_fashioncnn_minilm_p']:.3g}); "
          f"ResNet-MiniLM {summary['rsa_resnet_minilm']:.3f} (p = {summary['rsa_resnet_minilm_p']:.3g})")
    print(f"report: {s.out / 'report.md'}  summary: {s.out / 'summary.json'}  ({summary['runtime_s']:.0f} s)")
    print(f"tensorboard --logdir {s.out / 'tensorboard'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``prh-lightning fashion-mnist``; returns the exit status (2: bad input)."""
    try:
        settings = settings_from_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2), already printed
        return int(stop.code or 0)
    except RecipeInputError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    try:
        summary = run(settings)
    except (FashionMNISTNotFound, PretrainedUnavailable, RecipeInputError, FileNotFoundError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    print_results(settings, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
