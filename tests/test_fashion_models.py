"""FashionCNN and the grayscale ResNet-18: layer names and shapes, the RGB -> gray weight
conversion against torchvision's own ResNet-18, linear probing, weight files."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import resnet18

from prh_lightning import LayerTaps
from prh_lightning.data.fashion_mnist import FashionMNISTDataModule
from prh_lightning.models.fashion_cnn import FashionCNN
from prh_lightning.models.pretrained import PretrainedUnavailable
from prh_lightning.models.resnet import (
    IMAGENET_GRAY_MEAN,
    IMAGENET_GRAY_STD,
    GrayResNet18,
    imagenet_state_dict,
    load_state_file,
)

pytestmark = pytest.mark.slow


def _trainer(steps: int) -> Trainer:
    return Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


@pytest.fixture(scope="module")
def fashion():
    dm = FashionMNISTDataModule(train_size=200, val_size=0, test_size=100, batch_size=32, seed=0)
    dm.setup()
    return dm


def test_fashion_cnn_taps_use_the_seed_layer_names():
    model = FashionCNN()
    x = torch.rand(5, 1, 28, 28)
    with LayerTaps(model, layers=list(FashionCNN.TAP_LAYERS), reduce="mean") as taps:
        logits = model(x)
    feats = taps.features()
    assert list(feats) == ["conv1", "conv2", "avgpool"]
    assert [tuple(v.shape) for v in feats.values()] == [(5, 32), (5, 64), (5, 64)]
    assert logits.shape == (5, 10)


def test_gray_resnet_equals_torchvision_rgb_resnet_on_a_replicated_image():
    torch.manual_seed(0)
    rgb = resnet18(weights=None).eval()  # random weights stand in for ImageNet's (not downloadable here)
    gray = GrayResNet18(pretrained=True).eval()
    head_loaded = gray.load_backbone(rgb.state_dict())
    assert head_loaded is False  # the 1000-class head does not fit a 10-class one
    x = torch.rand(3, 1, 32, 32)
    normalised = ((x - IMAGENET_GRAY_MEAN) / IMAGENET_GRAY_STD).repeat(1, 3, 1, 1)
    rgb.fc = torch.nn.Identity()
    with LayerTaps(gray, layers=["avgpool"], reduce="flatten") as taps:
        gray(x)
    with torch.no_grad():
        expected = rgb(normalised)
    torch.testing.assert_close(taps.features()["avgpool"], expected, rtol=1e-4, atol=1e-5)


def test_gray_resnet_tap_shapes_and_resize():
    model = GrayResNet18(input_size=64).eval()
    with LayerTaps(model, layers=list(GrayResNet18.TAP_LAYERS), reduce=None) as taps:
        model(torch.rand(2, 1, 28, 28))
    shapes = {k: tuple(v.shape) for k, v in taps.features().items()}
    assert shapes == {"conv1": (2, 64, 32, 32), "layer1": (2, 64, 16, 16), "layer2": (2, 128, 8, 8),
                      "layer3": (2, 256, 4, 4), "layer4": (2, 512, 2, 2), "avgpool": (2, 512, 1, 1)}


def test_frozen_backbone_trains_only_the_head(fashion):
    torch.manual_seed(0)
    model = GrayResNet18(pretrained=True, freeze_backbone=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = fashion.train_set.tensors
    _trainer(steps=3).fit(model, DataLoader(TensorDataset(x[:96], y[:96]), batch_size=32))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # BatchNorm running statistics included in "unchanged"


def test_weight_files_lightning_checkpoint_and_bad_file(tmp_path):
    source = GrayResNet18()
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, ckpt)
    target = GrayResNet18()
    assert target.load_backbone(load_state_file(ckpt)) is True  # 10-class head loaded too
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        load_state_file(bad)
    with pytest.raises(ValueError, match="not a ResNet-18 state dict"):
        GrayResNet18().load_backbone({"conv1.weight": torch.zeros(64, 1, 7, 7), "other.weight": torch.zeros(1)})


def test_imagenet_weights_absent_from_cache_give_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PretrainedUnavailable, match="not in the torch hub cache"):
        imagenet_state_dict(allow_download=False)
