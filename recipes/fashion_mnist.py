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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from prh_lightning.data.fashion_mnist import FashionMNISTNotFound, fashion_mnist_root
from prh_lightning.recipes import _common as common
from prh_lightning.recipes._common import RecipeInputError
from prh_lightning.recipes._fashion_analysis import (
    best_cells,
    calibrated_heatmaps,
    centroid_study,
    depth_contrast,
    layer_heatmaps,
    rdm_pairs,
    tested_claims,
)
from prh_lightning.recipes._fashion_figures import monitor_figure, save_heatmaps, scatter_figure, umap_figure
from prh_lightning.recipes._fashion_report import results_text, write_report
from prh_lightning.recipes._fashion_settings import CNN_LAYERS, PROG, RESNET_LAYERS, Settings, say
from prh_lightning.recipes._fashion_training import (
    build_resnet,
    encode_labels,
    label_texts,
    record,
    save_representations,
    train_models,
)

__all__ = ["main", "run", "Settings", "build_resnet", "settings_from_args"]

# Quick mode keeps the seed's N = 1,000 and every training image, and cuts epochs and resamples.
QUICK = dict(n_samples=1000, epochs=3, resnet_epochs=1, resnet_train_size=12000, val_size=1000,
             permutations=1000, bootstraps=200, jackknife_groups=10, umap_points=1000, umap_epochs=100,
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
    p.add_argument("--calibration-permutations", type=int,
                   help="image shufflings that calibrate every heatmap against chance (default 200)")
    p.add_argument("--bootstraps", type=int, help="bootstrap resamples per interval (default 1000; quick 200)")
    p.add_argument("--umap-points", type=int, help="points per UMAP panel (default N)")
    p.add_argument("--umap-epochs", type=int, help="UMAP optimisation epochs (default: umap's; quick 100)")
    p.add_argument("--probe-size", type=int, help="AlignmentMonitor probe images (default 512; quick 256)")
    p.add_argument("--monitor-every", type=int, help="AlignmentMonitor check every N steps (default 50; quick 100)")
    p.add_argument("--jackknife-groups", type=int, help="image groups of the depth-contrast jackknife (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seeds subsets, training and tests (default 0)")
    p.add_argument("--threads", default="auto", help=common.THREADS_HELP)
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
                data_dir=args.data_dir, download=args.download, threads=args.threads)
    settings = Settings(**base)
    check_settings(settings)
    return settings


def check_settings(s: Settings) -> None:
    """Raise :class:`RecipeInputError` for values that cannot work."""
    positive = ["n_samples", "epochs", "resnet_epochs", "batch_size", "permutations", "calibration_permutations", "bootstraps",
                "umap_points", "probe_size", "monitor_every", "jackknife_groups"]
    for name in positive:
        if getattr(s, name) <= 0:
            raise RecipeInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(s, name)}")
    if s.n_samples < 30:
        raise RecipeInputError(f"--n-samples must be at least 30 (3 per class for centroids), got {s.n_samples}")
    if not 2 <= s.jackknife_groups <= s.n_samples // 10:
        raise RecipeInputError(f"--jackknife-groups must be in [2, n_samples / 10], got {s.jackknife_groups}")
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


# -- the run ----------------------------------------------------------------------------------

def quiet_libraries() -> None:
    """Keep the console to progress bars and our own lines (called from the command line only)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "sentence_transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="umap")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def data_record(s: Settings) -> dict[str, Any]:
    """Path and SHA-256 of the four Fashion-MNIST files used (70,000 images)."""
    root = Path(fashion_mnist_root(s.data_dir, download=False, progress=False))
    files = sorted((root / "FashionMNIST" / "raw").glob("*-ubyte"))
    return {**common.fingerprint(files, root), "files": len(files), "n_items": 70000}


def analyse(s: Settings, cnn, resnet, minilm, facts: dict[str, Any]) -> tuple[dict, dict, dict, dict]:
    """Record both models, make every figure, compute every number.

    Returns ``(summary, heatmap matrices, centroid studies, calibrated best cells)``.
    """
    from prh_lightning.analysis.calibrated import calibration_fields
    from prh_lightning.reporting import save_figure

    figures = s.out / "figures"
    dataset = facts.pop("analysis_set")
    say(s, f"recording layers on {len(dataset)} test images")
    cnn_reps, resnet_reps = record(cnn, dataset, CNN_LAYERS, s), record(resnet, dataset, RESNET_LAYERS, s)
    texts = {kind: encode_labels(minilm, groups) for kind, groups in label_texts().items()}
    save_representations(s, cnn_reps, resnet_reps, texts)
    say(s, f"layer x layer heatmaps, calibrated against {s.calibration_permutations} image shufflings, "
           "and the depth contrast (jackknife)")
    matrices = layer_heatmaps(cnn_reps, resnet_reps)
    calibrated = calibrated_heatmaps(cnn_reps, resnet_reps, s)
    tests = best_cells(calibrated)
    contrasts = depth_contrast(cnn_reps, resnet_reps, matrices, s)
    heatmap_paths = save_heatmaps(matrices, figures)
    calibrated_paths = save_heatmaps({name: res.calibrated for name, res in calibrated.items()}, figures, calibrated=True)
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
    threads = torch.get_num_threads()
    for model, reps, label in (("resnet", resnet_reps, "ResNet-18"), ("fashioncnn", cnn_reps, "FashionCNN")):
        save_figure(umap_figure(reps, label, s), figures / f"umap_{model}.png")
        paths[f"umap_{model}"] = f"figures/umap_{model}.png"
    torch.set_num_threads(threads)  # UMAP's libraries reset the OpenMP thread count
    fc, rn = studies["fashioncnn"], studies["resnet"]
    summary = {
        "rsa_fashioncnn_minilm": fc["names"]["avgpool"]["spearman"],
        "rsa_fashioncnn_minilm_p": fc["names"]["avgpool"]["spearman_p"],
        "rsa_resnet_minilm": rn["names"]["avgpool"]["spearman"],
        "rsa_resnet_minilm_p": rn["names"]["avgpool"]["spearman_p"],
        "rsa_fashioncnn_minilm_calibrated": fc["names"]["avgpool"]["spearman_calibrated"],
        "rsa_resnet_minilm_calibrated": rn["names"]["avgpool"]["spearman_calibrated"],
        "rsa_fashioncnn_minilm_templates": fc["templates"]["avgpool"]["spearman"],
        "rsa_fashioncnn_minilm_templates_p": fc["templates"]["avgpool"]["spearman_p"],
        "rsa_resnet_minilm_templates": rn["templates"]["avgpool"]["spearman"],
        "rsa_resnet_minilm_templates_p": rn["templates"]["avgpool"]["spearman_p"],
        "resnet_weights": facts["resnet"]["weights"],
        "n_samples": len(dataset),
        "umap_points": min(len(dataset), s.umap_points),
        "centroid_rsa": studies,
        "heatmaps": heatmap_paths,
        "heatmap_matrices": {k: {"rows": CNN_LAYERS, "cols": RESNET_LAYERS, "values": v} for k, v in matrices.items()},
        "calibrated_heatmaps": {k: {"rows": CNN_LAYERS, "cols": RESNET_LAYERS, **calibration_fields(res)}
                                for k, res in calibrated.items()},
        "calibrated_heatmap_figures": calibrated_paths,
        "calibration": {"n_permutations": s.calibration_permutations, "seed": s.seed, "alpha": 0.05,
                        "permutations": "prh_lightning.analysis.draw_permutations(n_samples, n_permutations, seed); "
                                        "each reorders the images of every ResNet-18 layer"},
        "best_cell_calibrated": tests,
        "depth_contrast": contrasts,
        "claims": tested_claims(studies, tests),
        "figures": paths,
        "tensorboard": str(s.out / "tensorboard"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        **facts,
    }
    return summary, matrices, studies, tests


def run(s: Settings) -> dict[str, Any]:
    """The whole study; writes every output under ``s.out`` and returns the summary."""
    from prh_lightning.models.pretrained import load_minilm
    from prh_lightning.reporting import write_json

    start = time.perf_counter()
    threads = torch.get_num_threads()  # set by --threads (run_cli) for the whole run
    torch.manual_seed(s.seed)
    fashion_mnist_root(s.data_dir, download=s.download, progress=s.progress)  # fail fast (exit 2) when the data is missing
    resnet, info = build_resnet(s)
    say(s, "loading all-MiniLM-L6-v2")
    minilm = load_minilm()
    cnn, resnet, facts = train_models(s, minilm, resnet, info)
    summary, matrices, studies, tests = analyse(s, cnn, resnet, minilm, facts)
    summary["data"] = data_record(s)
    summary["threads"] = threads
    summary["runtime_s"] = time.perf_counter() - start
    write_report(s, summary, matrices, studies, tests)
    write_json(s.out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``prh-lightning fashion-mnist``; returns the exit status (2: bad input)."""
    try:
        settings = settings_from_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2), already printed
        return int(stop.code or 0)
    except RecipeInputError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    quiet_libraries()
    return common.run_cli("fashion-mnist", run, settings, lambda summary: results_text(settings, summary),
                          errors=(FashionMNISTNotFound, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
