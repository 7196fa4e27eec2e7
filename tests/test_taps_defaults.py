"""LayerTaps' default selection and run-time reports on real models: eval identities left out,
nn.MultiheadAttention tapped whole, scalar outputs and never-run layers, layers that ran on only
some batches, sequence-first modules, conv1d layouts followed through activations, padding
masks under other names. References are computed by hand (direct module calls)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from prh_lightning import LayerTaps


class AttentionNet(nn.Module):
    """embed -> dropout -> attention (batch first or not) -> identity -> norm -> head."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(3, 8)
        self.drop = nn.Dropout(0.3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.skip = nn.Identity()
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [n, T, 3]
        h = self.drop(self.embed(x))
        if not self.batch_first:
            h = h.transpose(0, 1)
        a = self.attn(h, h, h)[0]
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.head(self.norm(self.skip(a))).mean(1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_default_selection_skips_eval_identities_and_taps_attention_whole(batch_first):
    torch.manual_seed(0)
    model = AttentionNet(batch_first).eval()
    x = torch.randn(4, 5, 3)
    with LayerTaps(model) as taps:
        out = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out, nothing never-ran
        feats = taps.features()
    assert list(feats) == ["embed", "attn", "norm", "head"]  # no drop, no skip, no attn.out_proj
    with torch.no_grad():
        h = model.embed(x)
        if batch_first:
            a = model.attn(h, h, h)[0]
        else:
            ht = h.transpose(0, 1)
            a = model.attn(ht, ht, ht)[0].transpose(0, 1)  # [T, n, d] back to [n, T, d] by hand
        torch.testing.assert_close(feats["attn"], a.mean(1))
        torch.testing.assert_close(feats["norm"], model.norm(a).mean(1))
        torch.testing.assert_close(model(x), out)
    with LayerTaps(model, layers="attn:input") as taps:  # the query, [T, n, d] when not batch first
        model(x)
    torch.testing.assert_close(taps.features()["attn:input"], h.mean(1))


def test_lightning_demo_transformer_attention_matches_a_hand_computation():
    demos = pytest.importorskip("lightning.pytorch.demos")
    torch.manual_seed(0)
    model = demos.Transformer(vocab_size=40, ninp=16, nhead=2, nhid=32, nlayers=1).eval()
    tokens = torch.randint(0, 40, (3, 7))
    with LayerTaps(model) as taps:
        model(tokens, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feats = taps.features()
    assert not any("dropout" in name or name.endswith("out_proj") for name in feats)
    assert "transformer.encoder.layers.0.self_attn" in feats
    with torch.no_grad():
        src = model.pos_encoder(model.embedding(tokens) * math.sqrt(model.ninp))
        attn = model.transformer.encoder.layers[0].self_attn
        expected = attn(src, src, src, need_weights=False)[0].mean(1)
    torch.testing.assert_close(feats["transformer.encoder.layers.0.self_attn"], expected)


def test_named_out_proj_never_runs_and_says_which_module_to_tap():
    model = AttentionNet().eval()
    with LayerTaps(model, layers=["attn.out_proj", "head"]) as taps:
        model(torch.randn(2, 4, 3))
    with pytest.raises(RuntimeError, match=r"'attn\.out_proj' never ran.*tap 'attn'"):
        taps.features()


class AuxLoss(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.pow(2).mean()  # 0-dim


class WithAuxAndBranch(nn.Module):
    """A body, a leaf returning a scalar auxiliary loss, and a branch that runs on big batches only."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.aux = AuxLoss()
        self.extra = nn.Linear(4, 4)
        self.never = nn.Linear(4, 4)
        self.aux_value = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        self.aux_value = self.aux(h)
        if x.shape[0] > 4:
            h = self.extra(h)
        return h


def test_scalar_leaf_never_breaks_the_forward_and_is_left_out_or_reported():
    torch.manual_seed(0)
    model = WithAuxAndBranch()
    x = torch.randn(3, 3)
    with LayerTaps(model) as taps:
        out = model(x)
    torch.testing.assert_close(out, model.body(x))
    torch.testing.assert_close(model.aux_value, model.body(x).pow(2).mean())
    with pytest.warns(UserWarning, match="left out 3 layer") as record:
        feats = taps.features()
    message = str(record[0].message)
    assert "'aux' returned a 0-dim tensor" in message and "'never' never ran" in message and "'extra'" in message
    assert list(feats) == ["body"] and set(taps.skipped) == {"aux", "extra", "never"}
    torch.testing.assert_close(feats["body"], model.body(x).detach())

    with LayerTaps(model, layers=["body", "aux"]) as taps:
        model(x)  # still no error inside the forward
    with pytest.raises(ValueError, match="'aux' returned a 0-dim tensor"):
        taps.features()
    with LayerTaps(model, layers=["body", "never"]) as taps:
        model(x)
    with pytest.raises(RuntimeError, match="'never' never ran"):
        taps.features()


def test_layer_that_ran_on_some_batches_only_is_an_error_with_counts():
    model = WithAuxAndBranch()
    with LayerTaps(model, layers=["body", "extra"]) as taps:
        model(torch.randn(8, 3))
        model(torch.randn(3, 3))
        model(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match=r"'extra': 8 rows from 1 of 3 forward passes; 'body' and others: 13 rows"):
        taps.features()
    with LayerTaps(model, layers=["extra", "body"]) as taps:  # whichever order they are named in
        model(torch.randn(8, 3))
        model(torch.randn(3, 3))
    with pytest.raises(RuntimeError, match=r"'extra': 8 rows from 1 of 2"):
        taps.features()
    # chosen by "*": left out with the counts, the layers that ran on every batch are kept
    x1, x2 = torch.randn(8, 3), torch.randn(3, 3)
    with LayerTaps(model) as taps:
        model(x1)
        model(x2)
    with pytest.warns(UserWarning, match=r"'extra' recorded 8 rows from 1 of 2 forward passes, other layers 11"):
        feats = taps.features()
    assert list(feats) == ["body"]
    torch.testing.assert_close(feats["body"], model.body(torch.cat([x1, x2])).detach())


class ConvBlock1d(nn.Module):
    """conv1d -> relu (tapped); conv1d -> bn -> gelu -> dropout -> relu; a token Linear beside."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv1d(3, 6, 3)
        self.relu_a = nn.ReLU()
        self.conv_b = nn.Conv1d(3, 5, 3)
        self.bn = nn.BatchNorm1d(5)
        self.gelu = nn.GELU()
        self.drop = nn.Dropout(0.2)
        self.relu_b = nn.ReLU(inplace=True)
        self.tokens = nn.Linear(4, 7)

    def forward(self, x: torch.Tensor, seq: torch.Tensor) -> tuple:
        a = self.relu_a(self.conv_a(x))
        b = self.relu_b(self.drop(self.gelu(self.bn(self.conv_b(x)))))
        return a, b, self.tokens(seq)


def test_activation_after_conv1d_is_pooled_over_length_not_channels():
    torch.manual_seed(0)
    model = ConvBlock1d().eval()
    x = torch.randn(4, 3, 10)  # [n, C, L]
    seq = torch.randn(4, 6, 4)  # [n, T, d]
    with LayerTaps(model, layers=["relu_a", "relu_b", "tokens"]) as taps:
        model(x, seq)
    feats = taps.features()
    with torch.no_grad():
        a = torch.relu(model.conv_a(x))  # [4, 6, 8]
        b = torch.relu(model.gelu(model.bn(model.conv_b(x))))  # [4, 5, 8]
        torch.testing.assert_close(feats["relu_a"], a.mean(2))
        torch.testing.assert_close(feats["relu_b"], b.mean(2))
        torch.testing.assert_close(feats["tokens"], model.tokens(seq).mean(1))  # tokens stay tokens
    with LayerTaps(model) as taps:  # "*" too: every conv-side leaf [n, C]
        model(x, seq)
    dims = {name: f.shape[1] for name, f in taps.features().items()}
    assert dims == {"conv_a": 6, "relu_a": 6, "conv_b": 5, "bn": 5, "gelu": 5, "relu_b": 5, "tokens": 7}


class PaddedEncoder(nn.Module):
    """A wrapper that calls a PyTorch encoder with a padding mask (True = padding) by keyword."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=pad)


class Positional(nn.Module):
    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return hidden * 3


class CallsPositionally(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Positional()

    def forward(self, pair: tuple) -> torch.Tensor:
        x, mask = pair
        return self.inner(x, mask)  # the mask goes in positionally


def masked_mean(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.stack([h[i][keep[i]].mean(0) for i in range(h.shape[0])])


def test_padding_mask_under_another_name_and_passed_positionally():
    torch.manual_seed(0)
    model = PaddedEncoder().eval()
    x = torch.randn(3, 6, 8)
    lengths = torch.tensor([6, 2, 4])
    pad = torch.arange(6)[None] >= lengths[:, None]  # True = padding
    with LayerTaps(model, layers="encoder.layers.0", mask_key="src_key_padding_mask") as taps:
        model(x, pad)
    hand = model.encoder.layers[0](x, src_key_padding_mask=pad).detach()
    torch.testing.assert_close(taps.features()["encoder.layers.0"], masked_mean(hand, ~pad))
    with LayerTaps(model, layers="encoder.layers.0") as taps:  # default key: padding averaged in
        model(x, pad)
    assert not torch.allclose(taps.features()["encoder.layers.0"], masked_mean(hand, ~pad))

    wrapper = CallsPositionally()
    keep = ~pad
    with LayerTaps(wrapper, layers="inner") as taps:
        wrapper((x, keep.long()))
    torch.testing.assert_close(taps.features()["inner"], masked_mean(3 * x, keep))
    with pytest.raises(ValueError, match="mask_key"):
        LayerTaps(wrapper, mask_key="")


def test_losses_and_metrics_held_by_a_lightning_module_are_not_layers():
    import lightning as L
    import torchmetrics

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
            self.loss = nn.CrossEntropyLoss()
            self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3)

        def forward(self, x):
            return self.body(x)

    model = Classifier()
    x = torch.randn(5, 4)
    with LayerTaps(model) as taps:
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing reported as never-ran
        feats = taps.features()
    assert list(feats) == ["body.0", "body.1", "body.2"]
    torch.testing.assert_close(feats["body.2"], model(x).detach())
