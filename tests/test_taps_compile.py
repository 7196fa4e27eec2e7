"""LayerTaps on models compiled with torch.compile (the ``eager`` backend: dynamo's graph capture
without a C++ toolchain, seconds on CPU): hooks on the original module, values equal to the
eager sub-modules, the compiled graphs neither broken nor recompiled, and restored afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prh_lightning import LayerTaps
from prh_lightning.taps.compiled import eager, is_compiled, unwrap_compiled

dynamo = pytest.importorskip("torch._dynamo")


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def graph_counters() -> tuple[int, int, int]:
    """(graphs compiled, graph breaks, frames compiled) so far."""
    counters = dynamo.utils.counters
    return (
        counters["stats"]["unique_graphs"],
        sum(counters["graph_break"].values()),
        counters["frames"]["ok"],
    )


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    dynamo.utils.counters.clear()
    yield
    dynamo.reset()


def test_torch_compile_wrapper_is_tapped_through_its_original_module_without_new_graphs():
    net = small_net()
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(5, 4)
    compiled(x)  # compile once
    before = graph_counters()
    compiled_forward = compiled.forward
    with LayerTaps(compiled, layers=["0", "2"]) as taps:  # the names of the original module
        assert taps.model is net
        out = compiled(x)
        compiled(x)
    assert graph_counters() == before  # no recompilation, no graph break: the tapped calls ran eagerly
    assert compiled.forward is compiled_forward  # the compiled entry point is back
    feats = taps.features()
    with torch.no_grad():
        torch.testing.assert_close(feats["0"], torch.cat([net[0](x)] * 2))
        torch.testing.assert_close(feats["2"], torch.cat([net(x)] * 2))
        torch.testing.assert_close(out, net(x))
    compiled(x)
    assert graph_counters() == before  # after the taps the cached graph runs again, unchanged


def test_hooks_left_on_a_compiled_call_would_record_nothing():
    """Why the taps switch to eager: a graph compiled before the hooks never calls them."""
    net = small_net()
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(5, 4)
    compiled(x)
    seen = []
    handle = net[0].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    compiled(x)
    handle.remove()
    assert seen == []
    with LayerTaps(compiled, layers="0") as taps:
        compiled(x)
    assert taps.features()["0"].shape == (5, 8)


def test_module_compile_in_place_and_lightning_compiled_module():
    net = small_net()
    net.compile(backend="eager")
    x = torch.randn(3, 4)
    net(x)
    compiled_call = net._compiled_call_impl
    before = graph_counters()
    with LayerTaps(net, layers="2") as taps:
        net(x)
    assert graph_counters() == before and net._compiled_call_impl is compiled_call
    torch.testing.assert_close(taps.features()["2"], net[2](net[1](net[0](x))).detach())

    lightning = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.utilities.compile import from_compiled

    module = from_compiled(torch.compile(BoringModel(), backend="eager"))
    assert isinstance(module, lightning.LightningModule) and is_compiled(module)
    batch = torch.randn(2, 32)
    module(batch)
    compiled_forward = module.forward
    before = graph_counters()
    with LayerTaps(module, layers="layer") as taps:
        module(batch)
    assert graph_counters() == before and module.forward is compiled_forward
    torch.testing.assert_close(taps.features()["layer"], module.layer(batch).detach())


def test_unwrap_and_eager_helpers():
    net = small_net()
    compiled = torch.compile(net, backend="eager")
    assert unwrap_compiled(compiled) is net and is_compiled(compiled) and not is_compiled(net)
    names = [t.name for t in LayerTaps(compiled).targets]
    assert names == ["0", "1", "2"]  # no "_orig_mod." prefix
    outer, inner = compiled.forward, compiled._orig_mod.forward
    with pytest.raises(ZeroDivisionError), eager(compiled):
        assert compiled.forward == compiled._orig_mod.__call__  # bound methods: equal, not identical
        1 / 0
    assert compiled.forward is outer and compiled._orig_mod.forward == inner  # restored after an error
