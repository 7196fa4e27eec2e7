"""Shared pieces of the ``ood``, ``noise`` and ``training_dynamics`` recipes: image sets
(Flickr8k photos, Fashion-MNIST as 3-channel images, pixel noise), the offline vision model
set (EfficientNet-Lite0/1/2 with ImageNet weights, plus randomly initialised copies as a
control), feature extraction, and bootstrap resampling of paired features.

Images are always ``Tensor[n, 3, S, S]`` with pixels in ``[0, 1]``; each model scales them
to ``[-1, 1]`` itself (mean = std = 0.5, how the EfficientNet-Lite weights were trained).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prh_lightning.data.paired import default_flickr_dir

IMAGE_SETS = ("flickr", "fashion-mnist", "noise", "gaussian-noise")
PRETRAINED = ("lite0", "lite1", "lite2")
RANDOM_SUFFIX = "-random"


class RecipeInputError(ValueError):
    """Bad recipe input (missing data, unknown name, impossible setting); the message says what to do."""


# -- image sets ---------------------------------------------------------------------------------
def flickr_dir() -> Path:
    """Folder of Flickr8k photos: ``images/`` of the paired dataset (``$PRH_FLICKR_DIR`` or
    ``../shared/data/flickr8k-1024``), or the folder itself when it holds the photos directly."""
    root = default_flickr_dir()
    return root / "images" if (root / "images").is_dir() else root


def _pick(count: int, n: int, seed: int, what: str) -> np.ndarray:
    """``n`` distinct sorted indices out of ``count``, drawn with ``seed``."""
    if n > count:
        raise RecipeInputError(f"asked for {n} {what} images but only {count} are available")
    return np.sort(np.random.default_rng(seed).choice(count, size=n, replace=False))


def _square(image: torch.Tensor, size: int) -> torch.Tensor:
    """``[c, h, w]`` -> ``[c, size, size]``: resize the short side to ``size``, centre crop."""
    from torchvision.transforms.v2 import functional as TF

    image = TF.resize(image, size, antialias=True)
    return TF.center_crop(image, [size, size])


def flickr_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` Flickr8k photos as ``[n, 3, size, size]`` in ``[0, 1]``."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    folder = flickr_dir()
    files = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if not files:
        raise RecipeInputError(
            f"no Flickr8k photos (*.jpg) in {folder}; set PRH_FLICKR_DIR to the dataset folder "
            "(offline copy: ../shared/data/flickr8k-1024) or to a folder of photos"
        )
    chosen = [files[i] for i in _pick(len(files), n, seed, "Flickr")]
    tensors = []
    for path in chosen:
        with Image.open(path) as im:
            tensors.append(_square(TF.pil_to_tensor(im.convert("RGB")), size))
    return torch.stack(tensors).float() / 255.0


def fashion_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` Fashion-MNIST test images, grey copied to 3 channels: ``[n, 3, size, size]`` in ``[0, 1]``."""
    from prh_lightning.data.fashion_mnist import FashionMNISTNotFound, load_fashion_mnist

    try:
        data = load_fashion_mnist(train=False).data  # [10000, 28, 28] uint8
    except FashionMNISTNotFound as err:
        raise RecipeInputError(str(err)) from None
    grey = data[torch.from_numpy(_pick(len(data), n, seed, "Fashion-MNIST"))].float().div(255.0)
    grey = F.interpolate(grey[:, None], size=(size, size), mode="bilinear", align_corners=False)
    return grey.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def noise_images(n: int, size: int, seed: int = 0, kind: str = "uniform") -> torch.Tensor:
    """Pure pixel noise ``[n, 3, size, size]`` in ``[0, 1]``: i.i.d. uniform pixels, or Gaussian
    (mean 0.5, std 0.25, clipped) for ``kind="gaussian"``."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n, 3, size, size, generator=gen)
    return (0.5 + 0.25 * torch.randn(n, 3, size, size, generator=gen)).clamp(0, 1)


def image_set(name: str, n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Images of set ``name`` (one of :data:`IMAGE_SETS`) as ``[n, 3, size, size]`` in ``[0, 1]``."""
    if n < 4:
        raise RecipeInputError(f"need at least 4 images per set, got {n}")
    if name == "flickr":
        return flickr_images(n, size, seed)
    if name == "fashion-mnist":
        return fashion_images(n, size, seed)
    if name in ("noise", "gaussian-noise"):
        return noise_images(n, size, seed, kind="uniform" if name == "noise" else "gaussian")
    raise RecipeInputError(f"unknown image set {name!r}; choose from {', '.join(IMAGE_SETS)}")


def add_gaussian_noise(images: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """``clip(images + sigma * noise, 0, 1)`` for ``images``/``noise`` ``[n, 3, S, S]``."""
    return (images + sigma * noise).clamp(0, 1)


# -- the vision model set -----------------------------------------------------------------------
@dataclass
class VisionModel:
    """One model of the set: ``module`` maps ``[b, 3, S, S]`` in ``[-1, 1]`` to logits."""

    name: str
    module: nn.Module
    pretrained: bool

    def taps(self, n_blocks: int = 3) -> list[str]:
        """Layer names: ``n_blocks`` blocks evenly spread over depth (the last included) and the
        pooled head ``_avg_pooling`` (the 1280-d embedding)."""
        depth = len(self.module._blocks)
        picks = sorted({round(depth * (j + 1) / n_blocks) - 1 for j in range(n_blocks)})
        return [f"_blocks.{i}" for i in picks] + ["_avg_pooling"]


def parse_model_names(text: str) -> list[str]:
    """``"lite0,lite1,lite0-random"`` -> names, checked against the known variants."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        if name.removesuffix(RANDOM_SUFFIX) not in PRETRAINED:
            raise RecipeInputError(
                f"unknown model {name!r}; use {', '.join(PRETRAINED)}, optionally with "
                f"'{RANDOM_SUFFIX}' for a randomly initialised copy (e.g. lite0{RANDOM_SUFFIX})"
            )
    if len(names) != len(set(names)) or len(names) < 2:
        raise RecipeInputError(f"need at least two distinct models, got {names}")
    return names


def load_vision_model(name: str, seed: int = 0) -> VisionModel:
    """``"lite0"`` (ImageNet weights) or ``"lite0-random"`` (random init from ``seed``), in eval mode."""
    from efficientnet_lite_pytorch import EfficientNet

    from prh_lightning.models.pretrained import PretrainedUnavailable, load_efficientnet_lite

    variant = name.removesuffix(RANDOM_SUFFIX)
    if name.endswith(RANDOM_SUFFIX):
        torch.manual_seed(seed)
        return VisionModel(name, EfficientNet.from_name(f"efficientnet-{variant}").eval(), False)
    try:
        module, _ = load_efficientnet_lite(variant)
    except PretrainedUnavailable as err:
        raise RecipeInputError(str(err)) from None
    return VisionModel(name, module, True)


@torch.no_grad()
def embed(model: VisionModel, images: torch.Tensor, layers: Sequence[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Spatially mean-pooled, row-L2-normalised features of ``layers``: ``{layer: [n, d]}``
    for ``images [n, 3, S, S]`` in ``[0, 1]``."""
    from prh_lightning.taps import LayerTaps

    with LayerTaps(model.module, layers=list(layers), reduce="mean") as taps:
        for start in range(0, len(images), batch_size):
            model.module((images[start : start + batch_size] - 0.5) / 0.5)
        feats = taps.features()
    return {name: F.normalize(feats[name].float(), dim=1) for name in layers}


# -- progress ---------------------------------------------------------------------------------------
_START = [0.0]


def run_cli(prog: str, run, args, describe) -> int:
    """Run ``run(args)``; bad input prints one line on stderr and returns 2, else prints
    ``describe(summary)`` and returns 0 (the ``main`` of every recipe here)."""
    import sys

    try:
        summary = run(args)
    except RecipeInputError as err:
        print(f"prh-lightning {prog}: {err}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 0


def log(message: str) -> None:
    """Print ``[  12.3 s] message`` to stderr (time since the first call)."""
    import sys
    import time

    now = time.time()
    if not _START[0]:
        _START[0] = now
    print(f"[{now - _START[0]:7.1f} s] {message}", file=sys.stderr, flush=True)


def neighbour_lists(x: torch.Tensor, k: int, index: np.ndarray | None = None) -> torch.Tensor:
    """``[n, k]`` neighbours of the rows of ``x [n, d]`` at ``index`` (a bootstrap resample:
    copies of one row are never each other's neighbours), or of all rows when None."""
    from prh_lightning.functional.knn import knn_indices

    if index is None:
        return knn_indices(x, k)
    ids = torch.as_tensor(index, dtype=torch.long)
    return knn_indices(x[ids], k, groups=ids)


def resampled_mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int, index: np.ndarray | None = None) -> float:
    """Mutual k-NN of ``a [n, d_a]`` and ``b [n, d_b]`` on the rows at ``index`` (see
    :func:`neighbour_lists`), or on all rows."""
    from prh_lightning.functional.knn import mutual_knn_from_indices

    return float(mutual_knn_from_indices(neighbour_lists(a, k, index), neighbour_lists(b, k, index)))
