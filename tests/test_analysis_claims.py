"""analysis.claims: the holds / does not hold / cannot tell rule on synthetic results, and Holm."""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest

import prh_lightning.analysis.claims as claims
from prh_lightning.analysis.claims import corrected_confidence, holm, verdict, verdict_from_p


@pytest.mark.parametrize("low, high, direction, expected", [
    (0.1, 0.4, "greater", "holds"),
    (-0.4, -0.1, "greater", "does not hold"),
    (-0.1, 0.4, "greater", "cannot tell"),    # the interval covers 0
    (0.0, 0.4, "greater", "cannot tell"),     # touching 0 is not excluding it
    (-0.4, -0.1, "less", "holds"),
    (0.1, 0.4, "less", "does not hold"),
    (float("nan"), 0.4, "greater", "cannot tell"),
    (-np.inf, np.inf, "greater", "cannot tell"),
    (0.5, 0.2, "greater", "cannot tell"),     # malformed interval
])
def test_verdict_rule(low, high, direction, expected):
    assert verdict(low, high, direction) == expected


def test_seed_like_results_with_wide_intervals_cannot_tell():
    """Issue 15's examples: 0.615 [0.067, 1.000] is positive but the claim was 'no lower than
    in-distribution', whose difference interval covers 0; 0.556 vs 0.534 without an interval."""
    assert verdict(-0.2, 0.45) == "cannot tell"  # difference of agreements
    rng = np.random.default_rng(0)
    for _ in range(100):  # any interval that straddles the null value
        lo, hi = -rng.uniform(0, 1), rng.uniform(0, 1)
        assert verdict(lo, hi, "greater") == verdict(lo, hi, "less") == "cannot tell"


def test_verdict_with_a_nonzero_null():
    assert verdict(0.2, 0.3, null=0.25) == "cannot tell"
    assert verdict(0.26, 0.3, null=0.25) == "holds"


def test_holm_against_brute_force_definition():
    """Holm rejects H_(i) at level a iff p_(j) <= a / (m - j + 1) for all j <= i; the adjusted
    p-value is the smallest a that rejects. Checked on random families by scanning a."""
    rng = np.random.default_rng(1)
    for _ in range(30):
        m = rng.integers(1, 7)
        p = rng.uniform(0, 0.2, size=m)
        adjusted = holm(p)
        order = np.argsort(p)
        for a in np.linspace(0.001, 1, 400):
            rejected = np.zeros(m, bool)
            for rank, i in enumerate(order):
                if p[i] <= a / (m - rank):
                    rejected[i] = True
                else:
                    break
            assert np.array_equal(rejected, adjusted <= a + 1e-12)


def test_holm_keeps_order_and_caps_at_one():
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]
    assert holm([0.2]).tolist() == [0.2]
    with pytest.raises(ValueError):
        holm([0.1, 1.2])


def test_corrected_confidence_is_bonferroni():
    for conf, m in itertools.product((0.9, 0.95), (1, 2, 20)):
        assert corrected_confidence(conf, m) == pytest.approx(1 - (1 - conf) / m)
    with pytest.raises(ValueError):
        corrected_confidence(0.95, 0)


def test_verdict_from_adjusted_p_values():
    adjusted = holm([0.004, 0.03, 0.6])  # -> 0.012, 0.06, 0.6
    assert [verdict_from_p(p) for p in adjusted] == ["holds", "cannot tell", "cannot tell"]
    assert verdict_from_p(0.7, p_opposite=0.001) == "does not hold"


def test_doctests():
    assert doctest.testmod(claims).failed == 0
