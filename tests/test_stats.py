"""The paired bootstrap behind every held-out interval (core/stats.py)."""

import math

import numpy as np
import pytest

from core.stats import BOOTSTRAP_RESAMPLES, Interval, paired_bootstrap


def test_enough_resamples_by_default():
    assert BOOTSTRAP_RESAMPLES >= 2000


def test_constant_differences_give_a_point_interval():
    interval = paired_bootstrap([0.25] * 50)
    assert interval.difference == interval.low == interval.high == 0.25
    assert interval.excludes_zero()


def test_interval_matches_the_closed_form_of_a_mean():
    # The bootstrap distribution of a mean has standard deviation s / sqrt(n), with s the
    # plug-in (ddof=0) standard deviation; for n this large it is close to normal, so the
    # 95% percentile interval is mean -/+ 1.96 s / sqrt(n).
    rng = np.random.default_rng(1)
    values = rng.choice([-1.0, 0.0, 1.0], size=400, p=[0.2, 0.5, 0.3])
    interval = paired_bootstrap(values, resamples=40_000)
    half_width = 1.959964 * values.std() / math.sqrt(values.size)
    assert interval.difference == pytest.approx(values.mean())
    assert interval.low == pytest.approx(values.mean() - half_width, abs=0.004)
    assert interval.high == pytest.approx(values.mean() + half_width, abs=0.004)


def test_fixed_seed_repeats_and_other_seeds_differ():
    values = np.random.default_rng(3).normal(size=30)
    assert paired_bootstrap(values) == paired_bootstrap(values)
    assert paired_bootstrap(values, seed=1) != paired_bootstrap(values, seed=2)


def test_no_difference_is_inside_a_balanced_interval():
    interval = paired_bootstrap([1.0, -1.0] * 40)
    assert interval.difference == 0.0
    assert interval.low < 0 < interval.high
    assert not interval.excludes_zero()


def test_a_lower_bound_of_zero_bar_float_residue_does_not_exclude_zero():
    # Three seeds' passes minus round 0's ("+" 1, "-" -1), averaged per prompt into
    # thirds: the exact lower bound is 0, the float one a residue above it.
    seeds = ["-00+0+++0+-0000-00+0+0000+0+-0000+0000-0",
             "0+-00000+++00+0---++0++0+00+++-0+00000-0",
             "0+00+0+00+0-+000+000+0--00++0-00-00-+0-0"]
    values = [[{"-": -1.0, "0": 0.0, "+": 1.0}[c] for c in seed] for seed in seeds]
    interval = paired_bootstrap(values, resamples=2000)
    assert 0 < interval.low < 1e-12
    assert not interval.excludes_zero()
    assert not Interval(-0.04, -0.08, -2e-18).excludes_zero()
    assert Interval(0.04, 0.002, 0.08).excludes_zero() and Interval(-0.04, -0.08, -0.002).excludes_zero()


def test_seeds_are_averaged_per_prompt_before_resampling():
    by_seed = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    assert paired_bootstrap(by_seed) == paired_bootstrap(by_seed.mean(axis=0))


def test_many_resamples_in_blocks_equal_one_interval_of_the_same_draws():
    # Blocks only bound memory: the percentile of 10,000 resampled means is stable.
    values = np.random.default_rng(2).normal(size=3000)
    interval = paired_bootstrap(values)
    assert interval.low < values.mean() < interval.high
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * values.std() / math.sqrt(3000), rel=0.05)


@pytest.mark.parametrize("values, message", [([], "one or more"), ([1.0, math.nan], "not finite"),
                                             ([[[1.0]]], "one or more")])
def test_bad_input_is_refused(values, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(values)
