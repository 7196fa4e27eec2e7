"""Grayscale ResNet-18 for Fashion-MNIST, as a LightningModule.

torchvision's ResNet-18 with one input channel: ImageNet weights when they can be had
(the torch hub cache, else a download), ``conv1`` summed over the RGB channels so a gray
image gives the same response as the same image copied to three channels; or random
weights trained on Fashion-MNIST; or weights from a file.

The top-level module names are torchvision's (``conv1``, ``layer1`` ... ``layer4``,
``avgpool``, ``fc``), so taps use the seed's layer names.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prh_lightning._optional import require
from prh_lightning.models.fashion_cnn import FASHION_MEAN, FASHION_STD, ClassifierModule
from prh_lightning.models.pretrained import PretrainedUnavailable

# ImageNet RGB statistics averaged over the channels, for gray input.
IMAGENET_GRAY_MEAN = 0.449
IMAGENET_GRAY_STD = 0.226
RESNET_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4", "avgpool")
_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")


def imagenet_state_dict(allow_download: bool = True) -> dict[str, torch.Tensor]:
    """ResNet-18 ImageNet-1k weights (RGB) from the torch hub cache, else downloaded.

    Raises :class:`PretrainedUnavailable` with instructions when neither works.
    """
    weights = require("torchvision.models", purpose="imagenet_state_dict").ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    if not allow_download:
        raise PretrainedUnavailable(f"ResNet-18 ImageNet weights are not in the torch hub cache ({cached})")
    try:
        return weights.get_state_dict(progress=True)
    except OSError as err:  # URLError / HTTPError: offline or unreachable
        raise PretrainedUnavailable(
            f"could not get the ResNet-18 ImageNet weights ({type(err).__name__}: {err}). Online, they download from "
            f"{weights.url}; offline, copy that file to {cached}, pass --resnet-weights PATH, "
            "or use --resnet-weights scratch to train ResNet-18 on Fashion-MNIST instead"
        ) from err


def load_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ResNet-18 state dict from a ``.pth``/``.pt``/``.ckpt``/``.safetensors`` file.

    Lightning checkpoints (``state_dict`` key) and ``model.``/``net.`` prefixes are accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ResNet-18 weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:  # not a (safe) torch file
            raise ValueError(f"{path} is not a readable PyTorch weights file: {err}") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    for prefix in ("model.", "net.", "module."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def to_grayscale(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum ``conv1.weight`` ``[64, 3, 7, 7]`` over its input channels -> ``[64, 1, 7, 7]``.

    >>> to_grayscale({"conv1.weight": torch.ones(64, 3, 7, 7)})["conv1.weight"][0, 0, 0, 0]
    tensor(3.)
    """
    state = dict(state)
    w = state.get("conv1.weight")
    if w is not None and w.shape[1] == 3:
        state["conv1.weight"] = w.sum(dim=1, keepdim=True)
    return state


class GrayResNet18(ClassifierModule):
    """ResNet-18 on ``[b, 1, H, W]`` images in ``[0, 1]`` -> logits ``[b, num_classes]``.

    Args:
        num_classes: classes of the new ``fc`` head.
        input_size: resize inputs to ``input_size x input_size`` first (None: keep size).
        pretrained: True for ImageNet-style normalisation of the input (use with
            :meth:`load_backbone`); False normalises with Fashion-MNIST statistics.
        freeze_backbone: train only ``fc`` (a linear probe); the backbone, its
            BatchNorm statistics included, stays as loaded.
        lr: Adam learning rate.

    Tapped layers: ``conv1 [b, 64, H/2, W/2]``, ``layer1`` ... ``layer4`` (64..512 channels),
    ``avgpool [b, 512, 1, 1]``.

    >>> GrayResNet18(num_classes=10)(torch.rand(2, 1, 32, 32)).shape
    torch.Size([2, 10])
    """

    TAP_LAYERS = RESNET_LAYERS

    def __init__(
        self,
        num_classes: int = 10,
        input_size: int | None = None,
        pretrained: bool = False,
        freeze_backbone: bool = False,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(lr=lr)
        self.save_hyperparameters()
        net = require("torchvision.models", purpose="GrayResNet18").resnet18(weights=None)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        for name in _PARTS:
            setattr(self, name, getattr(net, name))
        self.fc = nn.Linear(net.fc.in_features, num_classes)
        mean, std = (IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD) if pretrained else (FASHION_MEAN, FASHION_STD)
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)
        self.input_size = input_size
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for p in self.backbone_parameters():
                p.requires_grad_(False)

    def backbone_parameters(self):
        return (p for name in _PARTS for p in getattr(self, name).parameters())

    def load_backbone(self, state: dict[str, torch.Tensor]) -> bool:
        """Load a (RGB or gray) ResNet-18 state dict; ``fc`` too when its shape matches.

        Returns True when the head was loaded as well (the model is then fully trained).
        Raises ValueError naming the mismatching keys when it is not a ResNet-18.
        """
        state = to_grayscale(state)
        own = self.state_dict()
        head_fits = all(k in state and state[k].shape == own[k].shape for k in ("fc.weight", "fc.bias"))
        if not head_fits:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if head_fits or not k.startswith("fc.")]
        bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if missing or result.unexpected_keys or bad_shape:
            raise ValueError(
                "the weights are not a ResNet-18 state dict: "
                f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}, wrong shape {bad_shape[:5]}"
            )
        return head_fits

    def _keep_backbone_frozen(self) -> None:
        """A frozen backbone stays in eval mode (fixed BatchNorm statistics) while ``fc`` trains."""
        if self.freeze_backbone and self.training:
            for name in _PARTS:
                getattr(self, name).eval()

    def train(self, mode: bool = True) -> GrayResNet18:
        super().train(mode)
        self._keep_backbone_frozen()
        return self

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Lightning may set each module's training flag directly (e.g. after validation).
        self._keep_backbone_frozen()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, 1, H, W]`` in ``[0, 1]`` -> logits ``[b, num_classes]``."""
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
