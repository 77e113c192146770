"""The pruning bound (`bench pruning-bound`): the tokens per trained sample
that pruning at L_detect can reach, by the oracle that keeps the shortest."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.pruning_bound import bound_of_lengths, pruning_cost, tokens_per_sample_ratio


groups_st = st.lists(st.lists(st.integers(1, 320), min_size=1, max_size=12), min_size=1, max_size=6)


def test_a_worked_group():
    # L_detect 32, kappa 0.5: 10 ends before the decision (kept); of the
    # scored 40, 100, 300, 320 the oracle keeps 40 and 100 and prunes the
    # others at 32 tokens each.
    g = [[10, 40, 100, 300, 320]]
    c = pruning_cost(g, 0.5, 32, oracle=True)
    assert c == {"tokens": 10 + 40 + 100 + 32 + 32, "kept": 3}
    r = pruning_cost(g, 0.5, 32, oracle=False)
    assert r["kept"] == pytest.approx(1 + 2) and r["tokens"] == pytest.approx(10 + 0.5 * 760 + 0.5 * 4 * 32)
    assert tokens_per_sample_ratio(g, 0.5, 32, True) == pytest.approx((214 / 3) / (770 / 5))


def test_a_fractional_share_keeps_the_boundary_rollout_in_part():
    c = pruning_cost([[50, 60, 70]], 0.5, 32, oracle=True)  # keeps 1.5 of 3
    assert c["kept"] == pytest.approx(1.5) and c["tokens"] == pytest.approx(50 + 0.5 * 60 + 0.5 * 32 + 32)


@settings(max_examples=200, deadline=None)
@given(groups_st, st.floats(0.05, 1.0), st.integers(1, 64))
def test_the_oracle_never_costs_more_than_random_pruning_and_keeps_as_many(groups, kappa, l_detect):
    o = pruning_cost(groups, kappa, l_detect, oracle=True)
    r = pruning_cost(groups, kappa, l_detect, oracle=False)
    assert o["kept"] == pytest.approx(r["kept"])
    assert o["tokens"] <= r["tokens"] + 1e-6


@settings(max_examples=200, deadline=None)
@given(groups_st, st.integers(1, 64))
def test_keeping_everything_changes_nothing(groups, l_detect):
    for oracle in (True, False):
        assert tokens_per_sample_ratio(groups, 1.0, l_detect, oracle) == pytest.approx(1.0)


@settings(max_examples=100, deadline=None)
@given(groups_st)
def test_nothing_scored_nothing_pruned(groups):
    # Every rollout ends before L_detect: no pruner can act.
    assert tokens_per_sample_ratio(groups, 0.5, 400, oracle=True) == pytest.approx(1.0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kappa"):
        pruning_cost([[1]], 0.0, 32, True)
    with pytest.raises(ValueError, match="l_detect"):
        pruning_cost([[1]], 0.5, 0, True)
    assert math.isnan(tokens_per_sample_ratio([], 0.5, 32, True))


def test_bound_of_lengths_reports_the_grids():
    b = bound_of_lengths([[10, 40, 100, 300, 320], [320, 320, 35, 36]], 0.5, 32, 320)
    assert b["rollouts"] == 9 and b["truncated_frac"] == pytest.approx(3 / 9)
    assert set(b["oracle_ratio_by_kappa"]) == {"0.25", "0.5", "0.75"}
    assert set(b["oracle_ratio_by_l_detect"]) == {"16", "32", "64"}
    assert b["oracle_ratio"] == b["oracle_ratio_by_kappa"]["0.5"] == b["oracle_ratio_by_l_detect"]["32"]
    # Random pruning costs more per trained sample than none: a pruned
    # rollout's L_detect tokens buy nothing; the oracle saves.
    assert b["oracle_ratio"] < 1.0 < b["random_ratio"]


