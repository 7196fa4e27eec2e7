"""Shared pieces of the ``ood`` and ``noise`` recipes: image sets (Flickr8k photos,
Fashion-MNIST as 3-channel images, pixel noise) and the offline vision model set
(EfficientNet-Lite0/1/2 from the model zoo, plus randomly re-initialised copies as a control,
whose batch normalisation uses each batch's statistics).

Images are ``Tensor[n, 3, S, S]`` with pixels in ``[0, 1]``. Models load through
:func:`prh_lightning.models.zoo.load_model`; features come from
:func:`prh_lightning.extraction.vision_features` (spatial mean of each tapped block), with the
zoo's EfficientNet-Lite scaling to ``[-1, 1]`` applied to the already-sized images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from prh_lightning.recipes._common import RecipeInputError, fingerprint

IMAGE_SETS = ("flickr", "fashion-mnist", "noise", "gaussian-noise")
PRETRAINED = ("lite0", "lite1", "lite2")
RANDOM_SUFFIX = "-random"


# -- image sets ---------------------------------------------------------------------------------
def _pick(count: int, n: int, seed: int, what: str) -> np.ndarray:
    """``n`` distinct sorted indices out of ``count``, drawn with ``seed``."""
    if n > count:
        raise RecipeInputError(f"asked for {n} {what} images but only {count} are available")
    return np.sort(np.random.default_rng(seed).choice(count, size=n, replace=False))


def flickr_files(folder: Path) -> list[Path]:
    """The photos of a Flickr8k folder (directly, or under ``images/``), sorted."""
    photos = folder / "images" if (folder / "images").is_dir() else folder
    files = sorted(photos.glob("*.jpg"))
    if not files:
        raise RecipeInputError(f"no Flickr8k photos (*.jpg) in {photos}")
    return files


def flickr_images(folder: Path, n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """``n`` photos of ``folder`` as ``[n, 3, size, size]`` in ``[0, 1]`` (short side resized,
    centre crop), and the fingerprint of the files used."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    files = flickr_files(folder)
    chosen = [files[i] for i in _pick(len(files), n, seed, "Flickr")]
    tensors = []
    for path in chosen:
        with Image.open(path) as im:
            image = TF.resize(TF.pil_to_tensor(im.convert("RGB")), size, antialias=True)
            tensors.append(TF.center_crop(image, [size, size]))
    return torch.stack(tensors).float() / 255.0, fingerprint(chosen, folder)


def fashion_images(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """``n`` Fashion-MNIST test images, grey copied to 3 channels: ``[n, 3, size, size]`` in ``[0, 1]``."""
    from prh_lightning.data.fashion_mnist import FashionMNISTNotFound, fashion_mnist_root, load_fashion_mnist

    try:
        data = load_fashion_mnist(train=False).data  # [10000, 28, 28] uint8
        root = Path(fashion_mnist_root())
    except FashionMNISTNotFound as err:
        raise RecipeInputError(str(err)) from None
    index = _pick(len(data), n, seed, "Fashion-MNIST")
    grey = data[torch.from_numpy(index)].float().div(255.0)
    grey = torch.nn.functional.interpolate(grey[:, None], size=(size, size), mode="bilinear", align_corners=False)
    files = sorted((root / "FashionMNIST" / "raw").glob("t10k-*-ubyte"))
    info = {**fingerprint(files, root), "n_items": n, "drawn_from": "test split", "seed": seed}
    return grey.clamp(0, 1).expand(-1, 3, -1, -1).contiguous(), info


def noise_images(n: int, size: int, seed: int = 0, kind: str = "uniform") -> torch.Tensor:
    """Pure pixel noise ``[n, 3, size, size]`` in ``[0, 1]``: i.i.d. uniform pixels, or Gaussian
    (mean 0.5, std 0.25, clipped) for ``kind="gaussian"``."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n, 3, size, size, generator=gen)
    return (0.5 + 0.25 * torch.randn(n, 3, size, size, generator=gen)).clamp(0, 1)


def image_set(name: str, n: int, size: int, seed: int = 0, flickr_dir: Path | None = None) -> tuple[torch.Tensor, dict]:
    """Images of set ``name`` (one of :data:`IMAGE_SETS`) as ``[n, 3, size, size]`` in ``[0, 1]``,
    and a record of the data used (path, count, checksum; generated noise: its seed)."""
    if n < 4:
        raise RecipeInputError(f"need at least 4 images per set, got {n}")
    if name == "flickr":
        if flickr_dir is None:
            raise RecipeInputError("the flickr image set needs a data folder")
        return flickr_images(flickr_dir, n, size, seed)
    if name == "fashion-mnist":
        return fashion_images(n, size, seed)
    if name in ("noise", "gaussian-noise"):
        kind = "uniform" if name == "noise" else "gaussian"
        return noise_images(n, size, seed, kind), {"path": None, "n_items": n, "generated": f"{kind} noise, seed {seed}"}
    raise RecipeInputError(f"unknown image set {name!r}; choose from {', '.join(IMAGE_SETS)}")


def add_gaussian_noise(images: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """``clip(images + sigma * noise, 0, 1)`` for ``images``/``noise`` ``[n, 3, S, S]``."""
    return (images + sigma * noise).clamp(0, 1)


# -- the vision model set -----------------------------------------------------------------------
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


def _reinitialise(model: torch.nn.Module, seed: int) -> None:
    """Random weights from ``seed`` (every submodule's own ``reset_parameters``, PyTorch's default
    init), and batch normalisation with the statistics of each batch: with untrained running
    statistics (mean 0, variance 1) the activations shrink to ~1e-9 by the last block, where rows
    are numerically tied and neighbour lists undefined."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None


def load_vision_model(name: str, seed: int = 0):
    """``"lite0"`` (ImageNet weights, from the zoo) or ``"lite0-random"`` (the same architecture
    re-initialised from ``seed``); a zoo ``LoadedModel`` in eval mode with ``pretrained`` in ``extra``."""
    from prh_lightning.models.zoo import load_model

    variant = name.removesuffix(RANDOM_SUFFIX)
    loaded = load_model(f"efficientnet-{variant}")
    random = name.endswith(RANDOM_SUFFIX)
    if random:
        _reinitialise(loaded.model, seed)
    return dataclasses.replace(loaded, name=name, extra={**loaded.extra, "pretrained": not random})


def tap_layers(loaded, n_blocks: int = 3) -> list[str]:
    """``n_blocks`` blocks evenly spread over depth (the last included) and the pooled head."""
    blocks = [layer for layer in loaded.layers if layer.startswith("_blocks.")]
    picks = sorted({round(len(blocks) * (j + 1) / n_blocks) - 1 for j in range(n_blocks)})
    return [blocks[i] for i in picks] + ["_avg_pooling"]


def _to_model_input(image: torch.Tensor) -> torch.Tensor:
    """``[3, S, S]`` in ``[0, 1]`` -> ``[-1, 1]`` (mean = std = 0.5, how EfficientNet-Lite was trained)."""
    return (image - 0.5) / 0.5


def embed(loaded, images: torch.Tensor, layers: Sequence[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Spatially mean-pooled features ``{layer: [n, d]}`` of ``images [n, 3, S, S]`` in ``[0, 1]``
    (rows not normalised: the metrics' ``normalize=True`` does that)."""
    from prh_lightning.extraction import vision_features

    model = dataclasses.replace(loaded, preprocess=_to_model_input, layers=list(layers))
    while len(images) % batch_size == 1:  # batch statistics (random controls) need 2+ images per batch
        batch_size += 1
    feats = vision_features(model, list(images), pool="avg", batch_size=batch_size)
    return {layer: feats[layer].float() for layer in layers}
