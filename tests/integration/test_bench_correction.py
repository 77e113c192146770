"""The pruning correction is unbiased through the real code path.

2000 pruning draws of one batch (5 groups of 8) by the real `ArrolPruner`
(its review and draw, the exempt slice, spared members at min_survivors,
restarts after a kept decision, keep probabilities leaning on the reward
and on the siblings' earlier draws), then `samples_from_groups` and
`Learner.step`'s gradient, against the same step on the unpruned batch
(`benchmarks.correction`, which `stream-rl bench correction` runs).
Each estimator's mean gradient is compared on 8 fixed random directions.
"""

from __future__ import annotations

import pytest

from benchmarks.correction import ESTIMATORS, run

DRAWS = 2000
# Hotelling's T^2 on 8 directions is chi2(8) under the null: its 0.999 quantile.
CHI2_8_999 = 26.12
UNBIASED = ["grpo/ht", "gspo/ht", "dapo/ht", "grpo/ht+mask_truncated", "grpo/ht+dppo_completion"]
UNCORRECTED = ["grpo/none", "gspo/none", "dapo/none"]
CONSISTENT = ["grpo/ht+std", "dapo/ht+tokens"]


@pytest.fixture(scope="module")
def result():
    # The uncorrected bias shows in far fewer draws (z ~ 25 at 400).
    return run(DRAWS, seed=0, estimators={k: ESTIMATORS[k] for k in UNBIASED + UNCORRECTED + CONSISTENT},
               draws_of={k: 400 for k in UNCORRECTED})


def test_the_draws_take_every_path(result):
    d = result["design"]["decisions"]
    assert min(d.get(k, 0) for k in ("kept", "pruned", "exempt", "spared", "restart")) > 100, d
    lo, hi = result["design"]["keep_prob_range"]
    assert 0 < lo < 0.2 and hi == 1.0  # restarted rollouts carry the product of two draws


@pytest.mark.parametrize("name", UNBIASED)
def test_ht_is_unbiased(result, name):
    r = result["estimators"][name]
    assert r["max_abs_z"] < 3.0 and r["t2"] < CHI2_8_999, r
    assert r["relative_bias"] < 2 * r["noise_floor"], r  # what is left is the draws' noise


@pytest.mark.parametrize("name", UNCORRECTED)
def test_uncorrected_is_biased(result, name):
    """The check above can fail: without the correction it does, by far."""
    r = result["estimators"][name]
    assert r["max_abs_z"] > 10 and r["t2"] > 10 * CHI2_8_999, r


def test_consistent_forms_are_biased_but_less(result):
    """The std-scaled advantages and DAPO's token count are ratio estimators:
    their bias is measurable (docs/pruning-correction.md) and below the
    uncorrected one's."""
    e = result["estimators"]
    assert e["grpo/ht+std"]["relative_bias"] > 3 * e["grpo/ht+std"]["noise_floor"]
    assert e["grpo/ht+std"]["relative_bias"] < 0.7 * e["grpo/none"]["relative_bias"]
    assert e["dapo/ht+tokens"]["relative_bias"] < 0.5 * e["dapo/none"]["relative_bias"]
