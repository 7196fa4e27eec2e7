"""Streaming linear CKA (prh_lightning.streaming) against a float64 numpy reference written here,
and against alignment_matrix on stored features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from prh_lightning.alignment import alignment_matrix
from prh_lightning.streaming import MomentBudgetExceeded, StreamingLinearCKA, model_cka


def reference_cka(x: np.ndarray, y: np.ndarray, normalize: bool) -> float:
    """Linear CKA in float64: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def reference_matrix(xs: dict, ys: dict, normalize: bool) -> np.ndarray:
    return np.array([[reference_cka(x, y, normalize) for y in ys.values()] for x in xs.values()])


def plain_features(model: nn.Module, names: list[str], data: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """Outputs of the named modules (spatial mean for conv maps), with bare forward hooks, over
    the same batches the library sees (float32 results depend on the batch size, and on the
    memory alignment of the batch: each is copied, as a DataLoader's collation does)."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    hooks = [
        modules[name].register_forward_hook(
            lambda m, i, o, name=name: out[name].append((o.mean(dim=(2, 3)) if o.ndim == 4 else o).double().numpy())
        )
        for name in names
    ]
    with torch.no_grad():
        for batch in data.split(batch_size):
            model.eval()(batch.clone())
    for hook in hooks:
        hook.remove()
    return {name: np.concatenate(parts) for name, parts in out.items()}


def small_mlp(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 7, 3, stride=2), nn.Flatten(), nn.LazyLinear(4))


@pytest.mark.parametrize("store", ["moments", "features", "auto"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("batch_size", [7, 64])
def test_two_models_match_float64_reference(normalize, batch_size, store):
    data = torch.randn(61, 6, generator=torch.Generator().manual_seed(1))
    model_a, model_b = small_mlp(0, 9), small_mlp(1, 5)
    layers_a, layers_b = ["0", "1", "3", "4"], ["0", "2", "4"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=batch_size)
    scores, names_a, names_b = model_cka(
        model_a, model_b, loader, layers_a=layers_a, layers_b=layers_b, reduce="mean", normalize=normalize, store=store,
        return_names=True,
    )
    assert (names_a, names_b) == (layers_a, layers_b)
    fa, fb = plain_features(model_a, layers_a, data, batch_size), plain_features(model_b, layers_b, data, batch_size)
    expected = reference_matrix(fa, fb, normalize)
    assert scores.shape == (4, 3)
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-10, rtol=0)
    stored = alignment_matrix(
        {k: torch.from_numpy(v).float() for k, v in fa.items()},
        {k: torch.from_numpy(v).float() for k, v in fb.items()},
        metric="cka",
        normalize=normalize,
    )
    np.testing.assert_allclose(scores.numpy(), stored.numpy(), atol=1e-5, rtol=0)


def test_conv_models_and_self_comparison():
    data = torch.randn(40, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    model = small_cnn(3)
    model(data[:2])  # materialise the lazy layer
    names = ["0", "2", "4"]
    scores = model_cka(model, None, data.split(16), layers_a=names, reduce="mean", store="moments")
    f = plain_features(model, names, data, 16)
    np.testing.assert_allclose(scores.numpy(), reference_matrix(f, f, True), atol=1e-10, rtol=0)
    np.testing.assert_allclose(scores.diagonal().numpy(), 1.0, atol=1e-12)
    same = model_cka(model, model, data.split(16), layers_a=names, layers_b=names, reduce="mean", store="moments")
    np.testing.assert_allclose(same.numpy(), scores.numpy(), atol=1e-12)


def test_large_offsets_keep_precision():
    """Features far from the origin (raw, normalize=False): the shifted moments stay exact."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64)
    y = x @ torch.randn(4, 3, generator=g, dtype=torch.float64) + 0.3 * torch.randn(300, 3, generator=g, dtype=torch.float64)
    acc = StreamingLinearCKA(normalize=False)
    for xb, yb in zip((x + 1e6).split(50), (y - 3e5).split(50)):
        acc.update({"x": xb}, {"y": yb})
    expected = reference_cka(x.numpy(), y.numpy(), normalize=False)
    assert abs(float(acc.compute()[0, 0]) - expected) < 1e-9


def test_budget_raises_or_falls_back_to_stored_features():
    data = torch.randn(30, 6, generator=torch.Generator().manual_seed(5))
    model_a, model_b = small_mlp(0, 9), small_mlp(1, 5)
    loader = data.split(10)
    with pytest.raises(MomentBudgetExceeded, match="max_bytes=100"):
        model_cka(model_a, model_b, loader, layers_a=["0"], layers_b=["2"], reduce="mean", store="moments", max_bytes=100)
    scores = model_cka(model_a, model_b, loader, layers_a=["0", "4"], layers_b=["2"], reduce="mean", max_bytes=100)
    fa, fb = plain_features(model_a, ["0", "4"], data, 10), plain_features(model_b, ["2"], data, 10)
    np.testing.assert_allclose(scores.numpy(), reference_matrix(fa, fb, True), atol=1e-10, rtol=0)


def test_models_restored_and_unhooked():
    model_a, model_b = small_mlp(0, 9), small_mlp(1, 5)
    model_a.train()
    model_b.eval()
    model_cka(model_a, model_b, torch.randn(20, 6).split(10), layers_a=["0"], layers_b=["2"], reduce="mean")
    assert model_a.training and all(m.training for m in model_a.modules())
    assert not model_b.training
    for model in (model_a, model_b):
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_bad_input_is_refused():
    acc = StreamingLinearCKA()
    acc.update({"x": torch.randn(5, 3)}, {"y": torch.randn(5, 2)})
    with pytest.raises(ValueError, match="must be \\[batch, 3\\]"):
        acc.update({"x": torch.randn(5, 4)}, {"y": torch.randn(5, 2)})
    with pytest.raises(ValueError, match="same samples"):
        acc.update({"x": torch.randn(5, 3)}, {"y": torch.randn(4, 2)})
    with pytest.raises(ValueError, match="NaN|Inf|finite"):
        acc.update({"x": torch.full((5, 3), float("nan"))}, {"y": torch.randn(5, 2)})
    constant = StreamingLinearCKA(normalize=False)
    for _ in range(3):
        constant.update({"c": torch.ones(4, 3)}, {"y": torch.randn(4, 2)})
    with pytest.raises(ValueError, match="constant"):
        constant.compute()
    with pytest.raises(RuntimeError, match="at least 2 samples"):
        StreamingLinearCKA().compute()
    with pytest.raises(ValueError, match="store must be"):
        model_cka(nn.Linear(2, 2), None, [torch.randn(3, 2)], store="disk")


@pytest.mark.parametrize("width", [2, 40])
def test_auto_keeps_the_smaller_of_features_and_moments(monkeypatch, width):
    # store="auto" keeps batches as features while scoring them (float64, twice their float32 size)
    # takes less memory than the moments; past that it folds them into the moments in order; if
    # the data end first, it scores the features directly and never allocates the moments
    import prh_lightning.streaming as streaming

    folds: list[int] = []
    fold = streaming._fold
    monkeypatch.setattr(streaming, "_fold", lambda acc, pending, same: (folds.append(len(pending)), fold(acc, pending, same)))
    direct: list[int] = []
    features_cka = streaming._features_cka
    monkeypatch.setattr(streaming, "_features_cka", lambda pending, *a: (direct.append(len(pending)), features_cka(pending, *a))[1])
    torch.manual_seed(3)
    data = torch.randn(120, 6)
    model_a, model_b = small_mlp(0, width), small_mlp(1, width)
    names_a, names_b = ["0", "2"], ["2", "4"]
    auto = model_cka(model_a, model_b, data.split(10), layers_a=names_a, layers_b=names_b, reduce="mean", store="auto")
    moments = model_cka(model_a, model_b, data.split(10), layers_a=names_a, layers_b=names_b, reduce="mean", store="moments")
    np.testing.assert_allclose(auto.numpy(), moments.numpy(), atol=1e-12, rtol=0)
    ref = reference_matrix(
        plain_features(model_a, names_a, data, 10), plain_features(model_b, names_b, data, 10), normalize=True
    )
    np.testing.assert_allclose(auto.numpy(), ref, atol=1e-12, rtol=0)
    # one batch of features: 10 rows x (2 w + 2 w or 3) floats; moments: 8 (D_a D_b + squares)
    widths_a, widths_b = [width, width], [width, 3]
    moment = 8 * (sum(widths_a) * sum(widths_b) + sum(d * d for d in widths_a + widths_b) + sum(widths_a + widths_b))
    per_batch = 4 * 10 * sum(widths_a + widths_b)
    if 2 * per_batch * 12 <= moment:  # wide layers: all 12 batches scored as features, no moments
        assert (folds, direct) == ([], [12])
    else:  # narrow: folded as soon as twice the waiting features outgrow the moments
        assert direct == [] and len(folds) > 2
        assert max(folds) <= moment // (2 * per_batch) + 1


def test_auto_scores_features_like_the_moments_on_hard_inputs():
    # the direct feature path (store="auto", small n) against the float64 reference: large offsets,
    # self-comparison, and a constant layer refused as by the moments
    g = torch.Generator().manual_seed(8)
    x = torch.randn(70, 5, generator=g, dtype=torch.float64)

    class Offsets(nn.Module):
        def __init__(self):
            super().__init__()
            self.near, self.far = nn.Linear(5, 40, dtype=torch.float64), nn.Linear(5, 30, dtype=torch.float64)

        def forward(self, v):
            return torch.cat([self.near(v).tanh(), self.far(v)], dim=1)

    torch.manual_seed(0)
    net = Offsets()
    with torch.no_grad():
        net.near.bias += -3e3  # offsets that a one-pass sum of squares would lose 8 digits to
        net.far.bias += 1e4
    names = ["near", "far"]
    for other, layers_b in ((None, names), (net, ["far"])):
        scores = model_cka(net, other, x.split(16), layers_a=names, layers_b=layers_b, reduce=None, normalize=False)
        with torch.no_grad():
            feats = {"near": net.near(x).float().numpy(), "far": net.far(x).float().numpy()}  # taps give float32
        expected = reference_matrix(feats, {k: feats[k] for k in layers_b}, normalize=False)
        np.testing.assert_allclose(scores.numpy(), expected, atol=1e-12, rtol=0)
    with torch.no_grad():
        net.far.weight.zero_()
    with pytest.raises(ValueError, match=r"a\['far'\] is constant"):
        model_cka(net, None, x.split(16), layers_a=names, reduce=None, normalize=False)


def test_compute_scores_in_row_chunks_without_a_second_cross_matrix(monkeypatch):
    # compute() squares the centred cross moments CHUNK_BYTES of rows at a time: chunks that cut
    # through layers give the float64 reference, and no op output is as large as [D_a, D_b]
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import prh_lightning.streaming as streaming

    class LargestOutput(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.numel = max([self.numel, *sizes])
            return out

    g = torch.Generator().manual_seed(5)
    widths_a, widths_b = [30, 50, 20, 60], [40, 70, 50]
    x = torch.randn(90, 16, generator=g)
    xs = {f"a{i}": torch.tanh(x @ torch.randn(16, d, generator=g)) + 3.0 for i, d in enumerate(widths_a)}
    ys = {f"b{j}": torch.relu(x @ torch.randn(16, d, generator=g)) for j, d in enumerate(widths_b)}
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 8 * 160 * 13)  # 13 rows of [., D_b = 160] per chunk
    acc = StreamingLinearCKA(normalize=False)
    for rows in range(0, 90, 25):
        acc.update({k: v[rows : rows + 25] for k, v in xs.items()}, {k: v[rows : rows + 25] for k, v in ys.items()})
    with LargestOutput() as largest:
        scores = acc.compute()
    expected = reference_matrix({k: v.numpy() for k, v in xs.items()}, {k: v.numpy() for k, v in ys.items()}, False)
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-12, rtol=0)
    assert largest.numel <= max(d * d for d in widths_a + widths_b)  # one layer's own moment, < 160 x 160
