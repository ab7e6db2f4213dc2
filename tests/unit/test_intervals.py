"""The comparison's intervals (reporting/intervals.py) against numbers derived by hand."""

from __future__ import annotations

import math

import pytest

from gcpo_lightning.reporting.intervals import (
    Interval,
    bootstrap_interval,
    paired_differences,
    t_interval,
    t_quantile_975,
)


def test_t_interval_by_hand() -> None:
    # values 0.50, 0.52, 0.54: mean 0.52; deviations -0.02, 0, 0.02, so sd = sqrt((4e-4 + 4e-4) / 2) = 0.02;
    # se = 0.02 / sqrt(3) = 0.0115470; t_{0.975, 2} = 4.303, half width = 4.303 * 0.0115470 = 0.0496868
    got = t_interval([0.50, 0.52, 0.54])
    assert got.n == 3
    assert got.mean == pytest.approx(0.52)
    assert got.low == pytest.approx(0.52 - 0.0496868, abs=1e-6)
    assert got.high == pytest.approx(0.52 + 0.0496868, abs=1e-6)


def test_t_interval_of_one_value_is_the_value() -> None:
    assert t_interval([0.3]) == Interval(0.3, 0.3, 0.3, 1)


def test_t_quantile_table_and_its_bound() -> None:
    assert t_quantile_975(7) == 2.365  # 8 seeds
    assert t_quantile_975(40) == t_quantile_975(15) == 2.131  # wider than the true 2.021: errs on the safe side
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def test_bootstrap_interval_by_hand() -> None:
    # values 0 and 1: a resample of 2 has mean 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4), so with 10k resamples the
    # 2.5% quantile is 0 and the 97.5% quantile is 1; identical values give a zero-width interval
    got = bootstrap_interval([0.0, 1.0])
    assert (got.mean, got.low, got.high) == (0.5, 0.0, 1.0)
    same = bootstrap_interval([0.4] * 5)
    assert math.isclose(same.low, 0.4) and math.isclose(same.high, 0.4)


def test_bootstrap_is_seeded_and_narrows_with_n() -> None:
    wide = bootstrap_interval([0.1, 0.9, 0.5, 0.3])
    assert wide == bootstrap_interval([0.1, 0.9, 0.5, 0.3])
    narrow = bootstrap_interval([0.1, 0.9, 0.5, 0.3] * 16)
    assert narrow.high - narrow.low < wide.high - wide.low


def test_paired_differences_keep_common_seeds_in_order() -> None:
    assert paired_differences({2: 0.6, 0: 0.5, 1: 0.4}, {0: 0.45, 1: 0.5, 3: 0.9}) == pytest.approx([0.05, -0.1])


def test_format_in_percent() -> None:
    assert Interval(0.5234, 0.5012, 0.5456, 8).format() == "52.3 [50.1, 54.6]"
