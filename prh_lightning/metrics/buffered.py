"""`BufferedPairMetric`: a Metric that keeps a bounded buffer of paired samples.

Metrics that need every sample at once (k-NN, RSA, kernel CKA, SVCCA) append each batch to
list states (``dist_reduce_fx="cat"``, so DDP gathers the union of all ranks' samples) and
score the whole buffer in ``compute()`` with the functional core.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from prh_lightning.metrics._checks import (
    check_index_usage,
    check_pair_batch,
    drop_duplicate_ids,
)

DEFAULT_MAX_SAMPLES = 10_000


def _is_empty(state: list[Tensor] | Tensor) -> bool:
    if isinstance(state, list):
        return len(state) == 0 or all(t.numel() == 0 for t in state)
    return state.numel() == 0


def check_max_samples(max_samples: int) -> int:
    """Raise unless ``max_samples`` is a positive int."""
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive int, got {max_samples!r}")
    return max_samples


class BufferedPairMetric(Metric):
    """Base class: buffer paired features ``a [n, d_a]``, ``b [n, d_b]``; score them in ``compute``.

    Args:
        normalize: L2-normalise every sample (row) before scoring (the PRH paper's protocol).
        max_samples: the most samples the metric may hold. An ``update`` that would pass it
            (on one rank), or a ``compute`` whose union over ranks passes it, raises; raise
            the bound or subsample. There is no reservoir sampling: scores are exact.
        buffer_on_cpu: move the buffer to CPU after each update (torchmetrics'
            ``compute_on_cpu``), to spare accelerator memory; ``compute`` then runs on CPU.
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).

    ``update(a, b, index=None)``: ``index [batch]`` integer sample ids (e.g. dataset indices).
    With ids, samples seen twice (a ``DistributedSampler`` pads the last batch by repeating
    samples, and a duplicate is its own nearest neighbour) are dropped at ``compute``, keeping
    the first copy. Without ids duplicates cannot be detected.
    """

    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool] = True
    full_state_update: ClassVar[bool] = False
    plot_lower_bound: ClassVar[float] = 0.0
    plot_upper_bound: ClassVar[float] = 1.0

    metric_name: ClassVar[str] = ""  # key of prh_lightning.functional.METRICS used by compute

    def __init__(
        self,
        normalize: bool = True,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        buffer_on_cpu: bool = False,
        *,
        _buffer: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("compute_on_cpu", buffer_on_cpu)
        super().__init__(**kwargs)
        self.normalize = bool(normalize)
        self.max_samples = check_max_samples(max_samples)
        if _buffer:
            self.add_state("a", default=[], dist_reduce_fx="cat")
            self.add_state("b", default=[], dist_reduce_fx="cat")
            self.add_state("index", default=[], dist_reduce_fx="cat")

    # -- accumulation ----------------------------------------------------------------
    def update(self, a: Tensor, b: Tensor, index: Tensor | Sequence[int] | None = None) -> None:
        """Append a batch: ``a [batch, d_a]``, ``b [batch, d_b]``, optional ids ``index [batch]``."""
        ids = check_pair_batch(a, b, index)
        check_index_usage(len(self.a) > 0, len(self.index) > 0, ids is not None)
        self._check_room(sum(x.shape[0] for x in self.a), a.shape[0])
        if self.a and (self.a[0].shape[1] != a.shape[1] or self.b[0].shape[1] != b.shape[1]):
            raise ValueError(
                f"feature sizes changed between updates: earlier a/b had {self.a[0].shape[1]}/"
                f"{self.b[0].shape[1]} features, this batch {a.shape[1]}/{b.shape[1]}; call reset() first"
            )
        self.a.append(a.detach())
        self.b.append(b.detach())
        if ids is not None:
            self.index.append(ids)

    def _check_room(self, held: int, adding: int) -> None:
        if held + adding > self.max_samples:
            raise ValueError(
                f"{type(self).__name__} holds {held} samples and this batch adds {adding}, past "
                f"max_samples={self.max_samples}; raise max_samples (memory grows with n, compute with n^2) "
                "or measure on a subsample (e.g. limit_val_batches)"
            )

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        """Merge states (``forward`` and ``merge_state`` do); the bound holds for the merged buffer too."""
        if "a" in self._defaults and isinstance(incoming_state.get("a"), list):
            self._check_room(sum(x.shape[0] for x in incoming_state["a"]), sum(x.shape[0] for x in self.a))
        super()._reduce_states(incoming_state)

    def samples(self) -> tuple[Tensor, Tensor]:
        """All buffered samples (the union over DDP ranks inside ``compute``): ``a [n, d_a]``, ``b [n, d_b]``.

        Duplicate sample ids are dropped (first copy kept). Rows are returned as given:
        ``normalize`` is applied by the functional metric, in float64, as in every entry point.
        """
        if _is_empty(self.a):
            raise RuntimeError(f"{type(self).__name__} has no samples; call update(a, b) before compute()")
        a, b = dim_zero_cat(self.a), dim_zero_cat(self.b)
        if not _is_empty(self.index):
            a, b = drop_duplicate_ids(dim_zero_cat(self.index), a, b)
        if a.shape[0] > self.max_samples:
            raise ValueError(
                f"{type(self).__name__} gathered {a.shape[0]} samples over all processes, past "
                f"max_samples={self.max_samples}; raise max_samples or measure on fewer samples"
            )
        return a, b

    # -- scoring ---------------------------------------------------------------------
    def metric_kwargs(self) -> dict[str, Any]:
        """Keyword arguments passed to the functional metric; subclasses override."""
        return {}

    def compute(self) -> Tensor:
        """The score of ``prh_lightning.functional.METRICS[metric_name]`` on all samples (0-dim)."""
        from prh_lightning.functional import METRICS

        a, b = self.samples()
        return METRICS[self.metric_name](a, b, normalize=self.normalize, **self.metric_kwargs())

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: _AX_TYPE | None = None) -> _PLOT_OUT_TYPE:
        """Plot one value or a sequence of values (e.g. one per epoch) with torchmetrics' plotting.

        Args:
            val: result(s) of ``compute()``/``forward``; ``None`` computes the current value.
            ax: matplotlib axis to draw on; a new figure if ``None``.
        Returns: ``(figure, axis)``.
        """
        return self._plot(val, ax)


def check_k_arg(k: int) -> int:
    """Raise unless ``k`` is a positive int (``k < n`` is checked at compute, when ``n`` is known)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (number of neighbours), got {k!r}")
    return k
