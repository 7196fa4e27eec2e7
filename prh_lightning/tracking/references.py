"""References a tracked model is compared with, and how each is fed the probe (no Lightning import).

A reference spec is one of:

- an ``nn.Module`` fed the probe inputs: short for ``Reference(module, layers="*")`` (every
  leaf layer tapped), or ``Reference(module)`` (its output) for a sentence-transformer;
- a :class:`Reference` (its own inputs, layers, pooling, ``class_names`` for a text model);
- a registered model name (``"minilm"``, ``"all-MiniLM-L6-v2"``, ``"efficientnet-lite0"``, any
  name of :data:`prh_lightning.models.zoo.REGISTRY`) or a ``{"class_path": ..., "init_args":
  {...}}`` mapping, so that a YAML file can name it; a mapping with a ``model`` key holds the
  other :class:`Reference` fields (``{"model": "minilm", "class_names": [...]}``). The name is
  checked at once, but the weights are loaded at the first check that needs them: under DDP
  only rank 0 scores, so the other ranks never hold them;
- a callable ``f(x) -> Tensor[n, d] | {layer: Tensor[n, d]}`` of the probe inputs;
- precomputed features: a ``Representations``, a mapping ``{layer: Tensor[n, d]}`` or one ``[n, d]`` tensor.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prh_lightning.tracking.probe import (
    Probe,
    call_model,
    module_device,
    move_inputs,
    num_rows,
    probe_features,
    side_effect_free,
    slice_inputs,
)
from prh_lightning.tracking.scoring import RESERVED

Features = dict[str, torch.Tensor]
_ALIASES = {"minilm": "all-MiniLM-L6-v2"}
OUTPUT = "output"  # Reference(layers=OUTPUT): the model's output, one feature column named "output"


@dataclass
class Reference:
    """A reference model and how to feed it the probe.

    Args:
        model: an ``nn.Module`` (a sentence-transformer works out of the box through
            ``encode``), a registered model name or a ``class_path`` mapping (see module doc).
            A name or mapping is checked now and loaded on first use (:attr:`module`): until
            then :attr:`loaded` is False and ``model`` holds the name; :attr:`loads` counts
            the loads (at most one).
        inputs: what the model reads for the ``n`` probe samples: ``None`` (the probe inputs
            themselves), a sequence of ``n`` items (strings, a tensor ``[n, ...]``), or a function
            ``inputs(x, y) -> such a sequence`` of the probe inputs and labels, e.g.
            ``lambda x, y: [CLASS_NAMES[i] for i in y]`` for a text model (cross-modal).
        class_names: shorthand for that last case, usable from YAML: the model reads
            ``class_names[label]`` of each probe sample.
        layers: ``"output"`` (default): the model's output only, one column ``"output"``
            (``encode`` for a sentence-transformer given strings); or a
            :class:`~prh_lightning.taps.LayerTaps` selection: ``"*"`` (every leaf layer),
            ``"auto"`` (the family default), names, globs, types; ``["output"]`` (a list) taps a
            sub-module named ``output``. ``None`` is deprecated: it meant the output here but
            every leaf in ``LayerTaps``; it warns and means ``"output"`` for now, and will mean
            every leaf, as in ``LayerTaps``, in a later release.
        reduce: pooling of tapped layers (see ``LayerTaps``).
        forward_fn: ``forward_fn(model, inputs_chunk) -> output`` to call the model yourself.
        batch_size: probe rows per forward call.
        frozen: the reference does not change during training, so it is computed once and cached.
        metrics: the metrics computed against this reference (``None``: all of the tracker's).
            k-NN metrics are undefined against class names (``n`` rows, 10 distinct): use
            ``metrics=("cka",)`` there.

    >>> from torch import nn
    >>> from prh_lightning.tracking.probe import Probe
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    >>> probe = Probe(torch.randn(5, 4))
    >>> {k: tuple(v.shape) for k, v in Reference(net).features(probe).items()}
    {'output': (5, 2)}
    >>> {k: tuple(v.shape) for k, v in Reference(net, layers="*").features(probe).items()}
    {'0': (5, 3), '1': (5, 3), '2': (5, 2)}
    >>> lazy = Reference({"class_path": "torch.nn.Linear", "init_args": {"in_features": 4, "out_features": 2}})
    >>> lazy.loaded, lazy.loads
    (False, 0)
    >>> tuple(lazy.features(probe)["output"].shape), lazy.loaded, lazy.loads
    ((5, 2), True, 1)
    """

    model: Any
    inputs: Sequence[Any] | torch.Tensor | Callable[[Any, torch.Tensor | None], Any] | None = None
    layers: Any = OUTPUT
    reduce: Any = "mean"
    forward_fn: Callable[[nn.Module, Any], Any] | None = None
    batch_size: int = 64
    frozen: bool = True
    class_names: Sequence[str] | None = field(default=None)
    metrics: Sequence[str] | None = None
    loads: int = field(default=0, init=False, compare=False)
    # layers chosen from the loaded model: its output when it has encode(), else every leaf
    _layers_from_model: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.model, (str, Mapping)):
            check_reference_name(self.model)  # a clear error now; the weights come at first use
        elif not isinstance(self.model, nn.Module):
            raise TypeError(
                f"Reference.model must be an nn.Module, a registered model name or a class_path mapping, got "
                f"{type(self.model).__name__}; pass a plain callable or precomputed Representations directly in "
                "references={...}"
            )
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"Reference.batch_size must be a positive int, got {self.batch_size!r}")
        if self.class_names is not None and self.inputs is not None:
            raise ValueError("give Reference(inputs=...) or class_names=..., not both")
        if self.layers is None:
            warnings.warn(
                "Reference(layers=None) is deprecated: it means the model's output here but every leaf layer in "
                "LayerTaps(layers=None). Write layers='output' for the output or layers='*' for every leaf; None "
                "means 'output' for now and will mean every leaf, as in LayerTaps, in a later release",
                FutureWarning,
                stacklevel=3,
            )
            self.layers = OUTPUT

    @property
    def loaded(self) -> bool:
        """Whether the model's weights are in memory (a name or mapping is loaded on first use)."""
        return isinstance(self.model, nn.Module)

    @property
    def module(self) -> nn.Module:
        """The ``nn.Module``, loading a named or ``class_path`` model the first time."""
        if not isinstance(self.model, nn.Module):
            model = load_reference_model(self.model)
            if not isinstance(model, nn.Module):
                raise TypeError(f"reference {self.model!r} built a {type(model).__name__}, not an nn.Module")
            self.model = model
            self.loads += 1
            if self._layers_from_model:
                self.layers = OUTPUT if hasattr(model, "encode") else "*"
        return self.model

    @property
    def output_only(self) -> bool:
        """True when the reference gives its model's output (``layers="output"``), not tapped layers."""
        return isinstance(self.layers, str) and self.layers == OUTPUT

    def features(self, probe: Probe) -> Features:
        """Ordered ``{layer: Tensor[n, d]}`` of the reference on the probe."""
        model = self.module
        inputs = self._inputs(probe)
        size = num_rows(inputs) if _is_text(inputs) and self.output_only else self.batch_size  # encode batches
        chunks = [slice_inputs(inputs, i, i + size) for i in range(0, num_rows(inputs), size)]
        if not self.output_only:
            forward = self.forward_fn or _call_reference
            return probe_features(model, chunks, layers=self.layers, reduce=self.reduce, forward_fn=forward)
        with side_effect_free(model):
            device = module_device(model)
            outputs = [_as_features(self._output(move_inputs(c, device))) for c in chunks]
        return {OUTPUT: torch.cat(outputs)}

    def _inputs(self, probe: Probe) -> Any:
        if self.class_names is not None:
            if probe.labels is None:
                raise ValueError("Reference(class_names=...) needs probe labels, but the probe batches hold none")
            return [str(self.class_names[int(i)]) for i in probe.labels]
        if self.inputs is None:
            return probe.x
        if callable(self.inputs) and not isinstance(self.inputs, (torch.Tensor, nn.Module)):
            return self.inputs(probe.x, probe.labels)
        return self.inputs

    def _output(self, chunk: Any) -> Any:
        if self.forward_fn is not None:
            return self.forward_fn(self.model, chunk)
        if _is_text(chunk) and hasattr(self.model, "encode"):
            return _encode_unique(self.model, chunk)
        return _call_reference(self.model, chunk)


def check_reference_name(spec: str | Mapping[str, Any]) -> None:
    """Raise a clear error now for an unknown registered name or a ``class_path`` that does not
    import, without loading any weights."""
    if isinstance(spec, Mapping):
        if "class_path" not in spec:
            raise ValueError(f"a reference given as a mapping needs a 'class_path' key, got keys {sorted(spec)}")
        _import_class(str(spec["class_path"]))
        return
    name = _ALIASES.get(spec, spec)
    if name != "all-MiniLM-L6-v2":
        from prh_lightning.models.zoo import modality_of

        modality_of(name)  # ValueError naming the registered names


def _import_class(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import reference class_path {path!r}: {err}") from err


def load_reference_model(spec: str | Mapping[str, Any]) -> nn.Module:
    """An ``nn.Module`` from a registered name (``"minilm"``, ``"efficientnet-lite0"``, ...) or a
    ``{"class_path": "pkg.module.Class", "init_args": {...}}`` mapping."""
    check_reference_name(spec)
    if isinstance(spec, Mapping):
        return _import_class(str(spec["class_path"]))(**dict(spec.get("init_args") or {}))
    name = _ALIASES.get(spec, spec)
    if name == "all-MiniLM-L6-v2":
        from prh_lightning.models.pretrained import load_minilm

        return load_minilm()  # the sentence-transformer: encode() gives the sentence embedding
    from prh_lightning.models.zoo import load_model

    return load_model(name).model


def _call_reference(model: nn.Module, chunk: Any) -> Any:
    """``model.encode`` for a list of strings (sentence-transformers), else :func:`call_model`."""
    if _is_text(chunk) and hasattr(model, "encode"):
        return model.encode(chunk, convert_to_tensor=True, show_progress_bar=False)
    return call_model(model, chunk)


def _is_text(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and isinstance(x[0], str)


def _encode_unique(model: nn.Module, texts: list[str]) -> torch.Tensor:
    """``model.encode`` of each distinct string once (class names repeat), ``[len(texts), d]``."""
    unique = list(dict.fromkeys(texts))
    position = {text: i for i, text in enumerate(unique)}
    embeddings = _call_reference(model, unique)
    return embeddings[torch.tensor([position[t] for t in texts], device=embeddings.device)]


def _as_features(output: Any) -> torch.Tensor:
    """``[n, d]`` float features from a model output (tensor, ``sentence_embedding``, or the
    first tensor of a tuple / ``ModelOutput``)."""
    from prh_lightning.taps.outputs import describe, pick_tensor

    if isinstance(output, Mapping) and "sentence_embedding" in output:
        output = output["sentence_embedding"]
    tensor = pick_tensor(output)
    if tensor is None:
        raise TypeError(
            f"the reference returned {describe(output)}, which holds no tensor; "
            "pass Reference(..., forward_fn=...) returning a [n, d] tensor"
        )
    return tensor.detach().float().flatten(1) if tensor.ndim > 1 else tensor.detach().float()[:, None]


def check_references(references: Mapping[str, Any]) -> dict[str, Any]:
    """Validate names and turn modules, registered names and ``class_path`` / ``model`` mappings
    into :class:`Reference` objects."""
    if not isinstance(references, Mapping):
        raise TypeError(f"references must be a dict {{name: reference}}, got {type(references).__name__}")
    out = {}
    for name, spec in references.items():
        if not isinstance(name, str) or not name or "/" in name or name in RESERVED:
            raise ValueError(
                f"reference name {name!r} is not allowed: use a non-empty string without '/', other than {list(RESERVED)}"
            )
        if isinstance(spec, str) or (isinstance(spec, Mapping) and "class_path" in spec):
            spec = Reference(spec)  # loaded at first use, with the layers a bare module gets (below)
            spec._layers_from_model = True
        elif isinstance(spec, Mapping) and "model" in spec:
            spec = Reference(**spec)
        if isinstance(spec, nn.Module):  # every leaf layer; a sentence-transformer's embedding
            spec = Reference(spec, layers=OUTPUT if hasattr(spec, "encode") else "*")
        elif not isinstance(spec, (Reference, Mapping, torch.Tensor)) and not callable(spec):
            raise TypeError(
                f"reference {name!r} is a {type(spec).__name__}; use an nn.Module, a Reference(...), a registered "
                "model name, a class_path mapping, a callable f(x) -> Tensor[n, d], Representations, or a [n, d] tensor"
            )
        out[name] = spec
    return out


def reference_metrics(spec: Any) -> tuple[str, ...] | None:
    """The metrics a reference asks for (``None``: all)."""
    return tuple(spec.metrics) if isinstance(spec, Reference) and spec.metrics is not None else None


def is_frozen(spec: Any) -> bool:
    return not (isinstance(spec, Reference) and not spec.frozen)


def reference_features(spec: Any, probe: Probe) -> Features:
    """Ordered ``{layer: Tensor[n, d]}`` (float32) of one reference spec on the probe, checked
    to have one row per probe sample."""
    if isinstance(spec, Reference):
        features = spec.features(probe)
    elif isinstance(spec, (Mapping, torch.Tensor)):
        features = _as_feature_dict(spec)
    else:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            features = _as_feature_dict(spec(probe.x))
    features = {k: v.float() for k, v in features.items()}
    for layer, value in features.items():
        if value.ndim != 2 or value.shape[0] != probe.n:
            raise ValueError(
                f"layer {layer!r} has shape {tuple(value.shape)} but the probe has {probe.n} samples; a reference "
                "must give one [n, d] row per probe sample, in probe order"
            )
    return features


def _as_feature_dict(value: Any) -> Features:
    if isinstance(value, torch.Tensor):
        return {"output": value if value.ndim == 2 else value.flatten(1)}
    if isinstance(value, Mapping):
        return dict(value.items())
    raise TypeError(
        f"a reference callable must return a [n, d] tensor or {{layer: [n, d]}}, got {type(value).__name__}"
    )
