"""One rule for every claim a report makes: "holds", "does not hold" or "cannot tell".

A claim is a stated direction for a difference (``"greater"``: the difference is above
``null``; ``"less"``: below). Given an interval for the difference that is already corrected
for the number of comparisons (see :func:`corrected_confidence`), the rule is

- **holds**: the whole interval lies on the claimed side of ``null``;
- **does not hold**: the whole interval lies on the other side;
- **cannot tell**: the interval contains ``null`` (or is not finite).

With p-values instead of intervals (:func:`verdict_from_p`): Holm-adjust the family of
p-values (:func:`holm`); a claim holds if its adjusted one-sided p-value is below ``alpha``,
does not hold if the adjusted p-value of the opposite direction is, and else cannot tell.

>>> verdict(0.02, 0.10)
'holds'
>>> verdict(-0.01, 0.10)
'cannot tell'
>>> verdict(-0.3, -0.1)
'does not hold'
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["HOLDS", "DOES_NOT_HOLD", "CANNOT_TELL", "RULE", "verdict", "verdict_from_p", "holm",
           "corrected_confidence"]

HOLDS, DOES_NOT_HOLD, CANNOT_TELL = "holds", "does not hold", "cannot tell"
#: the rule in one sentence, for reports
RULE = ("A claim **holds** if the interval of the difference, Bonferroni-corrected for the number of "
        "comparisons made, lies entirely on the claimed side of 0; it **does not hold** if it lies entirely "
        "on the other side; otherwise we **cannot tell**.")
_DIRECTIONS = ("greater", "less")


def _check_direction(direction: str) -> None:
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'greater' or 'less', got {direction!r}")


def verdict(low: float, high: float, direction: str = "greater", null: float = 0.0) -> str:
    """The verdict on "the difference is ``direction`` than ``null``" from its interval ``[low, high]``.

    >>> verdict(0.5, 0.9, direction="less")
    'does not hold'
    >>> verdict(float("nan"), 0.9)
    'cannot tell'
    """
    _check_direction(direction)
    low, high = float(low), float(high)
    if math.isnan(low) or math.isnan(high) or low > high:
        return CANNOT_TELL
    above, below = low > null, high < null
    if direction == "less":
        above, below = below, above
    return HOLDS if above else DOES_NOT_HOLD if below else CANNOT_TELL


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (same order as given), each capped at 1.

    ``p_(i)`` sorted ascending gets ``max_{j <= i} min(1, (m - j + 1) p_(j))``.

    >>> holm([0.01, 0.04, 0.03]).tolist()
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or np.isnan(p).any():
        raise ValueError(f"p-values must be a 1-D sequence in [0, 1], got {p_values!r}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def corrected_confidence(confidence: float, n_comparisons: int) -> float:
    """Per-comparison confidence of Bonferroni-corrected intervals: ``1 - (1 - confidence) / m``.

    >>> corrected_confidence(0.95, 5)
    0.99
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if isinstance(n_comparisons, bool) or not isinstance(n_comparisons, int) or n_comparisons < 1:
        raise ValueError(f"n_comparisons must be a positive int, got {n_comparisons!r}")
    return round(1.0 - (1.0 - confidence) / n_comparisons, 12)


def verdict_from_p(p_claimed: float, p_opposite: float | None = None, alpha: float = 0.05) -> str:
    """The verdict from (already Holm-adjusted) one-sided p-values of the claimed direction and,
    if tested, of the opposite direction.

    >>> verdict_from_p(0.001), verdict_from_p(0.2), verdict_from_p(0.9, 0.01)
    ('holds', 'cannot tell', 'does not hold')
    """
    if p_claimed < alpha:
        return HOLDS
    if p_opposite is not None and p_opposite < alpha:
        return DOES_NOT_HOLD
    return CANNOT_TELL
