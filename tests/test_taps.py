"""LayerTaps on small models: selection, outputs, reductions, repeats, hooks, budgets, errors.

References are computed by hand in each test (direct module calls, per-sample loops)."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

from prh_lightning import LayerTaps
from prh_lightning.taps import TapBudgetExceeded

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def hook_count(model: nn.Module) -> int:
    return sum(len(getattr(m, attr)) for m in model.modules() for attr in HOOK_DICTS)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


class ReversedOrder(nn.Module):
    """Registers `second` before `first` but runs `first` first."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(4, 3)
        self.first = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class TwiceLinear(nn.Module):
    """Applies one Linear twice: y = L(L(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x))


# -- reference features -------------------------------------------------------------
def test_resnet18_avgpool_equals_penultimate_features_by_hand(resnet, images):
    with LayerTaps(resnet, layers=["avgpool", "layer4"]) as taps:
        resnet(images)
    feats = taps.features()
    m = resnet
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(images))))
        h = m.layer4(m.layer3(m.layer2(m.layer1(h))))
        penultimate = torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)
    assert list(feats) == ["layer4", "avgpool"]  # execution order, not the order asked for
    assert feats["avgpool"].shape == (3, 512)
    torch.testing.assert_close(feats["avgpool"], penultimate)
    torch.testing.assert_close(feats["layer4"], h.mean(dim=(2, 3)))


def test_default_selection_is_every_leaf_in_execution_order(images):
    model = ReversedOrder()
    x = torch.randn(2, 5)
    with LayerTaps(model) as taps:
        model(x)
    feats = taps.features()
    assert list(feats) == ["first", "second"]
    torch.testing.assert_close(feats["first"], model.first(x).detach())


def test_resnet_default_taps_every_leaf_module(resnet, images):
    with LayerTaps(resnet) as taps:
        resnet(images)
    leaves = {n for n, m in resnet.named_modules() if n and not list(m.children())}
    assert set(taps.features()) == leaves
    assert all(v.shape[0] == 3 and v.ndim == 2 for v in taps.features().values())


def test_glob_type_and_predicate_selection(resnet, images):
    names = [n for n, _ in resnet.named_modules()]
    expected_glob = {n for n in names if re.fullmatch(r"layer.*\.relu", n)}
    with LayerTaps(resnet, layers="layer*.relu") as taps:
        resnet(images)
    assert set(taps.features()) == expected_glob and len(expected_glob) == 8

    convs = {n for n, m in resnet.named_modules() if type(m) is nn.Conv2d}
    with LayerTaps(resnet, layers=nn.Conv2d) as taps:
        resnet(images)
    assert set(taps.features()) == convs

    with LayerTaps(resnet, layers=[lambda name, mod: name.endswith("downsample"), "fc"]) as taps:
        resnet(images)
    assert list(taps.features()) == ["layer2.0.downsample", "layer3.0.downsample", "layer4.0.downsample", "fc"]


def test_available_lists_names_and_shapes_in_execution_order(resnet, images):
    resnet.train()
    running_mean = resnet.bn1.running_mean.clone()
    listed = dict(LayerTaps.available(resnet, images))
    assert resnet.training and all(m.training for m in resnet.modules())  # flags restored
    torch.testing.assert_close(resnet.bn1.running_mean, running_mean)  # ran in eval mode
    resnet.eval()
    assert listed["conv1"] == (3, 64, 16, 16)
    assert listed["layer4"] == (3, 512, 1, 1)
    assert listed["fc"] == (3, 10)
    assert list(listed)[:2] == ["conv1", "bn1"]
    assert hook_count(resnet) == 0


# -- outputs ------------------------------------------------------------------------
class DictOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict:
        return {"a": x + 1, "b": x * 2}


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_outputs_from_dict_key_and_tuple():
    x = torch.randn(2, 3)
    model = Wrapper(DictOut())
    with LayerTaps(model, layers="inner") as taps:
        model(x)
    torch.testing.assert_close(taps.features()["inner"], x + 1)  # default: first tensor
    with LayerTaps(model, layers="inner", output="b") as taps:
        model(x)
    torch.testing.assert_close(taps.features()["inner"], x * 2)

    lstm = Wrapper(nn.LSTM(3, 5, batch_first=True))
    seq = torch.randn(2, 4, 3)
    with LayerTaps(lstm, layers="inner") as taps:
        lstm(seq)
    out, _ = lstm.inner(seq)
    torch.testing.assert_close(taps.features()["inner"], out.mean(1).detach())


def test_huggingface_model_output_defaults_to_last_hidden_state():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class Encoder(nn.Module):
        def forward(self, x):
            return BaseModelOutputWithPooling(last_hidden_state=x * 3, pooler_output=x[:, 0])

    model = Wrapper(Encoder())
    x = torch.randn(2, 4, 6)
    with LayerTaps(model, layers="inner") as taps:
        model(x)
    torch.testing.assert_close(taps.features()["inner"], (x * 3).mean(1))
    with LayerTaps(model, layers="inner", output="pooler_output") as taps:
        model(x)
    torch.testing.assert_close(taps.features()["inner"], x[:, 0])


# -- reductions ---------------------------------------------------------------------
class Tokens(nn.Module):
    def forward(self, x, attention_mask=None):
        return x


def test_token_reductions_honour_the_attention_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    lengths = [5, 2, 3]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    model = Wrapper(Tokens())
    model.forward = lambda x, attention_mask=None: model.inner(x)  # noqa: E731
    refs = {
        "mean": torch.stack([x[i, :n].mean(0) for i, n in enumerate(lengths)]),
        "max": torch.stack([x[i, :n].max(0).values for i, n in enumerate(lengths)]),
        "last": torch.stack([x[i, n - 1] for i, n in enumerate(lengths)]),
        "cls": x[:, 0],
        "first": x[:, 0],
        "flatten": x.reshape(3, 20),
    }
    for mode, ref in refs.items():
        with LayerTaps(model, layers="inner", reduce=mode) as taps:
            model(x, attention_mask=mask)  # captured from the keyword
        torch.testing.assert_close(taps.features()["inner"], ref, msg=mode)
    # explicit mask, and no mask at all
    with LayerTaps(model, layers="inner", reduce="mean") as taps:
        taps.set_attention_mask(mask)
        model(x)
    torch.testing.assert_close(taps.features()["inner"], refs["mean"])
    with LayerTaps(model, layers="inner", reduce="mean") as taps:
        model(x, mask)  # positional attention_mask, found through forward's signature
    torch.testing.assert_close(taps.features()["inner"], refs["mean"])
    with LayerTaps(model, layers="inner", reduce="mean") as taps:
        model(x)
    torch.testing.assert_close(taps.features()["inner"], x.mean(1))


def test_conv_reductions_and_conv1d_is_channels_first():
    torch.manual_seed(0)
    conv1d = Wrapper(nn.Conv1d(3, 6, 3))
    x = torch.randn(2, 3, 10)
    with LayerTaps(conv1d, layers="inner") as taps:
        conv1d(x)
    out = conv1d.inner(x).detach()  # [2, 6, 8]
    torch.testing.assert_close(taps.features()["inner"], out.mean(2))

    conv2d = Wrapper(nn.Conv2d(3, 4, 3))
    img = torch.randn(2, 3, 6, 6)
    out = conv2d.inner(img).detach()  # [2, 4, 4, 4]
    refs = {
        "max": out.amax(dim=(2, 3)),
        "first": out[:, :, 0, 0],
        "flatten": out.reshape(2, -1),
        None: out,
        (lambda t: t[:, :2].sum(dim=(1, 2, 3)).unsqueeze(1)): out[:, :2].sum(dim=(1, 2, 3)).unsqueeze(1),
    }
    for mode, ref in refs.items():
        with LayerTaps(conv2d, layers="inner", reduce=mode) as taps:
            conv2d(img)
        torch.testing.assert_close(taps.features()["inner"], ref)


def test_dtype_and_device_defaults_and_detach():
    model = Wrapper(nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with LayerTaps(model, layers="inner") as taps:
        model(x).sum().backward()  # recording does not break autograd
    feat = taps.features()["inner"]
    assert feat.dtype == torch.float32 and feat.device.type == "cpu" and not feat.requires_grad
    with LayerTaps(model, layers="inner", dtype=None, device="model") as taps:
        model(x)
    assert taps.features()["inner"].dtype == torch.float64


# -- safety ---------------------------------------------------------------------------
def test_inplace_relu_after_tapped_layer_does_not_change_the_record():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True))
    x = torch.randn(16, 4)
    expected = model[0](x).detach().clone()
    assert (expected < 0).any()
    for reduce in ("mean", None, "flatten"):
        with LayerTaps(model, layers=["0", "1"], reduce=reduce) as taps:
            model(x)
        torch.testing.assert_close(taps.features()["0"], expected)
        torch.testing.assert_close(taps.features()["1"], expected.clamp_min(0))


def test_module_called_twice_policies():
    torch.manual_seed(0)
    model = TwiceLinear()
    x = torch.randn(3, 4)
    once = model.lin(x).detach()
    twice = model.lin(once).detach()
    expected = {"last": {"lin": twice}, "first": {"lin": once}, "all": {"lin#0": once, "lin#1": twice}}
    for policy, ref in expected.items():
        with LayerTaps(model, layers="lin", repeated=policy) as taps:
            model(x)
            model(x)
        feats = taps.features()
        assert list(feats) == list(ref)
        for name, value in ref.items():
            torch.testing.assert_close(feats[name], torch.cat([value, value]))
    with LayerTaps(model, layers="lin", repeated="error") as taps, pytest.raises(RuntimeError, match="ran 2 times"):
        model(x)
    # called outside a root forward: each call is its own record
    with LayerTaps(model, layers="lin") as taps:
        model.lin(x)
    torch.testing.assert_close(taps.features()["lin"], once)


def test_basicblock_relu_last_call_is_the_block_output(resnet, images):
    with LayerTaps(resnet, layers="layer1.0.relu") as taps:
        resnet(images)
    m = resnet
    with torch.no_grad():
        stem = m.maxpool(m.relu(m.bn1(m.conv1(images))))
        block_out = m.layer1[0](stem)
    torch.testing.assert_close(taps.features()["layer1.0.relu"], block_out.mean(dim=(2, 3)))


def test_hooks_removed_after_exit_and_after_exception(resnet, images):
    assert hook_count(resnet) == 0
    with LayerTaps(resnet, layers=["layer1", "avgpool", "layer2.0:input"]) as taps:
        assert hook_count(resnet) > 0
        resnet(images)
    assert hook_count(resnet) == 0
    assert taps.features()["avgpool"].shape == (3, 512)  # kept after exit
    with pytest.raises(ZeroDivisionError):
        with LayerTaps(resnet) as taps:
            resnet(images)
            1 / 0
    assert hook_count(resnet) == 0


def test_paused_and_enabled_do_not_touch_hooks(images):
    model = Wrapper(nn.Linear(3, 2))
    x = torch.randn(2, 3)
    with LayerTaps(model, layers="inner") as taps:
        hooks = hook_count(model)
        model(x)
        with taps.paused():
            model(x)
            assert hook_count(model) == hooks
        taps.enabled = False
        model(x)
        taps.enabled = True
        model(x)
        assert taps.n == 4
        taps.clear()
        assert taps.n == 0
        model(x)
    assert taps.features()["inner"].shape == (2, 2)


def test_input_tap_records_what_goes_in(resnet, images):
    with LayerTaps(resnet, layers=["layer2.0:input", "layer1"]) as taps:
        resnet(images)
    feats = taps.features()
    torch.testing.assert_close(feats["layer2.0:input"], feats["layer1"])


# -- budgets and bad input ------------------------------------------------------------
def test_max_samples_raises_before_storing():
    model = Wrapper(nn.Linear(3, 2))
    with LayerTaps(model, layers="inner", max_samples=6) as taps:
        model(torch.randn(4, 3))
        with pytest.raises(TapBudgetExceeded, match="max_samples=6"):
            model(torch.randn(4, 3))
        assert taps.features()["inner"].shape == (4, 2)  # the refused batch is not half-stored


def test_max_bytes_raises_with_advice():
    model = nn.Sequential(nn.Linear(3, 100), nn.ReLU())
    with LayerTaps(model, reduce=None, max_bytes=4 * 100 * 10) as taps:  # 2 layers x 5 rows fit
        model(torch.randn(5, 3))
        with pytest.raises(TapBudgetExceeded, match="max_bytes"):
            model(torch.randn(1, 3))
    assert isinstance(TapBudgetExceeded("x"), RuntimeError)
    assert taps.nbytes == 2 * 5 * 100 * 4


def test_unknown_layer_lists_close_matches(resnet):
    with pytest.raises(KeyError, match=r"layer1\.0\.relu"):
        LayerTaps(resnet, layers="layer1.0.rleu")


@pytest.mark.parametrize(
    "layers, error, pattern",
    [
        ([], ValueError, "empty layer selection"),
        ("nothing*", ValueError, "matches no module"),
        (nn.LSTM, ValueError, "no module of type LSTM"),
        (lambda n, m: False, ValueError, "selected no module"),
        (3.5, TypeError, "cannot select layers"),
    ],
)
def test_bad_selections(resnet, layers, error, pattern):
    with pytest.raises(error, match=pattern):
        LayerTaps(resnet, layers=layers)


def test_bad_arguments():
    model = Wrapper(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="unknown reduce"):
        LayerTaps(model, reduce="median")
    with pytest.raises(ValueError, match="repeated"):
        LayerTaps(model, repeated="sometimes")
    with pytest.raises(ValueError, match="max_samples"):
        LayerTaps(model, max_samples=0)
    with pytest.raises(TypeError, match="nn.Module"):
        LayerTaps(lambda x: x)
    with LayerTaps(model) as taps, pytest.raises(RuntimeError, match="no features recorded"):
        taps.features()


class NoTensor(nn.Module):
    def forward(self, x):
        return {"count": int(x.shape[0])}


class UsesNoTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.counter = NoTensor()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        self.counter(x)
        return self.lin(x)


def test_layer_without_tensor_output_is_an_error_when_named_and_skipped_otherwise():
    model = UsesNoTensor()
    x = torch.randn(2, 3)
    with LayerTaps(model, layers="counter") as taps:
        out = model(x)  # the model's forward is never broken by a tap
    torch.testing.assert_close(out, model.lin(x))
    with pytest.raises(TypeError, match="'counter' returned dict .* holds no tensor"):
        taps.features()
    with LayerTaps(model) as taps:
        model(x)
    with pytest.warns(UserWarning, match="left out 1 layer.*'counter' returned dict"):
        feats = taps.features()
    assert list(feats) == ["lin"] and set(taps.skipped) == {"counter"}


def test_raw_outputs_of_changing_shape_give_a_clear_error():
    model = Wrapper(Tokens())
    with LayerTaps(model, layers="inner", reduce=None) as taps:
        model(torch.randn(2, 3, 4))
        model(torch.randn(2, 5, 4))
        with pytest.raises(RuntimeError, match="different shapes"):
            taps.features()


def test_representations_wraps_features():
    model = Wrapper(nn.Linear(3, 2))
    with LayerTaps(model, layers="inner") as taps:
        model(torch.randn(4, 3))
    reps = taps.representations(labels=torch.arange(4), model_name="toy")
    assert reps.n == 4 and reps.layers == ["inner"] and reps.metadata["model_name"] == "toy"
    assert reps.labels.tolist() == [0, 1, 2, 3]


class MaskedEncoder(nn.Module):
    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return hidden * 2


class TupleWrapper(nn.Module):
    """Takes (x, mask) as one tuple: the mask only appears when the inner encoder is called."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = MaskedEncoder()

    def forward(self, pair):
        x, mask = pair
        return self.encoder(x, attention_mask=mask)


def test_attention_mask_is_captured_from_an_inner_model():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    model = TupleWrapper()
    with LayerTaps(model, layers="encoder") as taps:
        model((x, mask))
    expected = torch.stack([(2 * x[0, :2]).mean(0), (2 * x[1]).mean(0)])
    torch.testing.assert_close(taps.features()["encoder"], expected)
    assert hook_count(model) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_features_go_to_cpu_by_default_or_stay_with_device_model():
    from prh_lightning import record_representations

    torch.manual_seed(0)
    model = TupleWrapper().cuda()
    x = torch.randn(2, 4, 3, device="cuda")
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], device="cuda")
    expected = torch.stack([(2 * x[0, :2]).mean(0), (2 * x[1]).mean(0)])
    with LayerTaps(model, layers="encoder") as on_cpu, LayerTaps(model, layers="encoder", device="model") as on_gpu:
        model((x, mask))
    assert on_cpu.features()["encoder"].device.type == "cpu"
    assert on_gpu.features()["encoder"].device.type == "cuda"
    torch.testing.assert_close(on_cpu.features()["encoder"], expected.cpu())
    torch.testing.assert_close(on_gpu.features()["encoder"], expected)

    net = nn.Sequential(nn.Linear(3, 5))
    batch = torch.randn(4, 3)
    reps = record_representations(net, [(batch, torch.arange(4))], layers="0", device="cuda", progress=False)
    assert next(net.parameters()).is_cuda and reps["0"].device.type == "cpu"
    torch.testing.assert_close(reps["0"], net.cpu()(batch).detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_mean_of_large_maps_matches_float64_mean(dtype, channels_last):
    # maps with >= 64 positions take the matrix-vector path (contiguous CPU), the others mean();
    # the in-place ReLU after the tapped conv must not change the conv's record
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(inplace=True)).to(dtype)
    img = torch.randn(4, 3, 12, 10, dtype=dtype) + 0.5
    if channels_last:
        model, img = model.to(memory_format=torch.channels_last), img.to(memory_format=torch.channels_last)
    out = model[0](img).detach().double()
    with LayerTaps(model, layers=["0", "1"], reduce="mean", dtype=None) as taps:
        model(img)
    feats = taps.features()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for name, ref in (("0", out.mean(dim=(2, 3))), ("1", out.clamp_min(0).mean(dim=(2, 3)))):
        assert feats[name].dtype == dtype and feats[name].shape == (4, 5)
        torch.testing.assert_close(feats[name].double(), ref, rtol=tol, atol=tol)


class _ConvBn(nn.Module):
    def __init__(self, bump: bool = False):
        super().__init__()
        self.conv, self.bn, self.relu, self.bump = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), bump

    def forward(self, x):
        y = self.conv(x)
        if self.bump:
            y.add_(1.0)  # in place between the tapped conv and the BN: its recorded mean is stale
        return self.relu(self.bn(y))


@pytest.mark.parametrize("bump", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_batch_norm_mean_matches_float64_mean_of_its_output(monkeypatch, bump, training):
    # an eval BN fed the conv output just recorded gets its mean from the conv's (affine per
    # channel); in place edits in between, training mode and an untapped conv read the map
    torch.manual_seed(2)
    model = _ConvBn(bump)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-1, 1)
    model.train(training)
    img = torch.randn(4, 3, 12, 12)
    outputs = {}
    hooks = [getattr(model, k).register_forward_hook(lambda m, a, o, k=k: outputs.__setitem__(k, o.detach().double().clone()))
             for k in ("conv", "bn")]
    with torch.no_grad():
        model(img)
    for h in hooks:
        h.remove()
    import prh_lightning.taps.layer_taps as layer_taps

    shortcuts = []
    affine = layer_taps._batch_norm_mean
    monkeypatch.setattr(layer_taps, "_batch_norm_mean", lambda m, mean: (shortcuts.append(1), affine(m, mean))[1])
    for layers in (["conv", "bn"], ["bn"]):
        shortcuts.clear()
        with LayerTaps(model, layers=layers, reduce="mean") as taps, torch.no_grad():
            model(img)
        torch.testing.assert_close(taps.features()["bn"].double(), outputs["bn"].mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
        assert len(shortcuts) == (not training and not bump and "conv" in layers)
    with LayerTaps(model, layers=["conv", "bn"], reduce="mean") as taps, torch.inference_mode():
        model(img)  # inference tensors have no version counter: never remembered, always read
    torch.testing.assert_close(taps.features()["bn"].double(), outputs["bn"].mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
