"""SVCCA and RSA over a bounded sample buffer (scores from ``prh_lightning.functional``)."""

from __future__ import annotations

from typing import Any, ClassVar

from prh_lightning.metrics.buffered import DEFAULT_MAX_SAMPLES, BufferedPairMetric


class SVCCA(BufferedPairMetric):
    """SVCCA (Raghu et al. 2017): mean canonical correlation after keeping the top ``dim`` SVD directions.

    Args:
        dim: directions kept per representation (at most ``min(n, d)``, checked at compute).
    """

    metric_name = "svcca"

    def __init__(
        self,
        dim: int = 10,
        normalize: bool = True,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        buffer_on_cpu: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(normalize=normalize, max_samples=max_samples, buffer_on_cpu=buffer_on_cpu, **kwargs)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int (number of SVD directions), got {dim!r}")
        self.dim = dim

    def metric_kwargs(self) -> dict[str, Any]:
        return {"dim": self.dim}


class RSA(BufferedPairMetric):
    """Representational similarity analysis: correlation of the two pairwise-dissimilarity matrices.

    Args:
        distance: dissimilarity of two samples, as in ``prh_lightning.functional.rdm``.
        compare: how the two dissimilarity matrices are correlated (``"spearman"``, ...).
    """

    metric_name = "rsa"
    plot_lower_bound: ClassVar[float] = -1.0

    def __init__(
        self,
        distance: str = "correlation",
        compare: str = "spearman",
        normalize: bool = True,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        buffer_on_cpu: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(normalize=normalize, max_samples=max_samples, buffer_on_cpu=buffer_on_cpu, **kwargs)
        self.distance = distance
        self.compare = compare

    def metric_kwargs(self) -> dict[str, Any]:
        return {"distance": self.distance, "compare": self.compare}
