"""Family defaults (timm ViT, GPT-2, torchvision, LightningModule), checked against hand-made
forward passes and Hugging Face's own hidden states."""

from __future__ import annotations

import os

import lightning as L
import pytest
import timm
import torch
import torchvision
import transformers
from torch import nn

from prh_lightning import LayerTaps, record_representations
from prh_lightning.families import default_layers, default_reduce, model_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def masked_mean_loop(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over the positions where mask is 1 (left or right padding)."""
    return torch.stack([hidden[i][mask[i].bool()].mean(0) for i in range(hidden.shape[0])])


def test_timm_vit_blocks_with_cls_token_match_a_hand_forward():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3).eval()
    assert model_family(vit) == "timm"
    assert default_layers(vit) == ["blocks.0", "blocks.1", "blocks.2"] and default_reduce(vit) == "cls"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), LayerTaps(vit, layers="auto", reduce="auto") as taps:
        vit(x)
    with torch.no_grad():
        # the reference: timm's documented building blocks, called one by one
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        expected = []
        for block in vit.blocks:
            h = block(h)
            expected.append(h[:, 0])
    feats = taps.features()
    assert len(feats) == 3
    for value, ref in zip(feats.values(), expected):
        torch.testing.assert_close(value, ref)


def test_gpt2_from_config_matches_hidden_states_with_left_padding():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    gpt = transformers.GPT2Model(config).eval()
    assert default_layers(gpt) == ["h.0:input", "h.0", "h.1", "ln_f"]
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    with torch.no_grad(), LayerTaps(gpt, layers="auto") as taps:
        hidden = gpt(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    feats = taps.features()
    # HF's tuple: embeddings, block 0, then ln_f(block 1); the raw last block is an extra tap
    for name, index in (("h.0:input", 0), ("h.0", 1), ("ln_f", 2)):
        torch.testing.assert_close(feats[name], masked_mean_loop(hidden[index], mask), msg=name)
    with torch.no_grad(), LayerTaps(gpt, layers="ln_f", reduce="last") as taps:
        gpt(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(taps.features()["ln_f"], hidden[2][:, -1])


def test_torchvision_defaults():
    resnet = torchvision.models.resnet18(num_classes=5).eval()
    assert model_family(resnet) == "torchvision"
    assert default_layers(resnet) == ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=5)
    layers = default_layers(mobilenet)
    assert layers[0] == "features.0" and layers[-1] == "avgpool" and len(layers) == len(mobilenet.features) + 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), LayerTaps(resnet, "auto", "auto") as taps:
        logits = resnet(x)
    feats = taps.features()
    assert list(feats) == default_layers(resnet)
    torch.testing.assert_close(resnet.fc(feats["avgpool"]), logits)


def test_efficientnet_lite_blocks_and_pooled_head():
    from efficientnet_lite_pytorch import EfficientNet  # installed by scripts/setup.sh (the "assets" extra)

    torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-lite0").eval()  # random init, same architecture
    layers = default_layers(net)
    assert model_family(net) == "efficientnet"
    assert layers == [f"_blocks.{i}" for i in range(16)] + ["_avg_pooling"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), LayerTaps(net, "auto", "auto") as taps:
        net(x)
    with torch.no_grad():
        head = net.extract_features(x)  # the library's own feature path
    feats = taps.features()
    assert list(feats) == layers
    torch.testing.assert_close(feats["_avg_pooling"], head.mean(dim=(2, 3)))


def test_generic_fallback_is_every_leaf():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    assert model_family(model) == "generic" and default_layers(model) == "*" and default_reduce(model) == "mean"


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=4)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.net(x) * self.scale

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_lightning_module_defaults_and_trainer_predict():
    torch.manual_seed(0)
    model = Classifier()
    assert model_family(model) == "lightning"
    assert default_layers(model) == [f"net.{n}" for n in ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]]
    x = torch.randn(6, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with LayerTaps(model, layers="net.avgpool") as taps:
        logits = torch.cat(trainer.predict(model, loader))
    feats = taps.features()["net.avgpool"]
    assert feats.shape == (6, 512)
    torch.testing.assert_close(model.net.fc(feats) * model.scale, logits)
    reps = record_representations(model, loader, layers="auto", progress=False)
    assert reps.layers[-1] == "net.avgpool" and reps.n == 6
    torch.testing.assert_close(reps["net.avgpool"], feats)


def test_model_without_block_list_gets_a_clear_error():
    from prh_lightning.families import _huggingface_layers

    with pytest.raises(ValueError, match="no list of transformer blocks"):
        _huggingface_layers(nn.Sequential(nn.Linear(2, 2)))
