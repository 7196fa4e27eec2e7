"""One home per metric: a :class:`MetricPlan` says what is computed once per layer, how layer
pairs are scored from that, the metric's range and how it may be resampled. Every entry point
(``functional.<metric>``, ``alignment_matrix`` / ``best_alignment``, the Metric classes,
``permutation_test`` / ``bootstrap_ci`` / ``calibrate``, callbacks and recipes) runs through
:func:`score_layers`, so the same data gives the same number everywhere.

A user metric registered with :func:`register_metric` gets layer x layer matrices,
permutation nulls and calibration for free (scored pair by pair).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ._numerics import compute_dtype, condition, input_eps
from ._validation import check_features

__all__ = ["MetricPlan", "PLANS", "register_plan", "register_metric", "get_plan", "score_layers", "score_pair"]

_BUDGET = 2**26  # elements per streamed block (256 MB in float32)


@dataclass(frozen=True)
class MetricPlan:
    """How one metric is computed.

    Attributes:
        name: registry key.
        defaults: the metric's own options and their defaults (``{"k": 10}``).
        prepare: ``prepare(x64 [n, d], ctx, **options) -> state``: per-layer work on the
            conditioned float64 features (``ctx`` carries the compute dtype, the input's
            precision, a name for messages and the memory policy).
        pairs: ``pairs(states_x, states_y, **options) -> Tensor[Lx, Ly]`` (float64).
        bounds: ``bounds(**options) -> (low, high)``: the metric's range (``high`` may be None).
        permute: ``permute(state, perm) -> state`` with samples reordered (row ``i`` <- sample
            ``perm[i]``) without recomputing the per-layer work; ``None``: prepare again.
        resampling: ``"groups"`` (bootstrap copies of a sample are kept out of each other's
            neighbour lists: pass ``groups=`` to prepare), ``"jackknife"`` (no honest bootstrap:
            kernel entries of copies inflate the score; ``bootstrap_ci`` refuses) or ``"plain"``.
        scale_invariant: the score does not change when a layer is multiplied by a constant.
        prepare_fast: optional ``prepare_fast(x [n, d], ctx, **options) -> state | None``: the same
            state as ``prepare`` straight from the input as given (called only when the compute
            dtype is float32 and nothing is clipped; ``ctx.normalize`` says whether rows are to be
            L2-normalised), or ``None`` to take the float64 route (e.g.
            :func:`._numerics.centre_float32` declined).
        null: optional fast path ``null(states_x, states_y, perms [P, n], **options) -> [P, Lx, Ly]``
            (float64): every layer pair with all layers of ``y`` permuted by each row of ``perms``.
            Default: :func:`permuted_scores` (``permute`` then ``pairs``, per permutation).
    """

    name: str
    defaults: dict[str, Any]
    prepare: Callable[..., Any]
    pairs: Callable[..., torch.Tensor]
    bounds: Callable[..., tuple[float, float | None]]
    permute: Callable[[Any, torch.Tensor], Any] | None = None
    resampling: str = "plain"
    scale_invariant: bool = True
    option_checks: dict[str, Callable[[Any], Any]] = field(default_factory=dict)
    null: Callable[..., torch.Tensor] | None = None
    prepare_fast: Callable[..., Any] | None = None

    def bind(self, metric_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Options with defaults filled in; a clear ``TypeError`` for an unknown option."""
        unknown = sorted(set(metric_kwargs) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"bad options for metric {self.name!r}: unexpected {unknown}; it takes {sorted(self.defaults) or 'none'}"
            )
        options = dict(self.defaults, **metric_kwargs)
        for key, check in self.option_checks.items():
            check(options[key])
        return options


PLANS: dict[str, MetricPlan] = {}


def register_plan(plan: MetricPlan) -> MetricPlan:
    """Add (or replace) a plan in :data:`PLANS`; returns it."""
    PLANS[plan.name] = plan
    return plan


def get_plan(metric: str | MetricPlan) -> MetricPlan:
    """The plan for a registered name (or the plan itself)."""
    if isinstance(metric, MetricPlan):
        return metric
    if not isinstance(metric, str) or metric not in PLANS:
        raise ValueError(
            f"unknown metric {metric!r}; choose one of {sorted(PLANS)} or register one with "
            "prh_lightning.functional.register_metric(name, fn)"
        )
    return PLANS[metric]


class LayerContext:
    """What a plan's ``prepare`` may need besides the features: compute dtype, the input's
    precision, a name for messages and the memory policy.

    Memory policy: ``block_rows`` (rows per streamed block, as given) or ``max_memory`` (a
    budget in bytes for the working memory that grows faster than ``n * d``: streamed
    ``[rows, n]`` blocks, the reusable whole-Gram buffer, dense ``[n, n]`` lookup maps). With
    neither, blocks of about 256 MB and a whole Gram up to 512 MB. Per-layer copies of the
    features (float64 during preparation, ``O(n d)``) come on top of the budget.
    """

    def __init__(
        self,
        dtype: torch.dtype,
        block_rows: int | None,
        n: int,
        layers: int,
        device: torch.device,
        max_memory: int | str | None = None,
    ):
        self.dtype, self.block_rows, self.device = dtype, block_rows, device
        self.n = n
        self.budget = parse_memory(max_memory)
        self.rows = _rows_per_block(n, 1, block_rows, self.budget, torch.finfo(dtype).bits // 8)
        self.n_layers = layers
        self.input_eps = float(torch.finfo(dtype).eps)
        self.name = "x"
        self.normalize = True  # whether rows are L2-normalised before the plan sees them (set per call)
        self._gram: torch.Tensor | None = None

    @property
    def itemsize(self) -> int:
        """Bytes per element of the compute dtype."""
        return torch.finfo(self.dtype).bits // 8

    def block(self, width: int, bytes_per_entry: int) -> int:
        """Rows of a ``[rows, width]`` working block costing ``bytes_per_entry`` per entry
        (temporaries included): ``block_rows`` when given, else as many as the budget allows
        (without a budget: about 256 MB of compute-dtype entries)."""
        return _rows_per_block(self.n, 1, self.block_rows, self.budget, bytes_per_entry, width)

    def fits(self, nbytes: int) -> bool:
        """May one allocation of ``nbytes`` be made at once (half the budget at most)?
        Without a budget: up to 512 MB."""
        limit = _WHOLE_BYTES if self.budget is None else self.budget // 2
        return nbytes <= limit

    def gram(self, n: int) -> torch.Tensor | None:
        """A reusable ``[n, n]`` scratch buffer (compute dtype), or None when memory asks to stream."""
        if self.block_rows is not None:
            return None
        if self.budget is None and n * n > _WHOLE_GRAM or self.budget is not None and not self.fits(n * n * self.itemsize):
            return None
        if self._gram is None:
            self._gram = torch.empty(n, n, dtype=self.dtype, device=self.device)
        return self._gram


_WHOLE_GRAM = 2**27  # without a budget: a whole [n, n] Gram up to n = 11,585 (512 MB in float32)
_WHOLE_BYTES = 2**29  # without a budget: one allocation up to 512 MB
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(value: int | str | None) -> int | None:
    """Bytes of a memory budget: an int, or a string such as ``"512MB"``, ``"4GB"``, ``"1.5GiB"``
    (decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB); ``None`` stays ``None``.

    >>> parse_memory("4GB"), parse_memory("512 MiB"), parse_memory(1000)
    (4000000000, 536870912, 1000)
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"max_memory must be bytes (int) or a string like '4GB', got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        digits = text.rstrip("KMGTIB")
        unit = text[len(digits):]
        if unit not in _UNITS or not digits:
            raise ValueError(f"max_memory must look like '512MB', '4GB' or '2GiB', got {value!r}")
        try:
            number = int(float(digits) * _UNITS[unit])
        except ValueError:
            raise ValueError(f"max_memory must look like '512MB', '4GB' or '2GiB', got {value!r}") from None
    else:
        raise TypeError(f"max_memory must be bytes (int) or a string like '4GB', got {type(value).__name__}")
    if number <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return number


def _rows_per_block(
    n: int,
    layers: int,
    block_rows: int | None,
    budget: int | None = None,
    bytes_per_entry: int = 4,
    width: int | None = None,
) -> int:
    """Rows streamed at once: ``block_rows``, or as many ``[rows, width]`` rows (``width``
    defaults to ``n``, ``layers`` blocks at once) as fit the budget (default: 256 MB of float32)."""
    if block_rows is not None:
        if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
            raise ValueError(f"block_rows must be a positive int (rows per block), got {block_rows!r}")
        return min(block_rows, n)
    width = n if width is None else width
    if budget is None:
        return max(1, min(n, _BUDGET // max(1, layers * width)))
    rows = budget // max(1, layers * width * bytes_per_entry)
    if rows < 1:
        raise ValueError(
            f"max_memory={budget} bytes is too small: one row of a [rows, {width}] block of {layers} layer(s) "
            f"needs {layers * width * bytes_per_entry} bytes; raise max_memory"
        )
    return min(n, rows)


def prepare_layers(
    plan: MetricPlan,
    layers: list[torch.Tensor],
    names: list[str],
    options: dict[str, Any],
    normalize: bool,
    clip_quantile: float | None,
    ctx: LayerContext,
    groups: torch.Tensor | None = None,
) -> list[Any]:
    """Condition each layer (float64 normalise / clip) and run the plan's per-layer work; the
    plan's float32 ``prepare_fast`` first where it applies."""
    extra = {"groups": groups} if groups is not None else {}
    fast = plan.prepare_fast is not None and clip_quantile is None and ctx.dtype == torch.float32
    states = []
    ctx.normalize = normalize
    for name, x in zip(names, layers):
        ctx.name, ctx.input_eps = name, input_eps(x)
        state = plan.prepare_fast(x, ctx, **options, **extra) if fast else None
        if state is None:
            state = plan.prepare(condition(x, name, normalize, clip_quantile), ctx, **options, **extra)
        states.append(state)
    return states


def check_layers(xs: list[torch.Tensor], ys: list[torch.Tensor] | None, names_x: list[str], names_y: list[str] | None):
    """Same ``n`` everywhere, same device everywhere; return ``(n, dtype, device)``."""
    everything = list(zip(names_x, xs)) + (list(zip(names_y, ys)) if ys is not None else [])
    for name, x in everything:
        check_features(x, name, finite=False)
    n = xs[0].shape[0]
    for name, x in everything:
        if x.shape[0] != n:
            raise ValueError(
                f"{name} has {x.shape[0]} samples but {names_x[0]} has {n}; row i must be sample i in every layer"
            )
    devices = {str(x.device) for _, x in everything}
    if len(devices) > 1:
        raise ValueError(f"layers are on different devices {sorted(devices)}; move them all to the same device")
    return n, compute_dtype(*(x for _, x in everything)), everything[0][1].device


def score_layers(
    metric: str | MetricPlan,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor] | None,
    normalize: bool = True,
    clip_quantile: float | None = None,
    block_rows: int | None = None,
    names_x: list[str] | None = None,
    names_y: list[str] | None = None,
    max_memory: int | str | None = None,
    **metric_kwargs: Any,
) -> torch.Tensor:
    """``[Lx, Ly]`` float64 scores of every layer pair (``ys=None``: ``xs`` against itself).
    ``max_memory``: budget for the streamed blocks (see :class:`LayerContext`)."""
    plan = get_plan(metric)
    options = plan.bind(metric_kwargs)
    names_x = names_x or [f"xs[{i}]" for i in range(len(xs))]
    if ys is not None:
        names_y = names_y or [f"ys[{i}]" for i in range(len(ys))]
    n, dtype, device = check_layers(xs, ys, names_x, names_y)
    ctx = LayerContext(dtype, block_rows, n, len(xs) + len(ys or []), device, max_memory)
    sx = prepare_layers(plan, xs, names_x, options, normalize, clip_quantile, ctx)
    sy = sx if ys is None else prepare_layers(plan, ys, names_y, options, normalize, clip_quantile, ctx)
    return plan.pairs(sx, sy, **options)


def score_pair(
    metric: str, a: torch.Tensor, b: torch.Tensor, normalize: bool, clip_quantile: float | None, **metric_kwargs: Any
) -> torch.Tensor:
    """The functional form of a plan: ``metric(a [n, d_a], b [n, d_b])`` as a 0-dim tensor in the
    compute dtype (float64 for float64 input, else float32)."""
    from ._validation import check_pair

    check_pair(a, b)
    scores = score_layers(metric, [a], [b], normalize, clip_quantile, None, ["a"], ["b"], **metric_kwargs)
    return scores[0, 0].to(compute_dtype(a, b))


def permuted_scores(plan: MetricPlan, sx: list, sy: list, perms: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
    """``[P, Lx, Ly]`` float64: scores with every layer of ``y`` reordered by each row of
    ``perms [P, n]`` (row ``i`` <- sample ``perm[i]``), from the prepared states."""
    if plan.null is not None:
        return plan.null(sx, sy, perms, **options).double()
    if plan.permute is None:
        raise ValueError(f"metric {plan.name!r} has neither a permute nor a null function; cannot permute it")
    return torch.stack([plan.pairs(sx, [plan.permute(s, p) for s in sy], **options).double() for p in perms])


# -- user metrics: pair by pair ------------------------------------------------------------


def register_metric(
    name: str,
    fn: Callable[..., torch.Tensor],
    bounds: tuple[float, float | None] = (0.0, 1.0),
    scale_invariant: bool = False,
) -> MetricPlan:
    """Register ``fn(a [n, d_a], b [n, d_b], **options) -> 0-dim`` under ``name``.

    It then works everywhere a built-in metric does (``alignment_matrix``, ``best_alignment``,
    ``permutation_test``, ``calibrate``, the Metric classes' ``AlignmentMatrix``, the monitor),
    scored pair by pair on the conditioned features (float64, normalised when asked).
    ``bounds``: the metric's range, used by plots and calibration.

    >>> def mean_distance(a, b):
    ...     return (a - b).norm(dim=1).mean()
    >>> plan = register_metric("mean_distance", mean_distance, bounds=(0.0, 2.0))
    >>> from prh_lightning import alignment_matrix
    >>> alignment_matrix([torch.eye(3)], [torch.eye(3), torch.eye(3).flip(0)], metric="mean_distance")
    tensor([[0.0000, 0.9428]])
    """
    return register_plan(plan_from_function(name, fn, bounds, scale_invariant))


def plan_from_function(
    name: str,
    fn: Callable[..., torch.Tensor],
    bounds: tuple[float, float | None] = (0.0, 1.0),
    scale_invariant: bool = False,
) -> MetricPlan:
    """A pair-by-pair :class:`MetricPlan` for ``fn(a, b, **options) -> 0-dim`` (not registered)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable f(a, b, **options), got {type(fn).__name__}")
    params = list(inspect.signature(fn).parameters.values())[2:]
    defaults = {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    defaults = {key: (None if value is inspect.Parameter.empty else value) for key, value in defaults.items()}

    def prepare(x64: torch.Tensor, ctx: LayerContext, **_: Any) -> torch.Tensor:
        return x64.to(ctx.dtype)

    def pairs(xs: list[torch.Tensor], ys: list[torch.Tensor], **options: Any) -> torch.Tensor:
        return torch.tensor(
            [[float(fn(x, y, **options)) for y in ys] for x in xs], dtype=torch.float64, device=xs[0].device
        )

    def permute(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        return x[perm]

    return MetricPlan(
        name=name,
        defaults=defaults,
        prepare=prepare,
        pairs=pairs,
        bounds=lambda **_: bounds,
        permute=permute,
        resampling="plain",
        scale_invariant=scale_invariant,
    )
