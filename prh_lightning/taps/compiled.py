"""Models compiled with ``torch.compile``: tap the original module, run it eagerly while tapped.

Forward hooks and compiled graphs do not mix. Hooks registered *after* compilation are not
seen by the graph already compiled (``torch.compile(model)(x)`` silently records nothing), and
hooks registered *before* are traced into the graph, each one a graph break (measured here:
5 breaks for two tapped ``Linear`` layers; the issue measured 23 on a CNN). So
:class:`~prh_lightning.taps.LayerTaps` puts its hooks on the original module and, while
attached, makes calls of the compiled model run that module eagerly; :func:`eager` restores
the compiled forward on exit, so the compiled graphs are neither broken nor recompiled.

Three forms of compilation are recognised:

- ``torch.compile(model)``: an ``OptimizedModule`` whose ``_orig_mod`` is the model;
- ``model.compile()`` (``nn.Module.compile``): the model's ``_compiled_call_impl``;
- Lightning's ``from_compiled`` (what ``Trainer.fit(torch.compile(module))`` does): the
  LightningModule's ``forward`` and ``*_step`` methods replaced by compiled ones, the
  originals kept in ``_compiler_ctx``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_LIGHTNING_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def _optimized_module_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    return OptimizedModule


def is_compiled_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is the ``OptimizedModule`` that ``torch.compile(module)`` returns."""
    optimized = _optimized_module_type()
    return optimized is not None and isinstance(model, optimized)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The original module of ``torch.compile(module)`` (nested wrappers too); ``model`` itself otherwise.

    >>> net = nn.Linear(2, 2)
    >>> unwrap_compiled(net) is net
    True
    """
    while is_compiled_wrapper(model):
        model = model._orig_mod
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether calling ``model`` runs compiled code in any of the three recognised forms."""
    if is_compiled_wrapper(model):
        return True
    return getattr(model, "_compiled_call_impl", None) is not None or bool(getattr(model, "_compiler_ctx", None))


@contextlib.contextmanager
def eager(*models: nn.Module) -> Iterator[None]:
    """Within this block, calls of the given models (compiled or not) run their original
    modules eagerly, so forward hooks run as Python, outside any graph; on exit every compiled
    entry point is put back unchanged.

    >>> import torch
    >>> net = nn.Linear(2, 2)
    >>> with eager(net):
    ...     y = net(torch.zeros(1, 2))
    """
    restore: list[tuple[object, str, dict]] = []
    try:
        for model in models:
            _make_eager(model, restore)
        yield
    finally:
        for obj, name, saved in reversed(restore):
            if "value" in saved:
                obj.__dict__[name] = saved["value"]
            else:
                obj.__dict__.pop(name, None)


def _swap(obj: object, name: str, value: object, restore: list) -> None:
    saved = {"value": obj.__dict__[name]} if name in obj.__dict__ else {}
    restore.append((obj, name, saved))
    obj.__dict__[name] = value


def _make_eager(model: nn.Module, restore: list) -> None:
    while is_compiled_wrapper(model):
        original = model._orig_mod
        _swap(model, "forward", original.__call__, restore)
        model = original
    if getattr(model, "_compiled_call_impl", None) is not None:
        _swap(model, "_compiled_call_impl", None, restore)
    ctx = getattr(model, "_compiler_ctx", None)
    if ctx:
        for method in _LIGHTNING_METHODS:
            original = ctx.get(f"original_{method}")
            if original is not None:
                _swap(model, method, original, restore)
