"""`LayerTaps`: record reduced per-layer features of any ``nn.Module`` with forward hooks.

::

    with LayerTaps(model, layers="*", reduce="mean") as taps:
        model(x)                     # any number of forward calls
        feats = taps.features()      # ordered {layer_name: Tensor[n, d]}

Behaviour worth knowing:

- **Order**: features come in the order the kept calls ran in the first forward pass.
- **Repeated calls** of one module inside one forward pass of the root model (torchvision's
  ``BasicBlock`` applies its ``relu`` twice), ``repeated=``: ``"last"`` (default; keeps the
  last call, for ``BasicBlock`` the block output), ``"first"``, ``"all"`` (every call of a
  module called ``k > 1`` times gets its own entry ``name#0`` ... ``name#{k-1}``), or
  ``"error"``. Calls are counted per call of the root model; a tapped module called outside
  a root forward (``model.backbone(x)``) is recorded once per call.
- **Safety**: every output is reduced, detached and copied inside the hook, so a later
  in-place op (``ReLU(inplace=True)``) cannot change what was recorded.
- **Attention mask**: a ``[n, T]`` ``attention_mask`` given to the root model (keyword,
  positional, or inside a dict first argument as sentence-transformers does) or to the
  outermost sub-module whose ``forward`` takes one (the transformer inside a wrapper) is
  used for token pooling of ``[n, T, d]`` outputs; :meth:`LayerTaps.set_attention_mask`
  sets one explicitly. Row order is the order the model saw the samples (note that
  ``SentenceTransformer.encode`` sorts sentences by length; call the model on tokenized
  batches, e.g. through ``record_representations``, to keep your order).
- **Budget**: going past ``max_samples`` (rows per layer) or ``max_bytes`` (all stored
  features) raises :class:`TapBudgetExceeded` *before* storing the offending forward pass,
  so what was stored stays consistent.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from prh_lightning.representations import Representations
from prh_lightning.taps.outputs import OutputKey, describe, pick_tensor
from prh_lightning.taps.reduction import ReduceSpec, Reducer, is_channels_first, make_reducer
from prh_lightning.taps.selection import Selection, TapTarget, resolve_layers

REPEATED_POLICIES = ("last", "first", "all", "error")


class TapBudgetExceeded(RuntimeError):
    """Recording one more forward pass would pass ``max_samples`` or ``max_bytes``."""


class LayerTaps:
    """Context manager that records reduced features of selected layers.

    Args:
        model: any ``nn.Module`` (Hugging Face, timm, torchvision, LightningModule, ...).
        layers: ``"*"`` (every leaf module with a tensor output), ``"auto"`` (the family
            default from :func:`prh_lightning.families.default_layers`), names, globs
            (``"layer*.relu"``), module classes, predicates ``f(name, module)``, or a list of
            these; a name ending in ``":input"`` taps the module's input.
        reduce: ``"mean"``, ``"max"``, ``"cls"``/``"first"``, ``"last"``, ``"flatten"``,
            ``None`` (raw output), a callable ``f(x)`` / ``f(x, attention_mask)``, or ``"auto"``
            (family default); see :mod:`prh_lightning.taps.reduction`.
        output: key or index picking the tensor from tuple/dict/``ModelOutput`` outputs
            (default: ``last_hidden_state``, else the first tensor).
        dtype: cast features to this dtype (``None`` keeps the layer's dtype).
        device: where features are kept: ``"cpu"`` (default), ``"model"``/``None`` (the device
            the layer ran on) or any torch device.
        max_samples: most rows stored per layer.
        max_bytes: most bytes stored over all layers.
        repeated: policy for a module called several times in one forward pass
            (``"last"``, ``"first"``, ``"all"``, ``"error"``).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Selection | str = "*",
        reduce: ReduceSpec = "mean",
        output: OutputKey = None,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device | None = "cpu",
        max_samples: int | None = None,
        max_bytes: int | None = None,
        repeated: str = "last",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"LayerTaps needs an nn.Module, got {type(model).__name__}")
        if repeated not in REPEATED_POLICIES:
            raise ValueError(f"repeated={repeated!r}; use one of {REPEATED_POLICIES}")
        for label, limit in (("max_samples", max_samples), ("max_bytes", max_bytes)):
            if limit is not None and (not isinstance(limit, int) or limit <= 0):
                raise ValueError(f"{label} must be a positive int or None, got {limit!r}")
        if isinstance(layers, str) and layers == "auto":
            from prh_lightning.families import default_layers

            layers = default_layers(model)
        if isinstance(reduce, str) and reduce == "auto":
            from prh_lightning.families import default_reduce

            reduce = default_reduce(model)
        self.model = model
        self.targets: list[TapTarget] = resolve_layers(model, layers)
        self.reduce = reduce
        self._reducers: dict[str, Reducer] = {
            t.name: make_reducer(reduce, is_channels_first(t.module)) for t in self.targets
        }
        self.output = output
        self.dtype = dtype
        self.device = None if device is None or device == "model" else torch.device(device)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.repeated = repeated
        self.enabled = True
        #: names of layers skipped because their output held no tensor (non-explicit selections)
        self.skipped: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._mask_position = _attention_mask_position(model)
        self._manual_mask: torch.Tensor | None = None
        self.clear()

    # -- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> LayerTaps:
        self.attach()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def attach(self) -> LayerTaps:
        """Register the hooks (done by ``with``); for taps kept across training steps."""
        if self._handles:
            raise RuntimeError("these LayerTaps are already attached; call remove() first")
        try:
            root = self.model
            self._handles.append(root.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
            self._handles.append(root.register_forward_hook(self._root_post_hook))
            for module in _mask_taking_submodules(root):
                self._handles.append(module.register_forward_pre_hook(self._mask_pre_hook, with_kwargs=True))
            for target in self.targets:
                if target.tap_input:
                    handle = target.module.register_forward_pre_hook(self._input_hook(target), with_kwargs=True)
                else:
                    handle = target.module.register_forward_hook(self._output_hook(target))
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object registered; recorded features are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._in_pass = False
        self._pending = {}

    def clear(self) -> None:
        """Forget every recorded feature (hooks stay registered)."""
        self._store: dict[str, list[torch.Tensor]] = {}
        self._rows: dict[str, int] = {}
        self._bytes = 0
        self._pending: dict[Any, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._in_pass = False
        self._auto_mask: torch.Tensor | None = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[LayerTaps]:
        """Within this block forward passes are not recorded (hooks stay registered)."""
        previous, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = previous

    def set_attention_mask(self, mask: torch.Tensor | None) -> None:
        """Use ``mask`` (``[n, T]``, 1 = real token) for token pooling until reset with ``None``;
        it takes precedence over the mask captured from the model's forward arguments."""
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 2):
            raise ValueError(f"attention mask must be a [n, T] tensor, got {getattr(mask, 'shape', mask)!r}")
        self._manual_mask = mask

    # -- results -------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Names recorded so far, in execution order."""
        return list(self._store)

    @property
    def n(self) -> int:
        """Rows recorded in the layer with the most rows (0 before any forward pass)."""
        return max(self._rows.values(), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded features."""
        return self._bytes

    def features(self) -> dict[str, torch.Tensor]:
        """Ordered ``{layer: Tensor[n, d]}`` over every recorded forward call (``[n, ...]`` with
        ``reduce=None``).

        Raises:
            RuntimeError: nothing was recorded yet.
        """
        if not self._store:
            raise RuntimeError(
                "no features recorded: run the model forward inside `with LayerTaps(...)` "
                f"(recording enabled={self.enabled}); selected layers: {[t.name for t in self.targets][:8]}"
            )
        out: dict[str, torch.Tensor] = {}
        for name, chunks in self._store.items():
            if len(chunks) > 1:
                try:
                    chunks[:] = [torch.cat(chunks)]
                except RuntimeError:
                    shapes = sorted({tuple(c.shape[1:]) for c in chunks})
                    raise RuntimeError(
                        f"layer {name!r} gave outputs of different shapes across forward calls {shapes}; "
                        "use a reduce that gives fixed-size features (e.g. 'mean')"
                    ) from None
            out[name] = chunks[0]
        return out

    def representations(
        self, labels: torch.Tensor | None = None, sample_ids: list | None = None, **metadata: Any
    ) -> Representations:
        """The recorded features as :class:`~prh_lightning.representations.Representations`."""
        meta = {"reduce": self.reduce if isinstance(self.reduce, str) or self.reduce is None else "callable"}
        meta.update(metadata)
        return Representations(self.features(), sample_ids=sample_ids, labels=labels, metadata=meta)

    @staticmethod
    def available(model: nn.Module, example_input: Any) -> list[tuple[str, tuple[int, ...]]]:
        """``[(name, output shape)]`` of every sub-module whose output holds a tensor, in
        execution order (first call), from one forward pass on ``example_input`` (a tensor,
        a tuple of positional arguments, or a dict of keyword arguments). The pass runs in
        eval mode under ``no_grad``; training flags are restored."""
        seen: dict[str, tuple[int, ...]] = {}

        def hook_for(name: str):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                tensor = pick_tensor(output)
                if tensor is not None and name not in seen:
                    seen[name] = tuple(tensor.shape)

            return hook

        handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if n]
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                call_model(model, example_input)
        finally:
            for handle in handles:
                handle.remove()
            for module, mode in modes.items():
                module.training = mode
        return list(seen.items())

    # -- hooks ---------------------------------------------------------------------
    def _root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # A new pass always starts clean: leftovers of a pass that raised are dropped.
        self._in_pass = True
        self._pending = {}
        self._calls = {}
        mask = kwargs.get("attention_mask")
        if mask is None and args:
            if isinstance(args[0], Mapping):
                mask = args[0].get("attention_mask")
            elif self._mask_position is not None and len(args) > self._mask_position:
                mask = args[self._mask_position]
        self._auto_mask = mask if isinstance(mask, torch.Tensor) else None

    def _mask_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """An inner model (e.g. the transformer inside a wrapper) got a ``[n, T]`` attention mask."""
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            self._auto_mask = mask

    def _root_post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._in_pass:
            return
        self._in_pass = False
        pending, self._pending = self._pending, {}
        if not pending:
            return
        if self.repeated == "all":
            counts = self._calls
            pending = {
                (name if counts[name] == 1 else f"{name}#{k}"): value for (name, k), value in pending.items()
            }
        self._store_pass(pending)

    def _output_hook(self, target: TapTarget):
        name, explicit, reducer, key = target.name, target.explicit, self._reducers[target.name], self.output

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self.enabled:
                return
            tensor = output if isinstance(output, torch.Tensor) else pick_tensor(output, key)
            if tensor is None:
                self._no_tensor(name, explicit, output)
                return
            self._record(name, reducer, tensor)

        return hook

    def _input_hook(self, target: TapTarget):
        name, reducer = target.name, self._reducers[target.name]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.enabled:
                return
            tensor = pick_tensor(args) if args else None
            if tensor is None:
                tensor = kwargs.get("hidden_states")
                if not isinstance(tensor, torch.Tensor):
                    tensor = pick_tensor(list(kwargs.values()))
            if tensor is None:
                self._no_tensor(name, True, (args, kwargs))
                return
            self._record(name, reducer, tensor)

        return hook

    def _no_tensor(self, name: str, explicit: bool, output: Any) -> None:
        if explicit:
            raise TypeError(
                f"layer {name!r} returned {describe(output)}, which holds no tensor to record; "
                "pick an element with output=<key or index> or tap another layer"
            )
        self.skipped.add(name)

    def _record(self, name: str, reducer: Reducer, tensor: torch.Tensor) -> None:
        mask = self._manual_mask if self._manual_mask is not None else self._auto_mask
        with torch.no_grad():
            value = reducer(tensor.detach(), mask)
            value = value.to(device=self.device, dtype=self.dtype)
            if value.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                value = value.clone()  # never share memory with a tensor a later op may change in place
        if not self._in_pass:
            self._store_pass({name: value})
            return
        count = self._calls.get(name, 0)
        self._calls[name] = count + 1
        if self.repeated == "last":
            self._pending.pop(name, None)
            self._pending[name] = value
        elif self.repeated == "all":
            self._pending[(name, count)] = value
        elif count == 0:
            self._pending[name] = value
        elif self.repeated == "error":
            raise RuntimeError(
                f"layer {name!r} ran {count + 1} times in one forward pass; choose "
                "repeated='last', 'first' or 'all' to say which call to record"
            )

    def _store_pass(self, values: Mapping[str, torch.Tensor]) -> None:
        """Store one forward pass's features, after checking the budget for all of them."""
        if self.max_samples is not None:
            for name, value in values.items():
                rows = self._rows.get(name, 0) + value.shape[0]
                if rows > self.max_samples:
                    raise TapBudgetExceeded(
                        f"storing {value.shape[0]} more samples of layer {name!r} would give {rows} "
                        f"> max_samples={self.max_samples}; raise max_samples, call taps.clear(), "
                        "or feed fewer samples"
                    )
        if self.max_bytes is not None:
            extra = sum(v.numel() * v.element_size() for v in values.values())
            if self._bytes + extra > self.max_bytes:
                raise TapBudgetExceeded(
                    f"storing this forward pass ({extra} bytes) would give {self._bytes + extra} bytes "
                    f"> max_bytes={self.max_bytes}; raise max_bytes, tap fewer layers, use a stronger "
                    "reduce (e.g. 'mean' instead of 'flatten'/None), or call taps.clear()"
                )
        for name, value in values.items():
            self._store.setdefault(name, []).append(value)
            self._rows[name] = self._rows.get(name, 0) + value.shape[0]
            self._bytes += value.numel() * value.element_size()

    def __repr__(self) -> str:
        return (
            f"LayerTaps({type(self.model).__name__}, {len(self.targets)} targets, reduce={self.reduce!r}, "
            f"attached={self.attached}, n={self.n})"
        )


def _mask_taking_submodules(model: nn.Module) -> list[nn.Module]:
    """The outermost sub-modules whose ``forward`` has an ``attention_mask`` parameter (the
    transformer inside a LightningModule or sentence-transformers wrapper); inner layers,
    which get a 4-d additive mask, are skipped."""
    found: list[str] = []
    modules: list[nn.Module] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(outer + ".") for outer in found):
            continue
        try:
            takes_mask = "attention_mask" in inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            takes_mask = False
        if takes_mask:
            found.append(name)
            modules.append(module)
    return modules


def _attention_mask_position(model: nn.Module) -> int | None:
    """Index of ``attention_mask`` among the positional parameters of ``model.forward``."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("attention_mask") if "attention_mask" in params else None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple/list; a mapping goes in as
    ``model(**x)`` when ``forward`` takes its keys as keywords (Hugging Face models), else as
    one argument ``model(x)`` (sentence-transformers' ``forward(features: dict)``)."""
    if isinstance(inputs, Mapping):
        return model(**inputs) if _takes_keywords(model, inputs) else model(inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _takes_keywords(model: nn.Module, inputs: Mapping[str, Any]) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    required = [
        name
        for name, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if any(name not in inputs for name in required):
        return False  # e.g. forward(self, input: dict, **kwargs)
    return any(p.kind == p.VAR_KEYWORD for p in params.values()) or all(key in params for key in inputs)
