"""`AlignmentMatrix`: a Metric accumulating probe features of every layer of one or two models
and computing the layer x layer alignment matrix with ``prh_lightning.alignment_matrix``.

All layers of one side are stored side by side in one list state ``[batch, sum of d]``
(``dist_reduce_fx="cat"``), so every rank registers the same states whatever the layers
are, and DDP sync gathers them in one go; the layer names and widths are plain attributes
fixed by the first ``update``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from prh_lightning.metrics._checks import (
    check_features_batch,
    check_finite,
    check_index,
    check_index_usage,
    drop_duplicate_ids,
)
from prh_lightning.metrics._distributed import check_every_rank_has_samples, sharded_matrix, shards_across_ranks
from prh_lightning.metrics.buffered import DEFAULT_MAX_SAMPLES, _is_empty, check_max_samples, check_sharded

Layers = Mapping[str, Tensor] | Sequence[Tensor]
_METRIC_OPTIONS = (
    "compute_on_cpu",
    "dist_sync_on_step",
    "process_group",
    "dist_sync_fn",
    "distributed_available_fn",
    "sync_on_compute",
    "compute_with_cache",
)


def _named_layers(layers: Layers, side: str) -> dict[str, Tensor]:
    """``{name: [batch, d]}`` from a mapping (or `Representations`) or a list (named ``"0"``, ``"1"``, ...)."""
    if isinstance(layers, Mapping):
        named = {str(name): value for name, value in layers.items()}
    elif isinstance(layers, Sequence) and not isinstance(layers, (str, bytes)):
        named = {str(i): value for i, value in enumerate(layers)}
    else:
        raise TypeError(
            f"{side} must be a mapping name -> [batch, d] tensor or a list of them, got {type(layers).__name__}"
        )
    if not named:
        raise ValueError(f"{side} holds no layers")
    for name, value in named.items():
        check_features_batch(value, f"{side}[{name!r}]")
    return named


class AlignmentMatrix(Metric):
    """Layer x layer alignment ``[Lx, Ly]`` of probe samples, accumulated over batches.

    Args:
        metric: name in ``prh_lightning.functional.METRICS`` (``"mutual_knn"``, ``"cka"``, ...).
        normalize, clip_quantile: passed to ``prh_lightning.alignment_matrix``.
        max_samples: the most probe samples held (as in `BufferedPairMetric`); past it, an error.
        buffer_on_cpu: keep the buffers on CPU (torchmetrics' ``compute_on_cpu``).
        sharded: under DDP, keep each rank's samples and compute across ranks without gathering
            them (see `BufferedPairMetric`); every rank must update before ``compute``.
        kwargs: the metric's own options (e.g. ``k=10``) and torchmetrics ``Metric`` options.

    ``update(xs, ys=None, index=None)``: ``xs`` (and ``ys`` for a second model) map layer
    name -> ``[batch, d]`` (a dict, a `Representations`, or a list); same samples in every
    layer. Without ``ys`` the matrix compares the layers of ``xs`` with each other.
    ``index [batch]``: sample ids, duplicates dropped at compute (see `BufferedPairMetric`).
    """

    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool] = True
    full_state_update: ClassVar[bool] = False

    def __init__(
        self,
        metric: str = "mutual_knn",
        normalize: bool = True,
        clip_quantile: float | None = None,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        buffer_on_cpu: bool = False,
        sharded: bool = False,
        **kwargs: Any,
    ) -> None:
        options = {key: kwargs.pop(key) for key in _METRIC_OPTIONS if key in kwargs}
        options.setdefault("compute_on_cpu", buffer_on_cpu)
        sharded = check_sharded(sharded, metric, True, options)
        super().__init__(**options)
        self.sharded = sharded
        self.metric, self.normalize, self.clip_quantile = metric, normalize, clip_quantile
        self.metric_kwargs = kwargs
        self.max_samples = check_max_samples(max_samples)
        self.layers_x: list[str] | None = None
        self.layers_y: list[str] | None = None
        self._widths: dict[str, list[int]] = {}
        self.add_state("x", default=[], dist_reduce_fx="cat")
        self.add_state("y", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    # -- accumulation ----------------------------------------------------------------
    def _stack(self, layers: Layers, side: str) -> Tensor:
        """Check ``layers`` against the first update's and put them side by side: ``[batch, sum d]``."""
        named = _named_layers(layers, side)
        names, widths = list(named), [v.shape[1] for v in named.values()]
        known = self.layers_x if side == "xs" else self.layers_y
        if known is None:
            if side == "xs":
                self.layers_x = names
            else:
                self.layers_y = names
            self._widths[side] = widths
        elif known != names or self._widths[side] != widths:
            raise ValueError(
                f"{side} changed between updates: layers {known} with widths {self._widths[side]} before, "
                f"{names} with {widths} now; every update must give the same layers"
            )
        values = list(named.values())
        n, device = values[0].shape[0], values[0].device
        for name, value in named.items():
            if value.shape[0] != n or value.device != device:
                raise ValueError(
                    f"{side}[{name!r}] has {value.shape[0]} samples on {value.device} but the first layer has {n} "
                    f"on {device}; every layer must hold the same samples on the same device"
                )
            check_finite(value, f"{side}[{name!r}]")
        dtype = values[0].dtype
        for value in values[1:]:
            dtype = torch.promote_types(dtype, value.dtype)
        return torch.cat([v.detach().to(dtype) for v in values], dim=1)

    def _check_room(self, held: int, adding: int) -> None:
        if held + adding > self.max_samples:
            raise ValueError(
                f"AlignmentMatrix holds {held} samples and this batch adds {adding}, past "
                f"max_samples={self.max_samples}; raise max_samples or use fewer probe samples"
            )

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        """Merge states (``forward`` and ``merge_state`` do); the bound holds for the merged buffer too."""
        if isinstance(incoming_state.get("x"), list):
            self._check_room(sum(t.shape[0] for t in incoming_state["x"]), sum(t.shape[0] for t in self.x))
        super()._reduce_states(incoming_state)

    def update(self, xs: Layers, ys: Layers | None = None, index: Tensor | Sequence[int] | None = None) -> None:
        """Add a batch of probe features: ``xs`` (and ``ys``) ``{layer: [batch, d]}``, ``index [batch]``."""
        if self.x and (ys is None) != (len(self.y) == 0):
            raise ValueError("give `ys` in every update or in none")
        x = self._stack(xs, "xs")
        y = None if ys is None else self._stack(ys, "ys")
        if y is not None and (y.shape[0] != x.shape[0] or y.device != x.device):
            raise ValueError(
                f"xs has {x.shape[0]} samples on {x.device} but ys has {y.shape[0]} on {y.device}; they must "
                "hold the same samples on the same device"
            )
        ids = check_index(index, x.shape[0], x.device)
        check_index_usage(len(self.x) > 0, len(self.index) > 0, ids is not None)
        self._check_room(sum(t.shape[0] for t in self.x), x.shape[0])
        self.x.append(x)
        if y is not None:
            self.y.append(y)
        if ids is not None:
            self.index.append(ids)

    def _wrap_compute(self, compute: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """torchmetrics squeezes one-element results; keep a single layer pair as ``[1, 1]``."""
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def keep_matrix(*args: Any, **kwargs: Any) -> Tensor:
            value = wrapped(*args, **kwargs)
            return value.reshape(1, 1) if isinstance(value, Tensor) and value.ndim == 0 else value

        return keep_matrix

    def reset(self) -> None:
        """Empty the buffers and forget the layer names (the next update may bring other layers)."""
        super().reset()
        self.layers_x, self.layers_y, self._widths = None, None, {}

    # -- scoring ---------------------------------------------------------------------
    def _split(self, stacked: Tensor, side: str) -> dict[str, Tensor]:
        names = self.layers_x if side == "xs" else self.layers_y
        return dict(zip(names, torch.split(stacked, self._widths[side], dim=1)))

    def compute(self) -> Tensor:
        """The alignment matrix ``[Lx, Ly]`` (``Ly = Lx`` without ``ys``) over all samples and ranks."""
        from prh_lightning.alignment import alignment_matrix

        if self.sharded and shards_across_ranks(self.process_group):
            check_every_rank_has_samples(not _is_empty(self.x), self.process_group)
            xs = list(self._split(dim_zero_cat(self.x), "xs").values())
            ys = None if _is_empty(self.y) else list(self._split(dim_zero_cat(self.y), "ys").values())
            ids = None if _is_empty(self.index) else dim_zero_cat(self.index)
            options = dict(normalize=self.normalize, clip_quantile=self.clip_quantile, **self.metric_kwargs)
            scores = sharded_matrix(self.metric, xs, ys, ids, process_group=self.process_group, **options)
            return scores.to(torch.float64 if any(t.dtype == torch.float64 for t in xs + (ys or [])) else torch.float32)
        if _is_empty(self.x) or self.layers_x is None:
            raise RuntimeError("AlignmentMatrix has no samples; call update(xs, ys) before compute()")
        stacked = [dim_zero_cat(self.x)]
        if not _is_empty(self.y):
            stacked.append(dim_zero_cat(self.y))
        if not _is_empty(self.index):
            stacked = list(drop_duplicate_ids(dim_zero_cat(self.index), *stacked))
        if stacked[0].shape[0] > self.max_samples:
            raise ValueError(
                f"AlignmentMatrix gathered {stacked[0].shape[0]} samples over all processes, past "
                f"max_samples={self.max_samples}; raise max_samples or use fewer probe samples"
            )
        xs = self._split(stacked[0], "xs")
        ys = self._split(stacked[1], "ys") if len(stacked) > 1 else None
        return alignment_matrix(
            xs, ys, metric=self.metric, normalize=self.normalize, clip_quantile=self.clip_quantile, **self.metric_kwargs
        )

    def plot(self, val: Tensor | None = None, ax: _AX_TYPE | None = None) -> _PLOT_OUT_TYPE:
        """Heatmap of the matrix (``compute()`` if ``val`` is None) with layer names; returns ``(fig, ax)``."""
        import matplotlib.pyplot as plt

        matrix = (val if val is not None else self.compute()).detach().float().cpu()
        if matrix.ndim != 2:
            raise ValueError(f"AlignmentMatrix.plot expects a [Lx, Ly] matrix, got shape {tuple(matrix.shape)}")
        rows = self.layers_x or [str(i) for i in range(matrix.shape[0])]
        cols = self.layers_y or (rows if matrix.shape[1] == len(rows) else [str(j) for j in range(matrix.shape[1])])
        fig, ax = plt.subplots() if ax is None else (ax.get_figure(), ax)
        image = ax.imshow(matrix.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(image, ax=ax)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xticks(range(len(cols)), cols, rotation=90)
        ax.set_ylabel("xs layer")
        ax.set_xlabel("ys layer" if self.layers_y else "xs layer")
        ax.set_title(f"{type(self).__name__} ({self.metric})")
        return fig, ax
