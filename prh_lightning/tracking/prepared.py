"""Per-layer prepared states (a metric plan's ``prepare``: conditioned Grams, neighbour lists)
kept across the matrices of a check and across checks.

One check scores the model's layers against ``self``, ``self_initial``, ``self_previous`` and each
reference; without a cache each of those matrices would prepare the model's layers again, and
the snapshots would be prepared again at every check although they never change. A
:class:`PreparedStates` cache prepares each layer tensor once per metric and options and keeps
the states of the tensors the tracker still holds (:meth:`PreparedStates.retain`): the current
features become ``self_previous`` at the next check, and the first check's features stay
``self_initial`` for the whole run.

A state is keyed by the tensor object (held by the cache, so its ``id`` cannot be reused while
cached) and its in-place version counter, so a tensor modified in place is prepared again
(inference tensors have no counter; the tracker never modifies its features in place).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from prh_lightning.functional._plan import LayerContext, MetricPlan, prepare_layers

PREPARE_KEYS = ("normalize", "clip_quantile", "block_rows", "max_memory")


def split_options(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(preparation, metric)``: the keyword arguments of ``alignment_matrix`` that condition the
    layers (``normalize`` default True, ``clip_quantile``, ``block_rows``, ``max_memory``) and the
    metric's own options.

    >>> split_options({"k": 5, "normalize": False})
    ({'normalize': False, 'clip_quantile': None, 'block_rows': None, 'max_memory': None}, {'k': 5})
    """
    prep = {"normalize": True, "clip_quantile": None, "block_rows": None, "max_memory": None}
    prep.update({key: kwargs[key] for key in PREPARE_KEYS if key in kwargs})
    return prep, {key: value for key, value in kwargs.items() if key not in PREPARE_KEYS}


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    try:
        hash(value)
    except TypeError:
        return ("object", id(value))
    return value


def _version(x: torch.Tensor) -> int | None:
    """The in-place version counter (inference tensors, made under ``torch.inference_mode``, have none)."""
    return None if x.is_inference() else x._version


class PreparedStates:
    """Prepared states of layer tensors, one per (tensor, metric plan, options, compute dtype).

    >>> import torch
    >>> from prh_lightning.functional._plan import get_plan
    >>> cache = PreparedStates()
    >>> x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    >>> plan = get_plan("mutual_knn")
    >>> a = cache.state(plan, plan.bind({"k": 5}), x, "l", {"normalize": True}, torch.float32)
    >>> b = cache.state(plan, plan.bind({"k": 5}), x, "l", {"normalize": True}, torch.float32)
    >>> a is b, len(cache)
    (True, 1)
    >>> cache.retain([]); len(cache)
    0
    """

    def __init__(self) -> None:
        self._states: dict[tuple, tuple[torch.Tensor, int, Any]] = {}
        self._finite: dict[int, tuple[torch.Tensor, int | None, bool]] = {}

    def __len__(self) -> int:
        return len(self._states)

    def state(
        self,
        plan: MetricPlan,
        options: Mapping[str, Any],
        x: torch.Tensor,
        name: str,
        prep: Mapping[str, Any],
        dtype: torch.dtype,
        layers: int = 1,
    ) -> Any:
        """The prepared state of layer ``x [n, d]`` (computed on a miss; a ``ValueError`` of the
        plan, e.g. constant features, propagates and nothing is cached). ``dtype``: the compute
        dtype of the matrix (float64 when any side is float64); ``prep``: the conditioning options of
        :func:`split_options` (missing ones take their defaults); ``layers``: how many layers share
        the working-memory budget (block sizes only)."""
        prep = {**split_options({})[0], **prep}
        # the kind of state: the plan's name and its prepare function's qualified name (not the
        # plan object: the large-n linear CKA plan is built per call, with a different state type)
        kind = (plan.name, getattr(plan.prepare, "__module__", ""), getattr(plan.prepare, "__qualname__", ""))
        key = (id(x), kind, _freeze(options), _freeze(prep), dtype)
        hit = self._states.get(key)
        if hit is not None and hit[0] is x and hit[1] == _version(x):
            return hit[2]
        ctx = LayerContext(dtype, prep["block_rows"], x.shape[0], layers, x.device, prep["max_memory"])
        (state,) = prepare_layers(plan, [x], [name], dict(options), prep["normalize"], prep["clip_quantile"], ctx)
        self._states[key] = (x, _version(x), state)
        return state

    def all_finite(self, x: torch.Tensor) -> bool:
        """Whether every entry of ``x`` is finite, computed once per tensor (and in-place version):
        a check scores the same layers in several matrices, and the snapshots for a whole run."""
        hit = self._finite.get(id(x))
        if hit is not None and hit[0] is x and hit[1] == _version(x):
            return hit[2]
        finite = bool(torch.isfinite(x).all())
        self._finite[id(x)] = (x, _version(x), finite)
        return finite

    def retain(self, tensors: Iterable[torch.Tensor]) -> None:
        """Forget the states of every tensor not in ``tensors`` (the ones the tracker still holds)."""
        live = {id(t) for t in tensors}
        self._states = {key: value for key, value in self._states.items() if id(value[0]) in live}
        self._finite = {key: value for key, value in self._finite.items() if key in live}

    def clear(self) -> None:
        self._states.clear()
        self._finite.clear()
