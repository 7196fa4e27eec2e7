"""Calibrated numbers for reports: a :func:`prh_lightning.calibrate` result as JSON-ready
fields, the paper's formulas applied to a statistic with its own permutation null, and the
sentence a report uses to say whether a score is above chance.

Calibration (Gröger, Wen & Brbić, ICML 2026): ``tau`` = the ``ceil((1 - alpha)(K + 1))``-th
smallest of ``{observed} ∪ null``; ``p = (1 + #{null >= observed}) / (K + 1)``;
``calibrated = clamp((observed - tau) / (high - tau), 0, 1)`` (``max(observed - tau, 0)``
without an upper bound ``high``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["draw_permutations", "calibration_fields", "calibrated_model_pairs", "calibrate_statistic", "above_chance_phrase"]

FIELDS = ("raw", "null_mean", "tau", "p_value", "calibrated", "z_score")


def draw_permutations(n: int, n_permutations: int, seed: int) -> torch.Tensor:
    """``LongTensor[K, n]``: ``K`` permutations of ``0..n-1`` from ``torch.randperm`` with a
    generator seeded by ``seed`` (what ``calibrate(..., generator=Generator().manual_seed(seed))``
    draws), so every calibrated number of a run uses the same, reproducible permutations.

    >>> draw_permutations(4, 2, seed=0).shape
    torch.Size([2, 4])
    """
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations must be a positive int, got {n_permutations!r}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(n_permutations)])


def calibration_fields(result: Any, cells: bool = True) -> dict[str, Any]:
    """A :class:`prh_lightning.calibration.Calibrated` as plain lists and floats:
    ``{"raw", "null_mean", "tau", "p_value", "calibrated", "z_score"}`` (``[Lx, Ly]`` lists, when
    ``cells``), ``"aggregate"`` (those six floats for the best-of-layers / mean score, or None),
    and ``"n_permutations"``.

    >>> from prh_lightning import calibrate
    >>> x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    >>> out = calibration_fields(calibrate([x], [x], "cka", n_permutations=39, generator=torch.Generator().manual_seed(1)))
    >>> out["aggregate"]["p_value"], round(out["calibrated"][0][0], 3)
    (0.025, 1.0)
    """
    out: dict[str, Any] = {}
    if cells:
        out.update({key: getattr(result, key).tolist() for key in FIELDS})
    agg = result.aggregate
    out["aggregate"] = None if agg is None else {key: float(getattr(agg, key)) for key in FIELDS}
    out["n_permutations"] = int(result.null.shape[0])
    return out


def calibrated_model_pairs(models: Sequence[Any], metric: str, permutations: torch.Tensor,
                           pairs: Sequence[tuple[int, int]] | None = None, alpha: float = 0.05,
                           **metric_kwargs: Any) -> dict[str, list[float]]:
    """The best layer pair of every model pair, calibrated: ``calibrate(models[i], models[j],
    metric, permutations=..., aggregate="max")`` for each ``(i, j)`` in ``pairs`` (default: all
    ``i < j``); the rows of every layer of ``models[j]`` are reordered by each permutation.

    Args:
        models: each model's layers (as ``xs`` of :func:`prh_lightning.alignment_matrix`), all on
            the same ``n`` samples; permutations: ``LongTensor[K, n]``.
        metric_kwargs: ``normalize``, ``clip_quantile`` and the metric's options.

    Returns lists over pairs: ``raw``, ``null_mean``, ``tau``, ``p_value``, ``calibrated``,
    ``z_score`` (NaN for a pair whose neighbour lists run through identical rows,
    :class:`prh_lightning.functional.AmbiguousNeighbours`).

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(40, 5, generator=g)
    >>> models = [[x], [x.flip(1)], [torch.randn(40, 5, generator=g)]]
    >>> out = calibrated_model_pairs(models, "cka", draw_permutations(40, 39, seed=0))
    >>> out["p_value"][0], round(out["calibrated"][0], 3)
    (0.025, 1.0)
    """
    from prh_lightning.calibration import calibrate
    from prh_lightning.functional import AmbiguousNeighbours

    if pairs is None:
        pairs = list(itertools.combinations(range(len(models)), 2))
    out: dict[str, list[float]] = {key: [] for key in FIELDS}
    for i, j in pairs:
        try:
            agg = calibrate(models[i], models[j], metric, permutations=permutations, alpha=alpha, aggregate="max",
                            **metric_kwargs).aggregate
            values = [float(getattr(agg, key)) for key in FIELDS]
        except AmbiguousNeighbours:
            values = [float("nan")] * len(FIELDS)
        for key, value in zip(FIELDS, values):
            out[key].append(value)
    return out


def calibrate_statistic(observed: Any, null: Any, high: float | None = 1.0, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """The paper's formulas for a statistic that has its own permutation null, e.g. a mean over
    model pairs whose rows were shuffled independently (which :func:`prh_lightning.calibrate`,
    one pair of layer sets at a time, does not cover).

    Args:
        observed: ``[...]`` observed values; null: ``[K, ...]`` the same statistic under ``K``
            permutations; high: the statistic's upper bound (None: unbounded).

    Returns ``{"raw", "null_mean", "tau", "p_value", "calibrated", "z_score"}``, arrays of
    ``observed``'s shape.

    >>> out = calibrate_statistic([0.9], [[0.1], [0.2], [0.3]], high=1.0, alpha=0.25)
    >>> float(out["p_value"][0]), float(out["tau"][0]), round(float(out["calibrated"][0]), 4)
    (0.25, 0.3, 0.8571)
    """
    from prh_lightning.calibration import _calibrate

    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    obs = torch.as_tensor(np.asarray(observed, dtype=np.float64))
    nul = torch.as_tensor(np.asarray(null, dtype=np.float64))
    if nul.ndim != obs.ndim + 1 or tuple(nul.shape[1:]) != tuple(obs.shape) or nul.shape[0] < 1:
        raise ValueError(f"null must be [K, *observed.shape] = [K, {', '.join(map(str, obs.shape))}], got {tuple(nul.shape)}")
    mean, tau, p, cal, z = _calibrate(obs, nul, alpha, high)
    return {"raw": obs.numpy(), "null_mean": mean.numpy(), "tau": tau.numpy(), "p_value": p.numpy(),
            "calibrated": cal.numpy(), "z_score": z.numpy()}


def above_chance_phrase(raw: float, calibrated: float, p_value: float, name: str = "score",
                        alpha: float = 0.05, p_label: str = "p") -> str:
    """The reading of one calibrated score, led by the calibrated number:
    ``"calibrated CKA 0.00 (raw 0.71), p = 0.4: not above chance"``. "above chance" needs
    ``p < alpha`` and a positive calibrated score (the raw score beyond the null's
    ``1 - alpha`` quantile); ``p_label`` names an adjusted p (e.g. ``"Holm p"``).

    >>> above_chance_phrase(0.71, 0.0, 0.4, "CKA")
    'calibrated CKA 0.00 (raw 0.71), p = 0.4: not above chance'
    >>> above_chance_phrase(0.52, 0.31, 0.005, "mutual k-NN")
    'calibrated mutual k-NN 0.31 (raw 0.52), p = 0.005: above chance'
    """
    above = p_value < alpha and calibrated > 0
    return (f"calibrated {name} {calibrated:.2f} (raw {raw:.2f}), {p_label} = {p_value:.2g}: "
            f"{'above chance' if above else 'not above chance'}")
