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
- **Padding mask**: a ``[n, T]`` mask given to the root model (keyword, positional, or inside
  a dict first argument as sentence-transformers does) or to the outermost sub-module whose
  ``forward`` takes one (the transformer inside a wrapper, called with keywords or
  positionally) is used for token pooling of ``[n, T, d]`` outputs. Its argument is called
  ``attention_mask`` unless ``mask_key=`` names another (``"src_key_padding_mask"``,
  ``"padding_mask"``, ...); a mask whose name contains ``padding`` marks padding with
  ``True``/1 (PyTorch's convention), any other marks real tokens with 1 (Hugging Face's);
  ``mask_is_padding=`` overrides. :meth:`LayerTaps.set_attention_mask` sets one explicitly. Row order is the order the model saw the samples (note that
  ``SentenceTransformer.encode`` sorts sentences by length; call the model on tokenized
  batches, e.g. through ``record_representations``, to keep your order).
- **Problems never break the model's forward**: a layer whose output holds no tensor or is a
  scalar (an auxiliary loss), or whose reduction fails, is skipped inside the hook. At
  :meth:`LayerTaps.features` a layer named exactly (``layers="fc"``) that had such a problem,
  or never ran, raises; one chosen by ``"*"``, a glob, a type or a predicate is left out with
  one warning (:attr:`LayerTaps.skipped` says why). Layers that recorded different numbers of
  rows (a layer that ran on only some batches) raise, with the counts, rather than be scored
  on a subset of the samples.
- **torch.compile**: a compiled model (``torch.compile(model)``, ``model.compile()``, or a
  LightningModule compiled by the Trainer) is tapped through its original module and runs
  eagerly while the taps are attached, so its compiled graphs are neither broken by the hooks
  nor recompiled (see :mod:`prh_lightning.taps.compiled`).
- **Budget**: going past ``max_samples`` (rows per layer) or ``max_bytes`` (all stored
  features) raises :class:`TapBudgetExceeded` *before* storing the offending forward pass,
  so what was stored stays consistent.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from prh_lightning.representations import Representations
from prh_lightning.taps.outputs import OutputKey, describe, pick_tensor
from prh_lightning.taps.compiled import eager, unwrap_compiled
from prh_lightning.taps.reduction import (
    ReduceSpec,
    Reducer,
    _CHANNEL_FIRST_TYPES,
    is_channels_first,
    is_sequence_first,
    make_reducer,
)
from prh_lightning.taps.selection import Selection, TapTarget, is_eval_identity, resolve_layers

REPEATED_POLICIES = ("last", "first", "all", "error")


class TapBudgetExceeded(RuntimeError):
    """Recording one more forward pass would pass ``max_samples`` or ``max_bytes``."""


class LayerTaps:
    """Context manager that records reduced features of selected layers.

    Args:
        model: any ``nn.Module`` (Hugging Face, timm, torchvision, LightningModule, a
            ``torch.compile``\\ d model, ...).
        layers: ``"*"`` (every leaf module a user would compare, see
            :func:`~prh_lightning.taps.selection.default_leaves`), ``"auto"`` (the family default
            from :func:`prh_lightning.families.default_layers`), names, globs (``"layer*.relu"``),
            module classes, predicates ``f(name, module)``, or a list of these; a name ending in
            ``":input"`` taps the module's input.
        reduce: ``"mean"``, ``"max"``, ``"cls"``/``"first"``, ``"last"``, ``"flatten"``,
            ``None`` (raw output), a callable ``f(x)`` / ``f(x, attention_mask)``, or ``"auto"``
            (family default); see :mod:`prh_lightning.taps.reduction`.
        output: key or index picking the tensor from tuple/dict/``ModelOutput`` outputs
            (default: ``last_hidden_state``, else the first tensor).
        dtype: cast features to this dtype (``None`` keeps the layer's dtype; the default
            float32 also stores bf16/fp16 models' features as float32).
        device: where features are kept: ``"cpu"`` (default), ``"model"``/``None`` (the device
            the layer ran on) or any torch device.
        max_samples: most rows stored per layer.
        max_bytes: most bytes stored over all layers.
        repeated: policy for a module called several times in one forward pass
            (``"last"``, ``"first"``, ``"all"``, ``"error"``).
        mask_key: name (or names) of the padding-mask argument or dict key, looked up in the
            root model's and its outermost mask-taking sub-module's arguments.
        mask_is_padding: ``True`` if the mask marks padding with ``True``/1 (PyTorch's
            ``*_key_padding_mask``), ``False`` if it marks real tokens (Hugging Face's
            ``attention_mask``); ``None``: ``True`` exactly when the key contains ``"padding"``.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(5, 4)
        >>> with LayerTaps(net) as taps:   # "*": the dropout is left out
        ...     _ = net(x)
        >>> {name: tuple(f.shape) for name, f in taps.features().items()}
        {'0': (5, 8), '2': (5, 8), '3': (5, 2)}
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
        mask_key: str | tuple[str, ...] = "attention_mask",
        mask_is_padding: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"LayerTaps needs an nn.Module, got {type(model).__name__}")
        if repeated not in REPEATED_POLICIES:
            raise ValueError(f"repeated={repeated!r}; use one of {REPEATED_POLICIES}")
        for label, limit in (("max_samples", max_samples), ("max_bytes", max_bytes)):
            if limit is not None and (not isinstance(limit, int) or limit <= 0):
                raise ValueError(f"{label} must be a positive int or None, got {limit!r}")
        keys = (mask_key,) if isinstance(mask_key, str) else tuple(mask_key)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"mask_key must be a non-empty string or tuple of strings, got {mask_key!r}")
        #: the module called by the user (a compiled wrapper stays here; hooks go on :attr:`model`)
        self.called = model
        model = unwrap_compiled(model)
        if isinstance(layers, str) and layers == "auto":
            from prh_lightning.families import default_layers

            layers = default_layers(model)
        if isinstance(reduce, str) and reduce == "auto":
            from prh_lightning.families import default_reduce

            reduce = default_reduce(model)
        self.model = model
        self.targets: list[TapTarget] = resolve_layers(model, layers)
        self.reduce = reduce
        self._reducers: dict[str, tuple[Reducer, Reducer]] = {
            t.name: (
                make_reducer(reduce, is_channels_first(t.module), is_sequence_first(t.module)),
                make_reducer(reduce, True),
            )
            for t in self.targets
        }
        self.output = output
        self.dtype = dtype
        self.device = None if device is None or device == "model" else torch.device(device)
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.repeated = repeated
        self.mask_keys = keys
        self.mask_is_padding = mask_is_padding
        self.enabled = True
        #: layers left out, with the reason: ``{name: why}`` (a non-tensor or scalar output, a
        #: failed reduction, never ran); only layers not named exactly end up here
        self.skipped: dict[str, str] = {}
        self._handles: list[RemovableHandle] = []
        self._eager: contextlib.ExitStack | None = None
        self._mask_position = _mask_position(model, keys)
        self._manual_mask: torch.Tensor | None = None
        # 3-d outputs of conv-like modules are [n, C, L]; follow them through shape-preserving modules
        self._track_channels = any(_makes_1d_channels(m) for m in model.modules())
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
        """Register the hooks (done by ``with``); for taps kept across training steps.

        While attached, a compiled model runs eagerly (see :mod:`prh_lightning.taps.compiled`)."""
        if self._handles:
            raise RuntimeError("these LayerTaps are already attached; call remove() first")
        try:
            root = self.model
            self._eager = contextlib.ExitStack()
            self._eager.enter_context(eager(self.called))
            self._handles.append(root.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
            self._handles.append(root.register_forward_hook(self._root_post_hook))
            for module, position in _mask_taking_submodules(root, self.mask_keys):
                hook = self._mask_pre_hook(position)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            tapped = {id(t.module) for t in self.targets if not t.tap_input}
            if self._track_channels:
                for module in root.modules():
                    if module is not root and id(module) not in tapped and _passes_channels(module):
                        self._handles.append(module.register_forward_hook(self._channels_hook))
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
        if self._eager is not None:
            self._eager.close()
            self._eager = None
        self._in_pass = False
        self._pending = {}
        self._channel_outputs = set()
        self._last_mean = None

    def clear(self) -> None:
        """Forget every recorded feature (hooks stay registered)."""
        self._store: dict[str, list[torch.Tensor]] = {}
        self._rows: dict[str, int] = {}
        self._bytes = 0
        self._pending: dict[Any, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._in_pass = False
        self._auto_mask: torch.Tensor | None = None
        self._channel_outputs: set[tuple] = set()
        # (weak ref to the last output whose spatial mean was taken, its version, that mean): an
        # eval BatchNorm fed that very tensor, unchanged, gets its mean from it (affine per channel)
        self._last_mean: tuple | None = None
        self._passes = 0  # completed root forward passes
        self._layer_passes: dict[str, int] = {}  # root passes in which a stored layer recorded
        self._fired: set[str] = set()  # targets whose hook ran with a usable output
        self._problems: dict[str, tuple[type[Exception], str]] = {}  # target -> (error type, why)
        self._warned: set[str] = set()

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
            TypeError / ValueError: a layer named exactly returned no tensor / a scalar.
            RuntimeError: nothing was recorded yet; a layer named exactly never ran or its
                reduction failed; layers recorded different numbers of rows.
        """
        self._check_targets()
        if not self._store:
            raise RuntimeError(
                "no features recorded: run the model forward inside `with LayerTaps(...)` "
                f"(recording enabled={self.enabled}); selected layers: {[t.name for t in self.targets][:8]}"
                + (f"; skipped: {dict(list(self.skipped.items())[:8])}" if self.skipped else "")
            )
        left_out = set(self.skipped)
        for name in [k for k in self._store if k in left_out or _base_name(k) in left_out]:
            self._bytes -= sum(c.numel() * c.element_size() for c in self._store.pop(name))
            self._rows.pop(name, None)
        if not self._store:
            raise RuntimeError(f"no features recorded: every tapped layer was left out: {self.skipped}")
        self._check_rows()
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

    def _check_targets(self) -> None:
        """Raise for exactly named layers with a problem or that never ran; warn (once) about
        the others, which are left out."""
        for target in self.targets:
            name = target.name
            if name in self._fired and name not in self._problems:
                continue
            if name in self._problems:
                error, why = self._problems[name]
            elif self._passes == 0 and not self._store:
                continue  # nothing ran at all: features() says so
            else:
                error, why = RuntimeError, "never ran during the recorded forward passes" + _never_ran_hint(
                    self.model, target.module_name
                )
            if target.explicit:
                raise error(f"layer {name!r} {why}")
            self.skipped[name] = why
        self._warn_skipped()

    def _warn_skipped(self) -> None:
        fresh = {k: v for k, v in self.skipped.items() if k not in self._warned}
        if fresh:
            self._warned.update(fresh)
            listed = "; ".join(f"{k!r} {v}" for k, v in list(fresh.items())[:6])
            more = f" (and {len(fresh) - 6} more)" if len(fresh) > 6 else ""
            warnings.warn(f"LayerTaps left out {len(fresh)} layer(s): {listed}{more}", stacklevel=4)

    def _check_rows(self) -> None:
        """Every layer must hold one row per sample. The expected count is the largest among
        layers named exactly, else the count most layers share (ties: the larger); a layer named
        exactly with another count raises, any other layer is left out with a warning."""
        counts = {name: self._rows.get(name, 0) for name in self._store}
        if len(set(counts.values())) <= 1:
            return
        explicit = {t.name for t in self.targets if t.explicit}
        named = [rows for name, rows in counts.items() if _base_name(name) in explicit]
        if named:
            expected = max(named)
        else:
            tally = Counter(counts.values())
            expected = max(tally, key=lambda rows: (tally[rows], rows))
        odd = {name: rows for name, rows in counts.items() if rows != expected}
        reference = next(name for name, rows in counts.items() if rows == expected)

        def detail(name: str, rows: int) -> str:
            passes = f" from {self._layer_passes.get(name, 0)} of {self._passes} forward passes" if self._passes else ""
            return f"{rows} rows{passes}"

        if any(_base_name(name) in explicit for name in odd):
            details = ", ".join(f"{name!r}: {detail(name, rows)}" for name, rows in list(odd.items())[:6])
            raise RuntimeError(
                f"layers recorded different numbers of rows ({details}; {reference!r} and others: {expected} rows). "
                "A layer that runs on only some batches cannot be compared sample by sample: tap layers that "
                "run on every batch. (A layer whose output is sequence-first [T, n, d], or that sees the tokens "
                "flattened into rows, records more rows per batch: give reduce= a callable.)"
            )
        for name, rows in odd.items():
            self.skipped[name] = f"recorded {detail(name, rows)}, other layers {expected}"
            self._bytes -= sum(c.numel() * c.element_size() for c in self._store.pop(name))
            self._rows.pop(name, None)
        self._warn_skipped()

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

        called, model = model, unwrap_compiled(model)
        handles = [m.register_forward_hook(hook_for(n)) for n, m in model.named_modules() if n]
        modes = {m: m.training for m in model.modules()}
        try:
            model.eval()
            with torch.no_grad(), eager(called):
                call_model(called, example_input)
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
        self._channel_outputs = set()
        self._last_mean = None
        mask = _find_mask(args, kwargs, self.mask_keys, self._mask_position, from_mapping=True)
        self._auto_mask = self._as_keep_mask(mask)

    def _mask_pre_hook(self, position: int | None):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            """An inner model (e.g. the transformer inside a wrapper) got a ``[n, T]`` mask."""
            mask = self._as_keep_mask(_find_mask(args, kwargs, self.mask_keys, position, from_mapping=False))
            if mask is not None:
                self._auto_mask = mask

        return hook

    def _as_keep_mask(self, found: tuple[str, torch.Tensor] | None) -> torch.Tensor | None:
        """The mask with 1 = real token, or ``None`` if ``found`` is not a ``[n, T]`` tensor."""
        if found is None:
            return None
        key, mask = found
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
            return None
        padding = self.mask_is_padding if self.mask_is_padding is not None else "padding" in key
        if padding:
            return mask == 0 if mask.dtype != torch.bool else ~mask
        return mask

    def _root_post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._channel_outputs = set()
        if not self._in_pass:
            return
        self._in_pass = False
        pending, self._pending = self._pending, {}
        if not self.enabled:
            return
        self._passes += 1
        if not pending:
            return
        if self.repeated == "all":
            counts = self._calls
            pending = {
                (name if counts[name] == 1 else f"{name}#{k}"): value for (name, k), value in pending.items()
            }
        self._store_pass(pending)

    def _channels_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Note 3-d ``[n, C, L]`` outputs of conv-like modules, and of shape-preserving modules
        applied to them, so a tapped ``ReLU`` after a ``Conv1d`` pools over ``L``."""
        if isinstance(output, torch.Tensor) and output.ndim == 3:
            if isinstance(module, _CHANNEL_FIRST_TYPES) or self._channels_input(args, output):
                self._channel_outputs.add(_tensor_key(output))

    def _channels_input(self, args: tuple, output: torch.Tensor) -> bool:
        if not self._channel_outputs or not args or not isinstance(args[0], torch.Tensor):
            return False
        return args[0].shape == output.shape and _tensor_key(args[0]) in self._channel_outputs

    def _output_hook(self, target: TapTarget):
        name, reducers, key = target.name, self._reducers[target.name], self.output
        static_channels = is_channels_first(target.module)
        affine_mean = self.reduce == "mean" and _is_eval_batch_norm(target.module)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self.enabled:
                return
            try:
                tensor = output if isinstance(output, torch.Tensor) else pick_tensor(output, key)
            except (KeyError, IndexError) as err:
                self._problem(name, KeyError, f"output: {err}")
                return
            if tensor is None:
                self._no_tensor(name, output)
                return
            reducer = reducers[0]
            if self._track_channels and tensor.ndim == 3:
                if static_channels:
                    self._channel_outputs.add(_tensor_key(tensor))
                elif self._channels_input(args, tensor):
                    self._channel_outputs.add(_tensor_key(tensor))
                    reducer = reducers[1]
            if affine_mean and args and tensor.ndim >= 4:
                reducer = self._batch_norm_shortcut(module, args[0], tensor) or reducer
            self._record(name, reducer, tensor)

        return hook

    def _batch_norm_shortcut(self, module: nn.Module, inp: Any, out: torch.Tensor) -> Reducer | None:
        """For an eval ``BatchNorm`` whose input is the tensor whose spatial mean was just
        recorded, unchanged since (same object, same version counter; inference-mode tensors,
        which have no version counter, are never remembered): the mean of its output from that
        mean (``BN`` is affine per channel), without reading the output map."""
        last = self._last_mean
        if last is None or not isinstance(inp, torch.Tensor) or last[0]() is not inp or inp._version != last[1]:  # noqa: SLF001
            return None
        mean = last[2]
        if mean.dtype != out.dtype or mean.device != out.device or module.running_mean.dtype != mean.dtype:
            return None
        return lambda x, mask: _batch_norm_mean(module, mean)

    def _input_hook(self, target: TapTarget):
        name, reducer = target.name, self._reducers[target.name][0]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.enabled:
                return
            tensor = pick_tensor(args) if args else None
            if tensor is None:
                tensor = kwargs.get("hidden_states")
                if not isinstance(tensor, torch.Tensor):
                    tensor = pick_tensor(list(kwargs.values()))
            if tensor is None:
                self._no_tensor(name, (args, kwargs))
                return
            self._record(name, reducer, tensor)

        return hook

    def _problem(self, name: str, error: type[Exception], why: str) -> None:
        """Remember why ``name`` cannot be recorded; :meth:`features` raises or warns. Never
        raises here, inside the model's forward."""
        self._problems.setdefault(name, (error, why))

    def _no_tensor(self, name: str, output: Any) -> None:
        self._problem(
            name,
            TypeError,
            f"returned {describe(output)}, which holds no tensor to record; pick an element with "
            "output=<key or index> or tap another layer",
        )

    def _record(self, name: str, reducer: Reducer, tensor: torch.Tensor) -> None:
        if tensor.ndim == 0:
            self._problem(name, ValueError, "returned a 0-dim tensor (a scalar such as an auxiliary loss); "
                          "there is no batch dimension to record")
            return
        mask = self._manual_mask if self._manual_mask is not None else self._auto_mask
        try:
            with torch.no_grad():
                value = reducer(tensor.detach(), mask)
                if self.reduce == "mean" and tensor.ndim >= 4 and value.shape == tensor.shape[:2] and not tensor.is_inference():
                    self._last_mean = (weakref.ref(tensor), tensor._version, value)
                value = value.to(device=self.device, dtype=self.dtype)
                if value.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                    value = value.clone()  # never share memory with a tensor a later op may change in place
        except Exception as err:  # a reduction that does not fit this output: never break the forward
            self._problem(name, RuntimeError, f"could not be reduced (output shape {tuple(tensor.shape)}): {err}")
            return
        self._fired.add(name)
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
        values = {name: value for name, value in values.items() if name not in self._problems}
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
            self._layer_passes[name] = self._layer_passes.get(name, 0) + 1
            self._bytes += value.numel() * value.element_size()

    def __repr__(self) -> str:
        return (
            f"LayerTaps({type(self.model).__name__}, {len(self.targets)} targets, reduce={self.reduce!r}, "
            f"attached={self.attached}, n={self.n})"
        )


def _base_name(name: str) -> str:
    """``"lin"`` for ``"lin#1"`` (``repeated="all"``)."""
    return name.rsplit("#", 1)[0]


def _makes_1d_channels(module: nn.Module) -> bool:
    """A conv-like module that makes ``[n, C, L]`` outputs (``Conv1d``, ``BatchNorm1d``, ``MaxPool1d``, ...)."""
    return isinstance(module, _CHANNEL_FIRST_TYPES) and type(module).__name__.endswith("1d")


def _passes_channels(module: nn.Module) -> bool:
    """Modules through which a ``[n, C, L]`` layout is followed: conv-like modules (which make
    it), and shape-preserving element-wise leaves (activations, dropout, identity)."""
    if isinstance(module, _CHANNEL_FIRST_TYPES):
        return True
    if any(True for _ in module.children()):
        return False
    return is_eval_identity(module) or type(module).__module__ == "torch.nn.modules.activation"


def _is_eval_batch_norm(module: nn.Module) -> bool:
    """A BatchNorm that normalises with its running statistics (eval mode, stats tracked)."""
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and not module.training
        and getattr(module, "running_mean", None) is not None
        and getattr(module, "running_var", None) is not None
    )


def _batch_norm_mean(module: nn.Module, mean: torch.Tensor) -> torch.Tensor:
    """Spatial mean ``[n, C]`` of an eval BatchNorm's output from that of its input ``mean [n, C]``:
    ``(mean - running_mean) / sqrt(running_var + eps) * weight + bias``."""
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    out = (mean - module.running_mean) * scale
    return out + module.bias if module.bias is not None else out


def _tensor_key(x: torch.Tensor) -> tuple:
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride())


def _never_ran_hint(model: nn.Module, module_name: str) -> str:
    parent_name, _, leaf = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention) and leaf == "out_proj":
        return (
            f"; nn.MultiheadAttention applies out_proj through its weights, never as a module: tap "
            f"{parent_name!r}, whose first output is out_proj's output"
        )
    return (
        " (a branch the model skipped, a module used only through its weights, or a fused fast path); "
        "tap a module that runs on every batch"
    )


def _find_mask(
    args: tuple, kwargs: dict, keys: tuple[str, ...], position: int | None, from_mapping: bool
) -> tuple[str, Any] | None:
    """``(key, value)`` of the first mask argument found by keyword, position, or (for the
    root) inside a dict first argument."""
    for key in keys:
        if kwargs.get(key) is not None:
            return key, kwargs[key]
    if position is not None and len(args) > position and args[position] is not None:
        return keys[0], args[position]
    if from_mapping and args and isinstance(args[0], Mapping):
        for key in keys:
            if args[0].get(key) is not None:
                return key, args[0][key]
    return None


def _forward_params(module: nn.Module) -> list[str] | None:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None


def _mask_position(model: nn.Module, keys: tuple[str, ...]) -> int | None:
    """Index of the first mask key among the positional parameters of ``model.forward``."""
    params = _forward_params(model) or []
    return next((params.index(key) for key in keys if key in params), None)


def _mask_taking_submodules(model: nn.Module, keys: tuple[str, ...]) -> list[tuple[nn.Module, int | None]]:
    """``(module, position of its mask parameter)`` for the outermost sub-modules whose
    ``forward`` takes one of ``keys`` (the transformer inside a LightningModule or
    sentence-transformers wrapper); inner layers, which get a 4-d additive mask, are skipped."""
    found: list[str] = []
    modules: list[tuple[nn.Module, int | None]] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(outer + ".") for outer in found):
            continue
        params = _forward_params(module) or []
        if any(key in params for key in keys):
            found.append(name)
            modules.append((module, _mask_position(module, keys)))
    return modules


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
