"""Which modules to tap: names, glob patterns, module types, predicates, or all leaves.

A selection resolves to a list of :class:`TapTarget` in module-registration order; the order
of the recorded features is decided later, by execution order in the forward pass.

A name may end in ``":input"`` to tap what goes *into* that module instead of what comes out
(e.g. ``"encoder.layer.0:input"`` is the embedding output of a BERT-style model).

The default ``"*"`` is every leaf module a user would compare, which is not quite every leaf:

- modules that are the identity in eval mode are left out (``nn.Dropout*``, ``nn.Identity``,
  timm's ``DropPath``, torchvision's ``StochasticDepth``, ``DropBlock``, quantization stubs):
  their features would duplicate their input's;
- loss modules (``nn.CrossEntropyLoss``, ...) and torchmetrics metrics are left out: they
  score the model, they are not part of its representation;
- ``nn.MultiheadAttention`` counts as one leaf. Its ``out_proj`` is an ``nn.Linear`` that
  attention calls through ``F.multi_head_attention_forward`` (its weights, not the module), so a
  hook on ``out_proj`` never runs; the attention module's first output *is* ``out_proj``'s
  output, and that is what gets tapped.

Leaves that never run in a forward pass and leaves whose output is a scalar (an auxiliary
loss) are skipped at run time with a warning, see :class:`~prh_lightning.taps.LayerTaps`.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

INPUT_SUFFIX = ":input"

#: Library classes (by name, so the library need not be imported) that are the identity in eval mode.
_EVAL_IDENTITY_NAMES = frozenset(
    {"DropPath", "StochasticDepth", "DropBlock2d", "DropBlock3d", "QuantStub", "DeQuantStub", "DropoutNd"}
)

#: One selection item: a name or glob, a module class, or ``predicate(name, module) -> bool``.
LayerSpec = str | type[nn.Module] | Callable[[str, nn.Module], bool]
Selection = LayerSpec | Sequence[LayerSpec] | None


@dataclass(frozen=True)
class TapTarget:
    """A module to hook.

    Attributes:
        name: the key its features get (``"layer1.0.relu"``, ``"encoder.layer.0:input"``).
        module_name: the module's name in ``model.named_modules()``.
        module: the module itself.
        explicit: named exactly by the user, so a non-tensor output is an error rather than
            a silent skip.
        tap_input: hook the module's input instead of its output.
    """

    name: str
    module_name: str
    module: nn.Module
    explicit: bool
    tap_input: bool = False


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _is_module_type(spec: object) -> bool:
    return isinstance(spec, type) and issubclass(spec, nn.Module)


def _unknown_name_error(name: str, names: list[str]) -> KeyError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    hint = f"close matches: {close}" if close else f"some available names: {names[:8]}"
    return KeyError(
        f"no module named {name!r} in the model; {hint}. "
        "Use LayerTaps.available(model, example_input) to list every tappable layer."
    )


def is_eval_identity(module: nn.Module) -> bool:
    """Whether ``module`` returns its input unchanged in eval mode (dropout-like, identity)."""
    if isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)):
        return True
    return type(module).__name__ in _EVAL_IDENTITY_NAMES


def _scores_the_model(module: nn.Module) -> bool:
    """A loss module or a torchmetrics metric."""
    return isinstance(module, nn.modules.loss._Loss) or type(module).__module__.startswith("torchmetrics.")


def default_leaves(model: nn.Module) -> list[TapTarget]:
    """The ``"*"`` selection: leaf modules in registration order, ``nn.MultiheadAttention`` as one
    leaf (its ``out_proj`` never runs as a module), eval-mode identities, losses and metrics left out.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.MultiheadAttention(8, 2))
    >>> [t.name for t in default_leaves(net)]
    ['0', '2']
    """
    opaque: list[str] = []
    leaves: list[TapTarget] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in opaque):
            continue
        if isinstance(module, nn.MultiheadAttention) or _scores_the_model(module):
            opaque.append(name)  # not descended into (a metric may hold sub-metrics)
        elif any(True for _ in module.children()):
            continue
        if not is_eval_identity(module) and not _scores_the_model(module):
            leaves.append(TapTarget(name, name, module, explicit=False))
    return leaves


def resolve_layers(model: nn.Module, layers: Selection) -> list[TapTarget]:
    """Resolve a selection to the modules to hook.

    Args:
        model: the root module (never tapped itself).
        layers: ``None`` or ``"*"``: every leaf module (see :func:`default_leaves`; modules
            whose output is not a tensor are skipped at run time); a name; a glob
            (``"layer*.relu"``, matched against every module name, containers included); a
            module class (``nn.Conv2d``); a predicate ``f(name, module) -> bool``; or a list
            mixing these.

    Raises:
        KeyError: an exact name is not in the model (the message lists close matches).
        ValueError: a glob, type or predicate matches nothing, or the selection is empty.
        TypeError: an item of an unsupported type.
    """
    modules = {name: mod for name, mod in model.named_modules() if name}
    names = list(modules)
    if layers is None or (isinstance(layers, str) and layers == "*"):
        leaves = default_leaves(model)
        if not leaves:
            raise ValueError(f"{type(model).__name__} has no sub-modules to tap; wrap it or tap a parent model")
        return leaves
    specs: Sequence[LayerSpec] = [layers] if isinstance(layers, str) or not isinstance(layers, Sequence) else layers
    if len(specs) == 0:
        raise ValueError("empty layer selection: give layer names, glob patterns, module types or a predicate")

    chosen: dict[str, TapTarget] = {}
    for spec in specs:
        matched = default_leaves(model) if spec == "*" else _match_one(spec, modules, names)
        for target in matched:
            chosen.setdefault(target.name, target)
    return list(chosen.values())


def _match_one(spec: LayerSpec, modules: dict[str, nn.Module], names: list[str]) -> list[TapTarget]:
    if isinstance(spec, str):
        base, tap_input = (spec[: -len(INPUT_SUFFIX)], True) if spec.endswith(INPUT_SUFFIX) else (spec, False)
        if _is_glob(base):
            hits = [n for n in names if fnmatch.fnmatchcase(n, base)]
            if not hits:
                raise ValueError(f"pattern {spec!r} matches no module name; names look like {names[:8]}")
            return [TapTarget(n + INPUT_SUFFIX * tap_input, n, modules[n], False, tap_input) for n in hits]
        if base not in modules:
            raise _unknown_name_error(base, names)
        return [TapTarget(spec, base, modules[base], True, tap_input)]
    if _is_module_type(spec):
        hits = [n for n, m in modules.items() if isinstance(m, spec)]
        if not hits:
            raise ValueError(f"the model has no module of type {spec.__name__}")
        return [TapTarget(n, n, modules[n], False) for n in hits]
    if callable(spec):
        hits = [n for n, m in modules.items() if spec(n, m)]
        if not hits:
            raise ValueError(f"predicate {getattr(spec, '__name__', spec)!r} selected no module")
        return [TapTarget(n, n, modules[n], False) for n in hits]
    raise TypeError(
        f"cannot select layers with {spec!r} ({type(spec).__name__}); use a name, glob, nn.Module "
        "subclass, predicate(name, module) -> bool, or a list of these"
    )
