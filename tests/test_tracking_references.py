"""What ``Reference(layers=...)`` gives, checked against features computed by hand: ``"output"``
(the default) is the model's output, ``"*"`` every leaf as in ``LayerTaps``, ``None`` is
deprecated (warns, still the output), and a bare module is every leaf."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from prh_lightning.taps import LayerTaps
from prh_lightning.tracking.probe import Probe
from prh_lightning.tracking.references import Reference, check_references, reference_features


class Net(nn.Module):
    """fc1 -> tanh -> ``output`` (a sub-module that happens to be called output) -> head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 5)
        self.act = nn.Tanh()
        self.output = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.output(self.act(self.fc1(x))))


def by_hand(net: Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        h1 = net.fc1(x)
        a = torch.tanh(h1)
        o = net.output(a)
        return {"fc1": h1, "act": a, "output": o, "head": net.head(o)}


X = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
Y = torch.arange(12) % 3
PROBE = Probe((X, Y), labels=Y)


def test_default_and_output_are_the_models_output_even_with_a_submodule_named_output():
    net = Net()
    expected = by_hand(net, X)["head"]
    for ref in (Reference(net), Reference(net, layers="output")):
        assert ref.layers == "output" and ref.output_only
        feats = reference_features(ref, PROBE)
        assert list(feats) == ["output"]
        torch.testing.assert_close(feats["output"], expected)


def test_star_is_every_leaf_as_in_layer_taps_and_a_list_names_a_submodule():
    net = Net()
    hand = by_hand(net, X)
    feats = reference_features(Reference(net, layers="*"), PROBE)
    with LayerTaps(net, layers=None) as taps:  # LayerTaps' None: every leaf
        net(X)
    assert list(feats) == list(taps.features()) == ["fc1", "act", "output", "head"]
    for name, value in feats.items():
        torch.testing.assert_close(value, hand[name])
    sub = reference_features(Reference(net, layers=["output"]), PROBE)  # the sub-module, not the model's output
    assert list(sub) == ["output"]
    torch.testing.assert_close(sub["output"], hand["output"])


def test_layers_none_is_deprecated_and_still_means_the_output():
    net = Net()
    with pytest.warns(FutureWarning, match=r"layers='output'.*layers='\*'") as caught:
        ref = Reference(net, layers=None)
    assert caught[0].filename == __file__  # points at the caller's line
    assert ref.layers == "output"
    torch.testing.assert_close(reference_features(ref, PROBE)["output"], by_hand(net, X)["head"])
    with pytest.warns(FutureWarning):  # the YAML form {model: ..., layers: null} too
        check_references({"r": {"model": net, "layers": None}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for the new spellings
        Reference(net)
        check_references({"a": {"model": net, "layers": "output"}, "b": {"model": net, "layers": "*"}})


def test_a_bare_module_is_every_leaf_and_a_sentence_encoder_its_embedding():
    class Encoder(nn.Module):  # anything with encode() counts as a sentence-transformer
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(x)

        def encode(self, texts, **kwargs):
            return torch.tensor([[float(len(t)), 1.0] for t in texts])

    net, enc = Net(), Encoder()
    specs = check_references({"net": net, "enc": enc})
    assert specs["net"].layers == "*" and specs["enc"].layers == "output"
    assert list(reference_features(specs["net"], PROBE)) == ["fc1", "act", "output", "head"]
    texts = Reference(enc, inputs=lambda x, y: ["ab" * (int(i) + 1) for i in y])
    torch.testing.assert_close(
        reference_features(texts, PROBE)["output"],
        torch.tensor([[2.0 * (i % 3 + 1), 1.0] for i in range(12)]),
    )
