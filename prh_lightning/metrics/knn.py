"""k-nearest-neighbour alignment metrics over a bounded sample buffer.

Neighbours are by inner product on the features as given; ``normalize=True`` makes them cosine.

Each class scores all buffered samples with the function of the same name in
``prh_lightning.functional`` (``k < n`` is checked there, when ``n`` is known).
"""

from __future__ import annotations

from typing import Any

from prh_lightning.metrics.buffered import DEFAULT_MAX_SAMPLES, BufferedPairMetric, check_k_arg


class _KNNMetric(BufferedPairMetric):
    """Shared constructor: ``k`` neighbours plus the buffer options of `BufferedPairMetric`."""

    def __init__(
        self,
        k: int = 10,
        normalize: bool = True,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        buffer_on_cpu: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(normalize=normalize, max_samples=max_samples, buffer_on_cpu=buffer_on_cpu, **kwargs)
        self.k = check_k_arg(k)

    def metric_kwargs(self) -> dict[str, Any]:
        return {"k": self.k}


class MutualKNN(_KNNMetric):
    """Mutual k-NN alignment: mean overlap of the k-NN sets of each sample in ``a`` and ``b``, in [0, 1].

    About ``k / (n - 1)`` for unrelated pairings, 1 when the neighbourhoods agree.
    """

    metric_name = "mutual_knn"


class CycleKNN(_KNNMetric):
    """Cycle k-NN: fraction of samples found among the ``a``-neighbours of their ``b``-neighbours, in [0, 1]."""

    metric_name = "cycle_knn"


class LCSKNN(_KNNMetric):
    """Mean longest common subsequence of the ordered k-NN lists in ``a`` and ``b``, in [0, k] (platonic-rep)."""

    metric_name = "lcs_knn"
    plot_upper_bound = None


class EditDistanceKNN(_KNNMetric):
    """One minus the mean edit distance of the ordered k-NN lists of ``a`` and ``b`` over ``k``, in [0, 1]."""

    metric_name = "edit_distance_knn"


class CKNNA(_KNNMetric):
    """CKNNA (Huh et al. 2024): CKA restricted to mutual k-NN pairs; ``unbiased`` HSIC estimator by default."""

    metric_name = "cknna"

    def __init__(
        self,
        k: int = 10,
        unbiased: bool = True,
        normalize: bool = True,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        buffer_on_cpu: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(k=k, normalize=normalize, max_samples=max_samples, buffer_on_cpu=buffer_on_cpu, **kwargs)
        self.unbiased = bool(unbiased)

    def metric_kwargs(self) -> dict[str, Any]:
        return {"k": self.k, "unbiased": self.unbiased}
