"""`BufferedPairMetric`: a Metric that keeps a bounded buffer of paired samples.

Metrics that need every sample at once (k-NN, RSA, kernel CKA, SVCCA) append each batch to
list states (``dist_reduce_fx="cat"``, so DDP gathers the union of all ranks' samples) and
score the whole buffer in ``compute()`` with the functional core.

With ``sharded=True`` each rank keeps its own samples and ``compute()`` runs blocked across
ranks (:mod:`prh_lightning.metrics._distributed`): the ``[n, d]`` union never has to fit on
one device. Same score as the gathered one.
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
        sharded: under ``torch.distributed`` with more than one process, do not gather the
            samples: each rank keeps its shard, and ``compute`` passes row panels between ranks
            (one at a time) and gathers only small results (neighbour lists ``[n, k]``, HSIC
            sums). ``max_samples`` then bounds each rank's shard, not the union. For the k-NN
            metrics (exact neighbours), ``CKA`` with ``kernel="rbf"`` or ``unbiased=True`` and
            ``UnbiasedCKA``; other metrics refuse it. Collectives run on the buffer's device
            (gloo on CPU, NCCL on CUDA: keep ``buffer_on_cpu=False`` there). Without a
            process group, ``compute`` is the ordinary single-process one.
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
        sharded: bool = False,
        _buffer: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("compute_on_cpu", buffer_on_cpu)
        sharded = check_sharded(sharded, self.metric_name, _buffer, kwargs)
        super().__init__(**kwargs)
        self.sharded = sharded
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
        return self._score(self.metric_name, **self.metric_kwargs())

    def _score(self, metric: str, **options: Any) -> Tensor:
        """``METRICS[metric]`` of the union of every rank's samples: gathered, or sharded."""
        from prh_lightning.functional import METRICS
        from prh_lightning.metrics._distributed import sharded_score, shards_across_ranks

        if self.sharded and shards_across_ranks(self.process_group):
            a, b, ids = self._local_samples()
            return sharded_score(metric, a, b, ids, self.normalize, self.process_group, **options)
        a, b = self.samples()
        return METRICS[metric](a, b, normalize=self.normalize, **options)

    def _local_samples(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """This rank's ``a [n_r, d_a]``, ``b [n_r, d_b]`` and ids ``[n_r]`` (or None); a rank without
        samples takes empty ones of the other ranks' widths."""
        import torch

        from prh_lightning.metrics._distributed import ShardGroup

        group = ShardGroup(self.process_group)
        widths = [x[0].shape[1] if x else 0 for x in (self.a, self.b)]
        widths = group.all_reduce(torch.tensor(widths, device=self.device), "max").tolist()
        if not max(widths):
            raise RuntimeError(f"{type(self).__name__} has no samples; call update(a, b) before compute()")
        if _is_empty(self.a):
            empty = torch.empty(0, widths[0], device=self.device)
            return empty, torch.empty(0, widths[1], device=self.device), None
        ids = None if _is_empty(self.index) else dim_zero_cat(self.index)
        return dim_zero_cat(self.a), dim_zero_cat(self.b), ids

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: _AX_TYPE | None = None) -> _PLOT_OUT_TYPE:
        """Plot one value or a sequence of values (e.g. one per epoch) with torchmetrics' plotting.

        Args:
            val: result(s) of ``compute()``/``forward``; ``None`` computes the current value.
            ax: matplotlib axis to draw on; a new figure if ``None``.
        Returns: ``(figure, axis)``.
        """
        return self._plot(val, ax)


def check_sharded(sharded: bool, metric: str, buffered: bool, kwargs: dict[str, Any]) -> bool:
    """Validate ``sharded=`` and turn torchmetrics' gathering sync off for it (in ``kwargs``)."""
    from prh_lightning.metrics._distributed import SHARDED_METRICS

    if not isinstance(sharded, bool):
        raise TypeError(f"sharded must be True or False, got {sharded!r}")
    if not sharded:
        return False
    if not buffered:
        raise ValueError("sharded=True is for buffered metrics; streaming CKA already syncs only d x d statistics")
    if metric not in SHARDED_METRICS:
        raise ValueError(f"sharded=True is available for {SHARDED_METRICS}, not {metric or 'this metric'!r}")
    if kwargs.get("sync_on_compute", False):
        raise ValueError("sharded=True computes across ranks without gathering; do not pass sync_on_compute=True")
    kwargs["sync_on_compute"] = False
    return True


def check_k_arg(k: int) -> int:
    """Raise unless ``k`` is a positive int (``k < n`` is checked at compute, when ``n`` is known)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (number of neighbours), got {k!r}")
    return k
