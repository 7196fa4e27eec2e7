"""The tracker prepares each layer once per metric and keeps the snapshots' states across
checks (prh_lightning/tracking/prepared.py); the logged matrices must still equal textbook
formulas on features recorded independently at each check."""

from __future__ import annotations

import torch
from torch import nn

from prh_lightning.functional._plan import get_plan
from prh_lightning.tracking import AlignmentTracker
from prh_lightning.tracking.prepared import PreparedStates
from reference_formulas import ref_linear_cka, ref_mutual_knn


def _features(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each leaf's output on ``x``, recorded with plain forward hooks (not LayerTaps)."""
    out, hooks = {}, []
    for name, module in model.named_children():
        hooks.append(module.register_forward_hook(lambda m, i, o, name=name: out.__setitem__(name, o.detach().clone())))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return out


def _ref_matrix(xs, ys, fn) -> torch.Tensor:
    norm = lambda t: t.double() / t.double().norm(dim=1, keepdim=True)  # noqa: E731 (normalize=True)
    return torch.tensor([[fn(norm(a), norm(b)) for b in ys.values()] for a in xs.values()], dtype=torch.float64)


def test_snapshot_matrices_equal_textbook_formulas_over_several_checks():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
    probe = torch.randn(96, 12, generator=g)
    tracker = AlignmentTracker(probe=probe, metrics=("cka", "mutual_knn"), k=5, calibration=0, batch_size=32)
    recorded = []
    for step in range(4):
        recorded.append(_features(model, probe))
        tracker.check(model, step, log=False)
        if step > 0:
            for metric, fn in (("cka", ref_linear_cka), ("mutual_knn", lambda a, b: ref_mutual_knn(a, b, 5))):
                want = {
                    "self": _ref_matrix(recorded[-1], recorded[-1], fn),
                    "self_initial": _ref_matrix(recorded[-1], recorded[0], fn),
                    "self_previous": _ref_matrix(recorded[-1], recorded[-2], fn),
                }
                for target, expected in want.items():
                    got = tracker.last_matrices[f"{metric}/{target}"].double()
                    assert torch.allclose(got, expected, atol=1e-5), (step, metric, target)
        with torch.no_grad():  # training moves the weights between checks
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    # only the states of tensors the tracker still holds are kept: initial + previous, 2 metrics, 3 layers
    assert len(tracker._prepared) <= 2 * 2 * 3


def test_a_tensor_changed_in_place_is_prepared_again():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g)
    y = torch.randn(50, 6, generator=g)
    plan = get_plan("cka")
    options = plan.bind({})
    prep = {"normalize": False, "clip_quantile": None, "block_rows": None, "max_memory": None}
    cache = PreparedStates()
    sy = cache.state(plan, options, y, "y", prep, torch.float32)
    before = float(plan.pairs([cache.state(plan, options, x, "x", prep, torch.float32)], [sy], **options)[0, 0])
    assert abs(before - ref_linear_cka(x, y)) < 1e-6
    x.mul_(torch.linspace(0.1, 3.0, 6))  # in place: a different layer, same tensor object
    after = float(plan.pairs([cache.state(plan, options, x, "x", prep, torch.float32)], [sy], **options)[0, 0])
    assert abs(after - ref_linear_cka(x, y)) < 1e-6 and abs(after - before) > 1e-3


def test_large_probe_linear_cka_states_do_not_pile_up_over_checks():
    # at n >= 4,096 linear CKA is scored from feature-space statistics through a plan object
    # built per call; its states must still be found again (not added anew at every check)
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    probe = torch.randn(4096, 6, generator=g)
    tracker = AlignmentTracker(
        probe=probe, metrics=("cka",), calibration=0, max_probe_samples=4096, batch_size=4096, within_model=False
    )
    recorded = []
    for step in range(4):
        recorded.append(_features(model, probe))
        tracker.check(model, step, log=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        assert len(tracker._prepared) <= 2 * 3  # initial + previous, 3 layers

    def feature_space_cka(a, b):  # ||A^T B||_F^2 / (||A^T A||_F ||B^T B||_F), columns centred (float64)
        a, b = a - a.mean(0), b - b.mean(0)
        return float((a.T @ b).pow(2).sum() / ((a.T @ a).norm() * (b.T @ b).norm()))

    expected = _ref_matrix(recorded[-1], recorded[0], feature_space_cka)
    assert torch.allclose(tracker.last_matrices["cka/self_initial"].double(), expected, atol=1e-5)


def test_finiteness_is_read_again_after_an_in_place_change_and_forgotten_when_dropped():
    cache = PreparedStates()
    x = torch.randn(20, 4)
    assert cache.all_finite(x) is True
    x[3, 1] = float("inf")  # in place: the version counter moves
    assert cache.all_finite(x) is False
    y = torch.randn(20, 4)
    y[0, 0] = float("nan")
    assert cache.all_finite(y) is False
    cache.retain([x])
    assert set(cache._finite) == {id(x)}
