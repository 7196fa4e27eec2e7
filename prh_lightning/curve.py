"""Alignment as a function of the number of samples: :func:`alignment_curve`.

Scores such as mutual k-NN change with ``n`` (the neighbourhood of a sample among 1,000 is not
its neighbourhood among 100,000), so a score is only comparable at the same ``n``. The curve
scores nested random subsets of the paired samples at each size, next to the chance level
(the mean of a permutation null at that size) and the spread over repeats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .alignment import Layers, alignment_matrix, as_layer_list
from .calibration import calibrate

__all__ = ["AlignmentCurve", "alignment_curve"]


@dataclass(frozen=True)
class AlignmentCurve:
    """Scores at each subset size.

    Attributes:
        sizes: the ``S`` subset sizes, increasing.
        scores: ``[R, S]`` float64: repeat ``r`` scores the first ``sizes[s]`` samples of
            ``subsets[r]`` (aggregated over the layer pairs: ``aggregate``).
        mean, low, high: ``[S]``: mean over repeats and the ``(1 - level) / 2``, ``(1 + level) / 2``
            quantiles of the repeats (the spread over random evaluation sets of that size drawn
            from these samples; zero width when a size is all the samples).
        chance: ``[S]`` mean of the permutation null (pairing shuffled) over repeats, or
            ``None`` when ``n_permutations=0``.
        subsets: ``[R, n]`` the random orders; subsets are their prefixes (nested).
        metric, aggregate, level: as passed.
    """

    sizes: list[int]
    scores: torch.Tensor
    mean: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    chance: torch.Tensor | None
    subsets: torch.Tensor
    metric: str
    aggregate: str
    level: float

    def plot(self, ax=None, label: str | None = None):
        """Draw the curve (mean, spread band, chance level) on a log-2 ``n`` axis; returns the Axes.

        Needs matplotlib (``pip install 'prh-lightning[plot]'``). Without ``ax`` a new
        ``Figure`` (no pyplot state) is made: save it with ``ax.figure.savefig(path)``.
        """
        from ._optional import require

        require("matplotlib", extra="plot", purpose="AlignmentCurve.plot")
        if ax is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            fig = Figure(figsize=(5.0, 3.5), dpi=100, layout="constrained")
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
        x = list(self.sizes)
        line = ax.plot(x, self.mean.tolist(), marker="o", label=label or self.metric)[0]
        ax.fill_between(x, self.low.tolist(), self.high.tolist(), color=line.get_color(), alpha=0.2, linewidth=0)
        if self.chance is not None:  # one legend entry for the chance lines of several curves on one Axes
            chance_label = "chance (permuted pairs)"
            if any(other.get_label() == chance_label for other in ax.lines):
                chance_label = "_nolegend_"
            ax.plot(x, self.chance.tolist(), linestyle="--", color=line.get_color(), alpha=0.7, label=chance_label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(size) for size in x])
        ax.minorticks_off()
        ax.set_xlabel("samples n")
        ax.set_ylabel(f"{self.metric} ({self.aggregate} over layer pairs)")
        ax.legend(loc="best", fontsize="small")
        return ax


def _subset(xs, rows: torch.Tensor):
    """The same layers (mapping keys kept) restricted to ``rows``."""
    if isinstance(xs, Mapping):
        return {key: x[rows] for key, x in xs.items()}
    return [x[rows] for x in xs]


def alignment_curve(
    xs: Layers | torch.Tensor,
    ys: Layers | torch.Tensor,
    metric: str = "mutual_knn",
    sizes: Sequence[int] = (256, 1024, 4096),
    repeats: int = 5,
    *,
    n_permutations: int = 10,
    aggregate: str = "max",
    level: float = 0.9,
    generator: torch.Generator | None = None,
    normalize: bool = True,
    max_memory: int | str | None = None,
    **metric_kwargs,
) -> AlignmentCurve:
    """Alignment of ``xs`` and ``ys`` on nested random subsets of ``sizes[s]`` paired samples.

    Args:
        xs, ys: ``[n, d]`` tensors, or layers as in :func:`prh_lightning.alignment_matrix`
            (same ``n``, row ``i`` = sample ``i``).
        metric: any metric name of ``alignment_matrix``; ``**metric_kwargs`` its options.
        sizes: increasing subset sizes, each at most ``n``.
        repeats: ``R`` random orders of the samples; repeat ``r`` scores the first
            ``sizes[s]`` samples of its order, so the subsets of one repeat are nested.
        n_permutations: permutations of the pairing per repeat and size for the chance level
            (:func:`prh_lightning.calibrate`'s null mean); 0 skips it.
        aggregate: ``"max"`` (best layer pair, the PRH protocol) or ``"mean"`` over the
            ``[Lx, Ly]`` matrix (with one layer each, the score itself).
        level: the central fraction of repeats between ``low`` and ``high``.
        generator: a ``torch.Generator`` for the subsets and permutations (reproducible). Draw
            order: first the ``R`` orders (``torch.randperm(n)`` each), then for each repeat and
            each size in turn the ``n_permutations`` permutations of that subset
            (``torch.randperm(size)`` each; permutation ``k`` reorders the subset's rows of ``ys``).
        max_memory: memory budget of each score (see ``alignment_matrix``) when no chance
            level is computed.

    >>> g = torch.Generator().manual_seed(0)
    >>> z = torch.randn(512, 4, generator=g)
    >>> a, b = z @ torch.randn(4, 16, generator=g), z @ torch.randn(4, 16, generator=g)
    >>> curve = alignment_curve(a, b, "mutual_knn", sizes=[64, 512], repeats=3, generator=g)
    >>> curve.scores.shape, bool((curve.mean > curve.chance).all()), float(curve.high[1] - curve.low[1])
    (torch.Size([3, 2]), True, 0.0)
    """
    xs = [xs] if isinstance(xs, torch.Tensor) else xs
    ys = [ys] if isinstance(ys, torch.Tensor) else ys
    _, lx = as_layer_list(xs, "xs")
    as_layer_list(ys, "ys")
    if not isinstance(lx[0], torch.Tensor) or lx[0].ndim != 2:
        raise ValueError(f"xs must hold [n, d] tensors, got {getattr(lx[0], 'shape', type(lx[0]).__name__)}")
    n = lx[0].shape[0]
    sizes = [int(s) for s in sizes]
    if not sizes or any(isinstance(s, bool) for s in sizes) or sizes != sorted(set(sizes)) or sizes[0] < 1:
        raise ValueError(f"sizes must be increasing positive ints, got {sizes!r}")
    if sizes[-1] > n:
        raise ValueError(f"sizes go up to {sizes[-1]} but there are only n={n} paired samples")
    for value, what, low in ((repeats, "repeats", 1), (n_permutations, "n_permutations", 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
    if aggregate not in ("max", "mean"):
        raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    reduce = (lambda m: float(m.max())) if aggregate == "max" else (lambda m: float(m.double().mean()))  # noqa: E731
    subsets = torch.stack([torch.randperm(n, generator=generator) for _ in range(repeats)])
    scores = torch.empty(repeats, len(sizes), dtype=torch.float64)
    chance = torch.empty(repeats, len(sizes), dtype=torch.float64) if n_permutations else None
    for r in range(repeats):
        for j, size in enumerate(sizes):
            rows = subsets[r, :size].to(lx[0].device)
            sub_x, sub_y = _subset(xs, rows), _subset(ys, rows)
            if n_permutations:
                out = calibrate(
                    sub_x, sub_y, metric, n_permutations=n_permutations, aggregate=aggregate,
                    generator=generator, normalize=normalize, **metric_kwargs,
                )
                scores[r, j], chance[r, j] = out.aggregate.raw, out.aggregate.null_mean
            else:
                scores[r, j] = reduce(alignment_matrix(sub_x, sub_y, metric, normalize, max_memory=max_memory, **metric_kwargs))
    quantiles = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(scores, quantiles, dim=0)
    return AlignmentCurve(
        sizes=sizes,
        scores=scores,
        mean=scores.mean(dim=0),
        low=low,
        high=high,
        chance=None if chance is None else chance.mean(dim=0),
        subsets=subsets,
        metric=metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"),
        aggregate=aggregate,
        level=level,
    )
