"""Settings, constants and console lines of the ``fashion-mnist`` recipe."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

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
    "cka": ("cka", {"normalize": True}, "linear CKA"),
    "mutual_knn": ("mutual_knn", {"k": 10, "normalize": True}, "mutual k-NN (k=10)"),
}

NOTES = {  # a caveat appended to a heatmap's reading
    "rsa_euclidean": (
        " Caveat on conv1 / conv1: a convolution is linear and the tapped outputs are averaged over space, "
        "so on Fashion-MNIST's black-bordered images each conv1 feature is almost exactly a bias plus a multiple "
        "of the image's mean brightness; both models' Euclidean RDMs then rank image pairs by brightness difference, "
        "which gives RSA near 1 without any shared edge detectors (the seed read its 1.0 as shared edge detection)."
    ),
}



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
    calibration_permutations: int = 200
    bootstraps: int = 1000
    jackknife_groups: int = 10
    umap_points: int = 1000
    umap_epochs: int | None = None
    probe_size: int = 512
    monitor_every: int = 50
    seed: int = 0
    threads: str = "auto"
    progress: bool = True
    quick: bool = False


def say(s: Settings, text: str) -> None:
    if s.progress:
        print(f"[fashion-mnist {time.strftime('%H:%M:%S')}] {text}", flush=True)
