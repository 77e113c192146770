"""The pruner stage: ARRoL's calibration, survival policy, head-quality
metrics, the none/random/arrol pruners, the quality head and its trainer, and
the pruner's fields on `Rollout`.

Expected values come from the formulas in ALGORITHMS.md §3, worked by hand
(exact fractions) or recomputed independently with plain Python loops
(`ref_*` helpers below), never from running the code under test. No engine,
no network: every rollout is built by hand.
"""

from __future__ import annotations

import math
import random

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stream_rl.buffer.rollouts import append_chunk, restart
from stream_rl.config import config_from_dict
from stream_rl.learner.quality_head import QualityHeadTrainer
from stream_rl.codec import Decoder, encode
from stream_rl.protocol import Group, QualityScore, Rollout, TokenChunk
from stream_rl.pruner import make_pruner
from stream_rl.pruner.arrol import SCORE_GRACE_TOKENS, ArrolPruner, sigmoid
from stream_rl.pruner.base import Pruner, RandomPruner
from stream_rl.pruner.calibration import BinnedCalibrator, binned_posterior, score_bins
from stream_rl.pruner.head import (CONFIDENCE_FEATURES, QualityHead, decode_features, encode_features, head_features,
                                   head_input_size, token_confidence)
from stream_rl.pruner.quality import group_balance, head_accuracy, head_auc, head_spearman
from stream_rl.pruner.survival import SurvivalPolicy

PROPS = settings(max_examples=60, deadline=None)


# --- independent reference computations -----------------------------------------------------

def ref_bin(s: float, bins: int) -> int:
    """b(s') = min(B-1, floor(B s')) on s' clipped to [0, 1], in plain Python."""
    s = min(1.0, max(0.0, s))
    return min(bins - 1, math.floor(bins * s))


def ref_posterior(c_pos, c_neg, prior: float, alpha: float) -> list[float]:
    """q(b) from ALGORITHMS.md §3 with Python floats, one bin at a time."""
    bins = len(c_pos)
    n_pos, n_neg = sum(c_pos), sum(c_neg)
    out = []
    for b in range(bins):
        lp = (c_pos[b] + alpha) / (n_pos + alpha * bins)
        ln = (c_neg[b] + alpha) / (n_neg + alpha * bins)
        out.append(prior * lp / (prior * lp + (1 - prior) * ln))
    return out


def ref_auc(scores, labels) -> float:
    """Fraction of (positive, negative) pairs ordered correctly, ties 1/2."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def ref_ranks(xs) -> list[float]:
    """1-based ranks, tied values sharing the mean of their positions."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def ref_spearman(scores, labels) -> float:
    """Pearson correlation of the average ranks, by hand."""
    rs, ry = ref_ranks(list(scores)), ref_ranks([float(y) for y in labels])
    n = len(rs)
    ms, my = sum(rs) / n, sum(ry) / n
    cov = sum((a - ms) * (b - my) for a, b in zip(rs, ry))
    vs = sum((a - ms) ** 2 for a in rs)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vs * vy)


def ref_sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- builders --------------------------------------------------------------------------------

MAX_TOKENS = 128


def make_cfg(**pruner):
    """A validated Config with these pruner settings (max_tokens leaves room
    past l_detect + SCORE_GRACE_TOKENS). The learner trains uncorrected:
    the pruner never reads it, and under pruning_correction=ht the config
    refuses small_groups=drop, which these tests use to turn sparing off."""
    return config_from_dict({"pruner": pruner, "generator": {"max_tokens": MAX_TOKENS},
                             "learner": {"pruning_correction": "none"}})


def mk(i, n_tokens: int = 0, group: str = "g0", score=None, reward=None, finish=None) -> Rollout:
    r = Rollout(rollout_id=f"{group}-{i}", group_id=group, prompt_ids=[1], answer="1", max_tokens=MAX_TOKENS)
    r.response_ids = list(range(n_tokens))
    r.score, r.reward, r.finish_reason = score, reward, finish
    return r


def grow(r: Rollout, n_tokens: int) -> Rollout:
    r.response_ids = list(range(n_tokens))
    return r


# =============================================================================================
# 1. Binned calibration
# =============================================================================================

counts_st = st.integers(1, 12).flatmap(lambda b: st.tuples(
    st.lists(st.integers(0, 20), min_size=b, max_size=b),
    st.lists(st.integers(0, 20), min_size=b, max_size=b)))


@PROPS
@given(counts_st, st.floats(0.0, 1.0), st.floats(0.01, 5.0))
def test_posterior_in_unit_interval_and_matches_reference(counts, prior, alpha):
    """q(b) is a probability and equals the formula recomputed bin by bin."""
    c_pos, c_neg = counts
    q = binned_posterior(np.array(c_pos), np.array(c_neg), prior, alpha)
    assert q.shape == (len(c_pos),)
    assert np.all((q >= 0) & (q <= 1))
    np.testing.assert_allclose(q, ref_posterior(c_pos, c_neg, prior, alpha), rtol=1e-12, atol=1e-15)


@PROPS
@given(counts_st, st.floats(0.01, 0.99), st.floats(0.01, 5.0), st.data())
def test_posterior_monotone_in_bin_counts(counts, prior, alpha, data):
    """Adding positives to bin b never lowers q(b); adding negatives never raises it."""
    c_pos, c_neg = (np.array(c) for c in counts)
    b = data.draw(st.integers(0, len(c_pos) - 1))
    k = data.draw(st.integers(1, 10))
    q = binned_posterior(c_pos, c_neg, prior, alpha)[b]
    more_pos = c_pos.copy()
    more_pos[b] += k
    more_neg = c_neg.copy()
    more_neg[b] += k
    assert binned_posterior(more_pos, c_neg, prior, alpha)[b] >= q - 1e-12
    assert binned_posterior(c_pos, more_neg, prior, alpha)[b] <= q + 1e-12


@pytest.mark.parametrize("bins", [1, 4, 128])
def test_empty_calibrator_is_prior_half(bins):
    """With no labels the prior is 0.5 and so is every bin's posterior."""
    cal = BinnedCalibrator(bins=bins, alpha=1.0, window=16)
    assert cal.prior == 0.5 and cal.num_labels == 0
    np.testing.assert_allclose(cal.table(), np.full(bins, 0.5))
    np.testing.assert_allclose(cal.posterior(np.array([0.0, 0.3, 1.0])), [0.5, 0.5, 0.5])


def test_posterior_hand_computed():
    """B=4, alpha=1, prior 1/4, c+ = [0,1,2,3], c- = [3,2,1,0]:
    P(b|1) = [1,2,3,4]/10, P(b|0) = [4,3,2,1]/10, so
    q = [1/13, 2/11, 1/3, 4/7]. And B=2, alpha=1/2, prior 1/2, c+ = [1,0],
    c- = [0,3]: P(b|1) = [3/4, 1/4], P(b|0) = [1/8, 7/8], q = [6/7, 2/9]."""
    q = binned_posterior([0, 1, 2, 3], [3, 2, 1, 0], prior=0.25, alpha=1.0)
    np.testing.assert_allclose(q, [1 / 13, 2 / 11, 1 / 3, 4 / 7], rtol=1e-12)
    q = binned_posterior([1, 0], [0, 3], prior=0.5, alpha=0.5)
    np.testing.assert_allclose(q, [6 / 7, 2 / 9], rtol=1e-12)


def test_posterior_extreme_priors():
    """prior 0 gives q = 0 everywhere, prior 1 gives q = 1 (alpha keeps the likelihoods > 0)."""
    np.testing.assert_array_equal(binned_posterior([5, 0], [0, 5], 0.0, 1.0), [0.0, 0.0])
    np.testing.assert_array_equal(binned_posterior([5, 0], [0, 5], 1.0, 1.0), [1.0, 1.0])


def test_score_bins_hand_examples():
    """0 -> 0, 1 -> B-1, floor(B s) inside, values outside [0, 1] clipped."""
    np.testing.assert_array_equal(score_bins(np.array([0.0, 0.1, 0.25, 0.26, 0.5, 0.74, 0.75, 0.99, 1.0]), 4),
                                  [0, 0, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(score_bins(np.array([-3.0, -1e-9, 1 + 1e-9, 7.0]), 10), [0, 0, 9, 9])
    assert int(score_bins(0.999, 128)) == 127 and int(score_bins(0.5, 128)) == 64
    assert int(score_bins(0.7, 1)) == 0


@PROPS
@given(st.lists(st.floats(-2.0, 3.0, allow_nan=False), min_size=1, max_size=50), st.integers(1, 256))
def test_score_bins_matches_formula(scores, bins):
    """Every score lands in min(B-1, floor(B clip(s))), a valid bin."""
    got = score_bins(np.array(scores), bins)
    assert got.dtype.kind == "i"
    assert list(got) == [ref_bin(s, bins) for s in scores]
    assert all(0 <= b < bins for b in got)


obs_st = st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), max_size=60)


@PROPS
@given(obs_st, st.integers(1, 8), st.integers(1, 10), st.floats(0.1, 3.0))
def test_calibrator_sliding_windows(obs, window, bins, alpha):
    """counts() are a recount of the last `window` scores of each class;
    prior is the positive rate over the last `window` labels of either class;
    the table is the formula on those counts and that prior."""
    cal = BinnedCalibrator(bins=bins, alpha=alpha, window=window)
    for s, y in obs:
        cal.observe(s, y)
    pos = [ref_bin(s, bins) for s, y in obs if y][-window:]
    neg = [ref_bin(s, bins) for s, y in obs if not y][-window:]
    c_pos = [pos.count(b) for b in range(bins)]
    c_neg = [neg.count(b) for b in range(bins)]
    got_pos, got_neg = cal.counts()
    assert list(got_pos) == c_pos and list(got_neg) == c_neg
    labels = [y for _, y in obs][-window:]
    prior = sum(labels) / len(labels) if labels else 0.5
    assert cal.prior == pytest.approx(prior, abs=1e-12)
    assert cal.num_labels == len(labels)
    np.testing.assert_allclose(cal.table(), ref_posterior(c_pos, c_neg, prior, alpha), rtol=1e-12)
    np.testing.assert_allclose(cal.posterior(np.array([s for s, _ in obs])),
                               [ref_posterior(c_pos, c_neg, prior, alpha)[ref_bin(s, bins)] for s, _ in obs],
                               rtol=1e-12)


@PROPS
@given(obs_st, st.integers(1, 8), st.integers(1, 10), st.floats(0.0, 1.0), st.booleans())
def test_calibrator_new_label_moves_its_bin_the_right_way(obs, window, bins, s, label):
    """Observing a positive at s never lowers q(bin(s)); a negative never raises it
    (also when the windows evict old entries)."""
    cal = BinnedCalibrator(bins=bins, alpha=1.0, window=window)
    for x, y in obs:
        cal.observe(x, y)
    before = float(cal.posterior(s))
    cal.observe(s, label)
    after = float(cal.posterior(s))
    if label:
        assert after >= before - 1e-12
    else:
        assert after <= before + 1e-12


def test_prior_not_forced_to_half_by_full_buffers():
    """Two full per-class buffers do not make the prior 0.5: with window 4 and
    the label stream P N N N P N N N (both buffers hold >= 2), prior = 1/4."""
    cal = BinnedCalibrator(bins=2, alpha=1.0, window=4)
    for y in [True, False, False, False] * 2:
        cal.observe(0.9 if y else 0.1, y)
    assert cal.prior == pytest.approx(0.25)
    # More positives than negatives recently: 6 P then 1 N, window 4 -> P P P N -> 3/4.
    cal = BinnedCalibrator(bins=2, alpha=1.0, window=4)
    for y in [False] * 5 + [True] * 6 + [False]:
        cal.observe(0.5, y)
    assert cal.prior == pytest.approx(0.75)
    assert [int(c.sum()) for c in cal.counts()] == [4, 4]


def test_calibrator_rejects_bad_arguments():
    """bins < 1, window < 1 or alpha <= 0 are refused."""
    for kw in ({"bins": 0}, {"window": 0}, {"alpha": 0.0}, {"alpha": -1.0}):
        with pytest.raises(ValueError):
            BinnedCalibrator(**kw)


# =============================================================================================
# 2. Survival policy
# =============================================================================================

@st.composite
def policies(draw, feasible=True):
    p_min = draw(st.floats(0.01, 1.0))
    p_max = draw(st.floats(p_min, 1.0))
    if feasible:
        kappa = draw(st.floats(p_min, p_max))
    else:
        kappa = draw(st.one_of(st.floats(0.0, 2.0)))
        assume(kappa < p_min or kappa > p_max)
    rho = draw(st.floats(0.0, 1.0))
    lam = draw(st.floats(0.0, 10.0))
    return SurvivalPolicy(kappa, rho, lam, p_min, p_max)


q_arrays = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=500).map(np.array)


@PROPS
@given(policies(), q_arrays)
def test_solve_delta_hits_kappa(policy, q_ref):
    """With p_min <= kappa <= p_max, mean(p) over the reference scores is kappa,
    and every p stays within [p_min, p_max]."""
    delta = policy.solve_delta(q_ref)
    assert policy.delta == delta
    p = np.clip(policy.kappa + delta + policy.lam * (policy.rho - q_ref), policy.p_min, policy.p_max)
    assert abs(p.mean() - policy.kappa) <= 1e-3
    np.testing.assert_allclose(policy.probs(q_ref), p)
    assert np.all((policy.probs(q_ref) >= policy.p_min) & (policy.probs(q_ref) <= policy.p_max))


@PROPS
@given(policies(feasible=False), q_arrays)
def test_infeasible_kappa_pins_every_p_at_nearer_bound(policy, q_ref):
    """kappa below p_min puts every p at p_min; above p_max, at p_max."""
    policy.solve_delta(q_ref)
    bound = policy.p_min if policy.kappa < policy.p_min else policy.p_max
    np.testing.assert_allclose(policy.probs(q_ref), bound, atol=1e-9)


@PROPS
@given(policies(), st.floats(-1.0, 1.0), st.lists(st.floats(0.0, 1.0), min_size=2, max_size=50))
def test_probs_bounded_and_non_increasing_in_q(policy, delta, qs):
    """For any delta, p in [p_min, p_max], and p never rises as q rises;
    strictly decreasing where neither value is clipped (lam > 0)."""
    qs = np.sort(np.array(qs))
    p = policy.probs(qs, delta=delta)
    assert np.all((p >= policy.p_min) & (p <= policy.p_max))
    assert np.all(np.diff(p) <= 1e-12)
    raw = policy.kappa + delta + policy.lam * (policy.rho - qs)
    inside = (raw > policy.p_min) & (raw < policy.p_max)
    np.testing.assert_allclose(p[inside], raw[inside])


@PROPS
@given(policies(), st.lists(st.tuples(st.floats(0.0, 1.0), st.sampled_from([-1.0, 0.0, 1.0])), min_size=1,
                            max_size=300))
def test_solve_delta_with_directions_hits_kappa(policy, pairs):
    """With per-rollout leans d in {-1, 0, 1} the mean p over the reference
    (q, d) pairs is still kappa; d = -1 makes p non-decreasing in q, d = 0
    constant."""
    q = np.array([x for x, _ in pairs])
    d = np.array([y for _, y in pairs])
    delta = policy.solve_delta(q, d)
    p = np.clip(policy.kappa + delta + policy.lam * d * (policy.rho - q), policy.p_min, policy.p_max)
    assert abs(p.mean() - policy.kappa) <= 1e-3
    np.testing.assert_allclose(policy.probs(q, d), p)
    qs = np.sort(q)
    assert np.all(np.diff(policy.probs(qs, -1.0)) >= -1e-12)
    assert np.ptp(policy.probs(qs, 0.0)) == 0.0


def test_solve_delta_hand_example_and_empty():
    """kappa 0.5, rho 0.5, lam 0.5, q = [0, 1/2, 1] (no clipping): p = 0.5 + delta +
    [1/4, 0, -1/4], so delta = 0; q = [1, 1]: p = 0.25 + delta, delta = 1/4.
    No reference scores: delta = 0."""
    pol = SurvivalPolicy(0.5, 0.5, 0.5, 0.05, 1.0)
    assert pol.solve_delta(np.array([0.0, 0.5, 1.0])) == pytest.approx(0.0, abs=1e-9)
    assert pol.solve_delta(np.array([1.0, 1.0])) == pytest.approx(0.25, abs=1e-9)
    assert pol.solve_delta(np.array([])) == 0.0 and pol.delta == 0.0
    # With clipping: kappa 0.5, lam 2, rho 0, q = [0, 1], p_min 0.1: raw = 0.5 + d - [0, 2];
    # the second clips to 0.1, so 0.5 + d + 0.1 = 1.0 -> d = 0.4.
    pol = SurvivalPolicy(0.5, 0.0, 2.0, 0.1, 1.0)
    assert pol.solve_delta(np.array([0.0, 1.0])) == pytest.approx(0.4, abs=1e-9)


def test_survival_rejects_bad_bounds():
    """p_min must be in (0, p_max] and p_max <= 1."""
    for p_min, p_max in [(0.0, 1.0), (0.6, 0.5), (0.1, 1.5)]:
        with pytest.raises(ValueError):
            SurvivalPolicy(0.5, 0.5, 0.5, p_min, p_max)


# =============================================================================================
# 3. Head-quality and balance metrics
# =============================================================================================

scored_labels = st.lists(st.tuples(st.integers(0, 6).map(lambda k: k / 6), st.booleans()), min_size=1, max_size=40)


@PROPS
@given(scored_labels)
def test_head_auc_matches_pair_count(pairs):
    """AUC equals the brute-force count over all positive/negative pairs (ties 1/2);
    NaN with one class only."""
    s, y = [p[0] for p in pairs], [p[1] for p in pairs]
    want, got = ref_auc(s, y), head_auc(s, y)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, abs=1e-12)


@PROPS
@given(scored_labels)
def test_head_spearman_matches_rank_correlation(pairs):
    """Spearman equals Pearson on average ranks; NaN with one class or constant scores."""
    s, y = [p[0] for p in pairs], [p[1] for p in pairs]
    got = head_spearman(s, y)
    if len(set(y)) < 2 or len(set(s)) < 2:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(ref_spearman(s, y), abs=1e-9)


@PROPS
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.booleans()), max_size=40), st.floats(0.0, 1.0))
def test_head_accuracy_matches_count(pairs, threshold):
    """Accuracy is the fraction with (p >= threshold) == label; NaN when empty."""
    p, y = [a for a, _ in pairs], [b for _, b in pairs]
    got = head_accuracy(p, y, threshold)
    if not pairs:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(sum((a >= threshold) == b for a, b in pairs) / len(pairs))


def test_metric_hand_examples():
    """AUC of [0.9, 0.4 | 0.4, 0.1]: pairs (0.9>0.4, 0.9>0.1, 0.4=0.4, 0.4>0.1) = 3.5/4;
    a perfect ranking gives AUC 1 and Spearman of +1 for two items."""
    assert head_auc([0.9, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert head_auc([0.1, 0.9], [0, 1]) == 1.0 and head_auc([0.1, 0.9], [1, 0]) == 0.0
    assert math.isnan(head_auc([0.1, 0.2], [1, 1])) and math.isnan(head_auc([], []))
    assert head_spearman([0.1, 0.9], [0, 1]) == pytest.approx(1.0)
    assert math.isnan(head_spearman([0.3], [1])) and math.isnan(head_spearman([0.1, 0.2], [0, 0]))
    assert head_accuracy([0.5, 0.49, 0.8], [1, 1, 0]) == pytest.approx(1 / 3)


@PROPS
@given(st.lists(st.lists(st.booleans(), max_size=8), max_size=10))
def test_group_balance_matches_hand_loop(groups):
    """E[rho_hat] and E[rho_hat (1 - rho_hat)] over the non-empty groups; NaN when none."""
    fracs = [sum(g) / len(g) for g in groups if g]
    m, v = group_balance(groups)
    if not fracs:
        assert math.isnan(m) and math.isnan(v)
    else:
        assert m == pytest.approx(sum(fracs) / len(fracs))
        assert v == pytest.approx(sum(f * (1 - f) for f in fracs) / len(fracs))


def test_group_balance_hand_example():
    """[[T, F, T], [F, F], []] -> rho_hat = (2/3, 0): mean 1/3, variance term (2/9 + 0) / 2 = 1/9."""
    m, v = group_balance([[True, False, True], [False, False], []])
    assert m == pytest.approx(1 / 3) and v == pytest.approx(1 / 9)


# =============================================================================================
# 4a. make_pruner, mode none and random
# =============================================================================================

def test_mode_none_keeps_everything():
    """mode none: a plain Pruner that keeps every rollout and wants no score."""
    p = make_pruner(config_from_dict({}))
    assert type(p) is Pruner
    r = mk(0, 600, score=-5.0)
    assert p.score_at(r) is None and p.review(r, [r]) is True
    assert r.decision is None and r.keep_prob == 1.0
    assert p.group_too_small([]) is False and p.end_step([]) == {} and p.summary() == {}


def test_make_pruner_modes():
    """random and arrol modes build their pruners with the run's seed."""
    assert type(make_pruner(make_cfg(mode="random", l_detect=8))) is RandomPruner
    assert type(make_pruner(make_cfg(mode="arrol", l_detect=8))) is ArrolPruner
    with pytest.raises(Exception):
        make_cfg(mode="random", l_detect=MAX_TOKENS)  # l_detect must be below max_tokens


def random_pruner(**kw) -> RandomPruner:
    base = dict(mode="random", l_detect=8, kappa=0.5, cold_start_steps=0, exempt_fraction=0.0,
                min_survivors=1, small_groups="drop")
    base.update(kw)
    return make_pruner(make_cfg(**base))


def test_random_no_decision_before_l_detect():
    """Below l_detect tokens nothing is decided; at l_detect a decision is made."""
    p = random_pruner(kappa=0.01)
    r = mk(0, 7)
    assert p.score_at(r) is None
    assert p.review(r, [r]) is True and r.decision is None
    grow(r, 8)
    p.review(r, [r])
    assert r.decision in ("kept", "pruned")


def test_random_cold_start():
    """While fewer than cold_start_steps steps have ended: decision "cold",
    kept with keep_prob 1; from then on the draw happens."""
    p = random_pruner(kappa=0.05, cold_start_steps=3)
    for step in range(3):
        rs = [mk(i, 8, group=f"s{step}") for i in range(20)]
        assert all(p.review(r, rs) for r in rs)
        assert all(r.decision == "cold" and r.keep_prob == 1.0 for r in rs)
        m = p.end_step([])
        assert m["prune_active"] == 0.0 and m["reached_l_detect"] == 20 and math.isnan(m["keep_rate"])
    rs = [mk(i, 8, group="late") for i in range(20)]
    for r in rs:
        p.review(r, rs)
    assert {r.decision for r in rs} <= {"kept", "pruned"} and any(r.decision == "pruned" for r in rs)
    assert p.end_step([])["prune_active"] == 1.0


@pytest.mark.parametrize("kappa", [0.2, 0.5, 0.8])
def test_random_keep_rate_is_kappa(kappa):
    """Over 4000 independent decisions the kept fraction is within 0.03 of kappa;
    kept and pruned rollouts carry keep_prob kappa; review's answer is the decision."""
    p = random_pruner(kappa=kappa)
    kept = 0
    for i in range(4000):
        r = mk(i, 8)
        ok = p.review(r, [r])
        assert ok == (r.decision == "kept")
        assert r.decision in ("kept", "pruned") and r.keep_prob == kappa
        kept += ok
    assert abs(kept / 4000 - kappa) < 0.03
    m = p.end_step([])
    assert m["keep_rate"] == pytest.approx(kept / 4000)
    assert m["pruned"] == 4000 - kept and m["reached_l_detect"] == 4000


def test_random_exempt_fraction_one():
    """exempt_fraction 1: every decision is "exempt", kept with keep_prob 1."""
    p = random_pruner(kappa=0.05, exempt_fraction=1.0)
    rs = [mk(i, 8) for i in range(200)]
    assert all(p.review(r, rs) for r in rs)
    assert all(r.decision == "exempt" and r.keep_prob == 1.0 for r in rs)
    m = p.end_step([])
    assert m["exempt"] == 200 and math.isnan(m["keep_rate"])


def test_random_decision_made_once():
    """A decided rollout is not drawn again: later reviews leave decision and keep_prob alone."""
    p = random_pruner(kappa=0.5)
    rs = [mk(i, 8) for i in range(100)]
    for r in rs:
        p.review(r, [r])
    first = [(r.decision, r.keep_prob) for r in rs]
    for r in rs:
        grow(r, 20)
        for _ in range(3):
            p.review(r, [r])
    assert [(r.decision, r.keep_prob) for r in rs] == first
    assert p.end_step([])["reached_l_detect"] == 100


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 8), st.integers(0, 3), st.floats(0.01, 1.0), st.integers(0, 2**31), st.randoms())
def test_small_groups_keep_spares_to_min_survivors(size, early, kappa, seed, rnd):
    """small_groups keep, min_survivors 2: whatever the draws and the order,
    at least min(2, size) members end up not pruned; a rollout whose pruning
    would leave fewer than 2 is "spared", without a draw, with keep_prob 1
    (kept whatever the draw); any other is drawn with keep_prob kappa."""
    cfg = config_from_dict({"pruner": dict(mode="random", l_detect=8, kappa=kappa, cold_start_steps=0,
                                           exempt_fraction=0.0, min_survivors=2, small_groups="keep"),
                            "generator": {"max_tokens": MAX_TOKENS}, "run": {"seed": seed}})
    p = make_pruner(cfg)
    early = min(early, size)
    members = [mk(i, 3, finish="stop") for i in range(early)]  # ended before l_detect: never decided
    members += [mk(i, 0) for i in range(early, size)]
    order = list(range(early, size))
    rnd.shuffle(order)
    for i in order:
        r = grow(members[i], 8)
        alive_others = sum(m.decision != "pruned" for m in members if m is not r)
        ok = p.review(r, members)
        assert ok == (r.decision != "pruned")
        if alive_others < 2:
            assert r.decision == "spared" and r.keep_prob == 1.0
        else:
            assert r.decision in ("kept", "pruned") and r.keep_prob == kappa
        assert sum(m.decision != "pruned" for m in members) >= 2
        assert p.group_too_small(members) is False  # "keep" never drops


def test_small_groups_keep_spares_when_draws_say_prune():
    """kappa tiny: in a group of 4 the first two are pruned, the last two spared."""
    p = random_pruner(kappa=1e-9, min_survivors=2, small_groups="keep")
    members = [mk(i, 8) for i in range(4)]
    for r in members:
        p.review(r, members)
    assert [r.decision for r in members] == ["pruned", "pruned", "spared", "spared"]
    m = p.end_step([])
    assert m["spared"] == 2 and m["pruned"] == 2 and m["keep_rate"] == pytest.approx(0.5)


def _mean_weight(kept: list[bool], keep_prob: list[float]) -> tuple[float, float]:
    """Mean of 1{kept}/keep_prob and its standard error."""
    w = np.array([k / p for k, p in zip(kept, keep_prob)])
    return float(w.mean()), float(w.std(ddof=1) / math.sqrt(len(w)))


@pytest.mark.parametrize("exempt", [0.0, 0.3])
def test_inclusion_is_exact_at_the_group_minimum(exempt):
    """G = 4, p = 0.3, min_survivors 2 (the issue's case): every member's
    1{kept} / keep_prob averages to 1, whatever its turn in the group; the
    draw-then-spare order gave 1.35 and 1.55."""
    p = random_pruner(kappa=0.3, min_survivors=2, small_groups="keep", exempt_fraction=exempt)
    kept, probs = [[] for _ in range(4)], [[] for _ in range(4)]
    for g in range(6000):
        members = [mk(i, 0, group=f"g{g}") for i in range(4)]
        for r in members:
            grow(r, 8)
            p.review(r, members)
        for i, r in enumerate(members):
            kept[i].append(r.decision != "pruned")
            probs[i].append(r.keep_prob)
    for i in range(4):
        mean, se = _mean_weight(kept[i], probs[i])
        assert abs(mean - 1.0) < 4 * se, (i, mean, se)
    assert sum(k for k in kept[3]) > sum(k for k in kept[0])  # the last ones were spared


def test_exempt_and_kept_record_the_chance_of_either():
    """exempt_fraction e, kappa p: an exempt or a kept rollout was kept with
    probability e + (1 - e) p, and that is its frequency."""
    e, kappa = 0.2, 0.4
    p = random_pruner(kappa=kappa, min_survivors=1, small_groups="keep", exempt_fraction=e)
    rs = [mk(i, 8, group=f"g{i}") for i in range(20000)]
    for r in rs:  # beside a member that ended before l_detect: never at the minimum
        p.review(r, [r, mk(1, 3, group=r.group_id, finish="stop")])
    assert all(r.keep_prob == pytest.approx(e + (1 - e) * kappa) for r in rs if r.decision != "pruned")
    mean, se = _mean_weight([r.decision != "pruned" for r in rs], [r.keep_prob for r in rs])
    assert abs(mean - 1.0) < 4 * se


def test_inclusion_is_exact_across_a_restart():
    """Kept with p, restarted (its tokens too stale), drawn again: it reaches
    the batch only if both draws kept it, so keep_prob is p^2 and
    1{kept}/keep_prob averages to 1 (resetting it to the second p gave 0.39
    at p = 0.4)."""
    p = random_pruner(kappa=0.4, min_survivors=1, small_groups="keep", exempt_fraction=0.0)
    kept, probs = [], []
    for i in range(20000):
        r = mk(i, 0, group=f"g{i}")
        members = [r, mk(1, 3, group=r.group_id, finish="stop")]  # never at the minimum
        grow(r, 8)
        if p.review(r, members):
            restart(r)
            grow(r, 8)
            p.review(r, members)
        kept.append(r.decision != "pruned")
        probs.append(r.keep_prob)
    assert all(q == pytest.approx(0.16) for q, k in zip(probs, kept) if k)
    mean, se = _mean_weight(kept, probs)
    assert abs(mean - 1.0) < 4 * se


def test_small_groups_drop():
    """small_groups drop: nobody is spared, and group_too_small turns True
    once fewer than min_survivors members are unpruned."""
    p = random_pruner(kappa=0.3, min_survivors=2, small_groups="drop")
    became_small = 0
    for g in range(50):
        members = [mk(i, 0, group=f"g{g}") for i in range(4)]
        for r in members:
            grow(r, 8)
            p.review(r, members)
            assert r.decision in ("kept", "pruned")
            unpruned = sum(m.decision != "pruned" for m in members)
            assert p.group_too_small(members) == (unpruned < 2)
            became_small += unpruned < 2
    assert became_small > 0


def test_end_step_metrics_hand_example():
    """keep_rate over drawn decisions (kept + spared) / (kept + spared + pruned),
    rho_hat from survivors' rewards only (pruned members and reward None left
    out, groups with no survivor skipped), prune lag = mean tokens past l_detect
    of pruned rollouts."""
    p = random_pruner(kappa=0.5, min_survivors=1, small_groups="drop")
    rs = [mk(i, 8, group="d") for i in range(40)]
    for r in rs:
        p.review(r, rs)
    dec = [r.decision for r in rs]
    want_keep = (dec.count("kept") + dec.count("spared")) / (dec.count("kept") + dec.count("spared")
                                                              + dec.count("pruned"))
    a = [mk(0, 20, "a", reward=1.0, finish="stop"), mk(1, 20, "a", reward=0.0, finish="stop"),
         mk(2, 30, "a", reward=1.0, finish="length"), mk(3, 11, "a", reward=1.0, finish="pruned"),
         mk(4, 40, "a", reward=None, finish="length")]
    b = [mk(0, 20, "b", reward=0.0, finish="stop"), mk(1, 20, "b", reward=0.2, finish="stop"),
         mk(2, 13, "b", reward=1.0, finish="pruned")]
    c = [mk(0, 9, "c", reward=1.0, finish="pruned")]
    m = p.end_step([Group(group_id="a", rollouts=a), Group(group_id="b", rollouts=b),
                    Group(group_id="c", rollouts=c)])
    assert m["keep_rate"] == pytest.approx(want_keep)
    assert m["pruned"] == dec.count("pruned") and m["reached_l_detect"] == 40
    # rho_hat: a -> 2/3 (rewards 1, 0, 1), b -> 0 (0, 0.2), c has no survivor.
    assert m["rho_hat_mean"] == pytest.approx(1 / 3)
    assert m["rho_var_mean"] == pytest.approx((2 / 9 + 0) / 2)
    assert m["kept_rollouts"] == 6
    assert m["prune_lag_tokens"] == pytest.approx(((11 - 8) + (13 - 8) + (9 - 8)) / 3)
    # Counters reset each step.
    m2 = p.end_step([])
    assert m2["reached_l_detect"] == 0 and math.isnan(m2["keep_rate"]) and math.isnan(m2["prune_lag_tokens"])


# =============================================================================================
# 4b. ARRoL pruner
# =============================================================================================

def arrol_pruner(**kw) -> ArrolPruner:
    base = dict(mode="arrol", l_detect=8, kappa=0.5, rho=0.5, lam=0.5, p_min=0.05, p_max=1.0, bins=4,
                alpha=1.0, cold_start_steps=1, exempt_fraction=0.0, min_survivors=1, small_groups="drop")
    base.update(kw)
    p = make_pruner(make_cfg(**base))
    assert isinstance(p, ArrolPruner)
    return p


def test_arrol_score_at():
    """score_at asks for a score at l_detect for a fresh rollout (or one not
    yet past l_detect), and not once it has a score, a decision, or more tokens."""
    p = arrol_pruner()
    assert p.score_at(mk(0, 0)) == 8
    assert p.score_at(mk(0, 8)) == 8
    assert p.score_at(mk(0, 9)) is None
    assert p.score_at(mk(0, 3, score=0.2)) is None
    r = mk(0, 3)
    r.decision = "unscored"
    assert p.score_at(r) is None


def test_arrol_waits_for_score_then_unscored():
    """Past l_detect without a score: no decision until l_detect + SCORE_GRACE_TOKENS,
    then "unscored" and kept; a score arriving in time gets a decision."""
    p = arrol_pruner(cold_start_steps=0)
    r = mk(0, 8)
    for n in range(8, 8 + SCORE_GRACE_TOKENS):
        grow(r, n)
        assert p.review(r, [r]) is True and r.decision is None
    grow(r, 8 + SCORE_GRACE_TOKENS)
    assert p.review(r, [r]) is True
    assert r.decision == "unscored" and r.keep_prob == 1.0
    r.score = 2.0  # too late: the decision stands
    p.review(r, [r])
    assert r.decision == "unscored"
    s = mk(1, 20)
    assert p.review(s, [s]) is True and s.decision is None
    s.score = 0.0
    p.review(s, [s])
    assert s.decision in ("kept", "pruned")
    m = p.end_step([])
    assert m["unscored"] == 1 and m["reached_l_detect"] == 2


def cold_step_groups() -> tuple[list[Rollout], list[Group]]:
    """The hand example's first step (bins 4: sigmoid(3) = 0.953 -> bin 3,
    sigmoid(0.5) = 0.622 -> 2, sigmoid(-0.5) = 0.378 -> 1, sigmoid(-3) = 0.047 -> 0)."""
    g1 = [mk(0, 8, "h1", score=3.0, reward=1.0, finish="stop"),
          mk(1, 8, "h1", score=3.0, reward=1.0, finish="stop"),
          mk(2, 8, "h1", score=0.5, reward=1.0, finish="stop"),
          mk(3, 8, "h1", score=-3.0, reward=0.0, finish="stop")]
    g2 = [mk(0, 8, "h2", score=-0.5, reward=0.0, finish="stop"),
          mk(1, 8, "h2", score=-0.5, reward=0.0, finish="length"),
          mk(2, 4, "h2", score=None, reward=1.0, finish="stop"),  # ended before l_detect: no score
          mk(3, 8, "h2", score=3.0, reward=None, finish="length")]  # no reward: no label
    return g1 + g2, [Group(group_id="h1", rollouts=g1), Group(group_id="h2", rollouts=g2)]


def test_arrol_calibration_and_delta_hand_example():
    """After a cold step the calibrator holds the step's labelled scores:
    c+ = [0, 0, 1, 2], c- = [1, 2, 0, 0], prior 3/6. With alpha 1, B 4:
    P(b|1) = [1, 1, 2, 3]/7, P(b|0) = [2, 3, 1, 1]/7, so q = [1/3, 1/4, 2/3, 3/4].
    Recent scores (all 7 scored rollouts) have q = 3/4 x3, 2/3, 1/3, 1/4 x2,
    mean 3.75/7; with no clipping mean(p) = 0.5 + delta + 0.5 (0.5 - mean q) = 0.5
    gives delta = (mean q - 0.5) / 2 = 1/56. Then a rollout at logit 3 (q 3/4)
    has p = 0.5 + 1/56 - 1/8 = 11/28 and one at logit -0.5 (q 1/4) has p = 9/14."""
    p = arrol_pruner()
    rollouts, groups = cold_step_groups()
    for r in rollouts:
        assert p.review(r, rollouts) is True
    assert [r.decision for r in rollouts] == ["cold"] * 6 + [None, "cold"]
    m = p.end_step(groups)
    c_pos, c_neg = p.calibrator.counts()
    assert list(c_pos) == [0, 0, 1, 2] and list(c_neg) == [1, 2, 0, 0]
    assert p.calibrator.prior == pytest.approx(0.5) and m["calib_prior"] == pytest.approx(0.5)
    np.testing.assert_allclose(p.calibrator.table(), [1 / 3, 1 / 4, 2 / 3, 3 / 4], rtol=1e-12)
    assert m["survival_delta"] == pytest.approx(1 / 56, abs=1e-6)
    assert p.policy.delta == pytest.approx(1 / 56, abs=1e-6)
    # The cold rollouts are the unbiased slice: positives all score above negatives.
    assert m["head_auc"] == 1.0 and m["head_eval_n"] == 6
    assert m["prune_active"] == 0.0 and m["reached_l_detect"] == 7

    hi, lo = mk(0, 8, "n", score=3.0), mk(1, 8, "n", score=-0.5)
    for r in (hi, lo):
        p.review(r, [hi, lo])
        assert r.decision in ("kept", "pruned")
    assert hi.q == pytest.approx(3 / 4) and lo.q == pytest.approx(1 / 4)
    assert hi.keep_prob == pytest.approx(11 / 28, abs=1e-6)
    assert lo.keep_prob == pytest.approx(9 / 14, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(-6.0, 6.0), st.booleans()), min_size=4, max_size=60),
       st.floats(0.1, 0.9), st.floats(0.0, 1.0), st.floats(0.0, 3.0), st.integers(1, 16))
def test_arrol_delta_targets_kappa_over_recent_scores(labelled, kappa, rho, lam, bins):
    """After end_step, mean p over the posteriors of the recent scores (every
    rollout reviewed at l_detect, labelled or not) is kappa, with q recomputed
    independently from the labelled survivors; higher q never gets a higher p."""
    # A score within rounding of a bin edge may land in either bin, by the
    # pruner's sigmoid or by ours: not what this test is about.
    assume(all(abs(ref_sigmoid(s) * bins - round(ref_sigmoid(s) * bins)) > 1e-9 for s, _ in labelled))
    p = arrol_pruner(kappa=kappa, rho=rho, lam=lam, bins=bins, p_min=0.05, p_max=1.0)
    rs = [mk(i, 8, "x", score=s, reward=float(y), finish="stop") for i, (s, y) in enumerate(labelled)]
    rs.append(mk(len(rs), 8, "x", score=1.7, reward=None, finish="length"))  # scored, unlabelled
    for r in rs:
        p.review(r, rs)
    p.end_step([Group(group_id="x", rollouts=rs)])
    pos = [ref_bin(ref_sigmoid(s), bins) for s, y in labelled if y]
    neg = [ref_bin(ref_sigmoid(s), bins) for s, y in labelled if not y]
    table = ref_posterior([pos.count(b) for b in range(bins)], [neg.count(b) for b in range(bins)],
                          sum(y for _, y in labelled) / len(labelled), 1.0)
    q = np.array([table[ref_bin(ref_sigmoid(r.score), bins)] for r in rs])
    surv = np.clip(kappa + p.policy.delta + lam * (rho - q), 0.05, 1.0)
    assert abs(surv.mean() - kappa) <= 1e-3
    # After cold start: the drawn keep_prob follows q downward.
    fresh = [mk(i, 8, "y", score=s) for i, s in enumerate(np.linspace(-6, 6, 13))]
    others = [mk(99, 0, "y")] + fresh
    for r in fresh:
        p.review(r, others)
        assert r.decision in ("kept", "pruned")
        assert r.q == pytest.approx(table[ref_bin(ref_sigmoid(r.score), bins)])
    by_q = sorted(fresh, key=lambda r: r.q)
    assert all(a.keep_prob >= b.keep_prob - 1e-12 for a, b in zip(by_q, by_q[1:]))


def test_arrol_summary_uses_exempt_slice_only():
    """summary()'s head quality covers the exempt rollouts after cold start only:
    cold rollouts (scored backwards here) and drawn ones are left out."""
    p = arrol_pruner(cold_start_steps=1, exempt_fraction=0.5, kappa=0.5)
    # Cold step: the head is exactly wrong.
    cold = [mk(i, 8, "c", score=(-2.0 if i % 2 else 2.0), reward=float(i % 2), finish="stop") for i in range(16)]
    for r in cold:
        p.review(r, cold)
    p.end_step([Group(group_id="c", rollouts=cold)])
    rng = random.Random(5)
    groups, rs = [], []
    for g in range(25):
        members = []
        for i in range(8):
            y = rng.random() < 0.5
            members.append(mk(i, 8, f"e{g}", score=rng.gauss(1.0 if y else -1.0, 1.5), reward=float(y)))
        for r in members:
            p.review(r, members)
            r.finish_reason = "pruned" if r.decision == "pruned" else "stop"
        groups.append(Group(group_id=f"e{g}", rollouts=members))
        rs += members
    p.end_step(groups)
    ex = [r for r in rs if r.decision == "exempt"]
    assert 50 < len(ex) < 150 and any(r.decision == "pruned" for r in rs)
    s = p.summary()
    assert s["head_eval_n"] == len(ex)
    assert s["head_auc"] == pytest.approx(ref_auc([r.score for r in ex], [r.reward >= 0.5 for r in ex]))
    assert s["head_spearman"] == pytest.approx(ref_spearman([r.score for r in ex], [r.reward for r in ex]))
    acc = sum((r.score >= 0) == (r.reward >= 0.5) for r in ex) / len(ex)  # sigmoid(s) >= 1/2 iff s >= 0
    assert s["head_accuracy"] == pytest.approx(acc)


def test_arrol_min_head_auc_gates_pruning_on_the_measured_head():
    """min_head_auc: after cold start the pruner prunes only while the head's
    AUC on the rollouts no draw removed is at least the gate; until then
    every rollout passes as in cold start (and feeds the measure)."""
    p = arrol_pruner(cold_start_steps=1, min_head_auc=0.7, exempt_fraction=0.0, kappa=0.5, min_survivors=1)

    def step(k: int, informative: bool) -> tuple[list[str], dict]:
        rs = [mk(i, 8, f"s{k}", score=((2.0 if i % 2 else -2.0) if informative else 0.0), reward=float(i % 2))
              for i in range(16)]
        for r in rs:
            p.review(r, rs)
            r.finish_reason = "pruned" if r.decision == "pruned" else "stop"
        return [r.decision for r in rs], p.end_step([Group(group_id=f"s{k}", rollouts=rs)])

    # Cold start, a head at chance (equal scores: AUC 0.5).
    dec, m = step(0, informative=False)
    assert set(dec) == {"cold"} and m["head_auc"] == pytest.approx(0.5)
    # After cold start the gate stays shut: AUC 0.5 < 0.7. A perfect head
    # this step lifts the pooled AUC to (64 x 0.5 + 64 x 1) / 128 = 0.75.
    dec, m = step(1, informative=True)
    assert set(dec) == {"cold"} and m["prune_active"] == 0.0 and m["head_auc"] == pytest.approx(0.75)
    # Open: the survival draws decide.
    dec, m = step(2, informative=True)
    assert m["prune_active"] == 1.0 and "pruned" in dec and "cold" not in dec
    # The gate is part of the state a resumed pruner takes up.
    q = arrol_pruner(cold_start_steps=1, min_head_auc=0.7, exempt_fraction=0.0, kappa=0.5, min_survivors=1)
    q.load_state_dict(p.state_dict())
    assert q.active and q.head_auc == p.head_auc
    # Without a gate the same pruner prunes right after cold start.
    free = arrol_pruner(cold_start_steps=1, exempt_fraction=0.0, kappa=0.5, min_survivors=1)
    p = free
    step(0, informative=False)
    dec, m = step(1, informative=False)
    assert m["prune_active"] == 1.0 and "cold" not in dec


@pytest.mark.parametrize("balance", ["fixed", "group"])
def test_arrol_balance_leans_each_group_toward_rho(balance):
    """A likely-correct rollout (high q) and a likely-wrong one, in a group
    whose finished members all failed and in one whose finished members all
    passed. ARRoL's Eq. 2 ("fixed") keeps the likely-wrong one more often in
    both, which pushes the failing group further from rho = 0.5; "group"
    leans the failing group the other way (ARRoL's Lemma 4.1, second case)."""
    p = arrol_pruner(balance=balance, cold_start_steps=0, bins=4, kappa=0.5, rho=0.5, lam=0.5)
    for _ in range(20):  # a calibrated head: high scores pass, low ones fail
        p.calibrator.observe(sigmoid(3.0), True)
        p.calibrator.observe(sigmoid(-3.0), False)
    probs = {}
    for name, reward in (("failing", 0.0), ("passing", 1.0)):
        done = [mk(i, 20, name, reward=reward, finish="stop") for i in range(6)]
        hi, lo = mk(6, 8, name, score=3.0), mk(7, 8, name, score=-3.0)
        members = done + [hi, lo]
        for r in (hi, lo):
            assert p.at_decision_point(r, members)
        assert hi.q > 0.5 > lo.q
        probs[name] = (p.keep_probability(hi, members), p.keep_probability(lo, members))
    assert probs["passing"][0] < probs["passing"][1]
    if balance == "fixed":
        assert probs["failing"][0] < probs["failing"][1]
        assert list(p.recent_directions) == [1.0] * 4
    else:
        assert probs["failing"][0] > probs["failing"][1]
        assert list(p.recent_directions) == [-1.0, -1.0, 1.0, 1.0]
    # The leans are part of the state a resumed pruner takes up.
    q = arrol_pruner(balance=balance, cold_start_steps=0, bins=4, kappa=0.5, rho=0.5, lam=0.5)
    q.load_state_dict(p.state_dict())
    assert list(q.recent_directions) == list(p.recent_directions)


def test_arrol_end_step_shared_metrics():
    """ARRoL's end_step carries the shared metrics: keep_rate over drawn decisions,
    rho_hat over survivors, head_auc_kept over this step's labelled survivors."""
    p = arrol_pruner(cold_start_steps=0, kappa=0.5)
    rs = [mk(i, 8 + i, "k", score=(i - 10) / 3, reward=float(i % 3 == 0)) for i in range(20)]
    for r in rs:
        p.review(r, rs)
        r.finish_reason = "pruned" if r.decision == "pruned" else "stop"
    m = p.end_step([Group(group_id="k", rollouts=rs)])
    dec = [r.decision for r in rs]
    drawn = dec.count("kept") + dec.count("pruned") + dec.count("spared")
    assert drawn == 20
    assert m["keep_rate"] == pytest.approx((dec.count("kept") + dec.count("spared")) / drawn)
    surv = [r for r in rs if r.decision != "pruned"]
    assert m["rho_hat_mean"] == pytest.approx(sum(r.reward for r in surv) / len(surv))
    want_auc = ref_auc([r.score for r in surv], [r.reward >= 0.5 for r in surv])
    assert (math.isnan(want_auc) and math.isnan(m["head_auc_kept"])) or m["head_auc_kept"] == pytest.approx(want_auc)
    pruned = [r for r in rs if r.decision == "pruned"]
    assert m["prune_lag_tokens"] == pytest.approx(np.mean([len(r.response_ids) - 8 for r in pruned]))
    # Pruned rollouts have no label, so the calibrator saw only the survivors.
    assert sum(int(c.sum()) for c in p.calibrator.counts()) == len(surv)


# =============================================================================================
# 5. Quality head and its trainer
# =============================================================================================

def test_features_round_trip():
    """decode_features(encode_features(x)) == x (float32, bit for bit); mixed sizes are refused."""
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    enc = encode_features(x)
    assert len(enc) == 5 and all(len(b) == 7 * 4 for b in enc)
    assert torch.equal(decode_features(enc), x)
    assert enc[0] == np.asarray(x[0].numpy(), dtype="<f4").tobytes()
    assert decode_features([]).shape == (0, 0)
    with pytest.raises(ValueError):
        decode_features([enc[0], enc[1][:-4]])


def test_head_from_synced_identical():
    """A head rebuilt from named_for_sync() has the same size and outputs."""
    torch.manual_seed(3)
    head = QualityHead(12, 5).eval()
    synced = head.named_for_sync()
    assert all(k.startswith("quality_head.") for k in synced)
    copy = QualityHead.from_synced(synced)
    assert copy.in_features == 12 and copy.net[0].out_features == 5
    x = torch.randn(9, 12)
    assert torch.equal(copy(x), head(x)) and head(x).shape == (9,)
    with pytest.raises(ValueError):
        QualityHead.from_synced({"quality_head.net.2.weight": torch.zeros(1, 5)})


def head_cfg(**kw):
    base = dict(mode="arrol", l_detect=8, head_hidden=16, head_lr=1e-2, head_updates=8, head_batch=64,
                head_replay=4096)
    base.update(kw)
    return make_cfg(**base).pruner


def separable_groups(n_groups: int, hidden: int, seed: int, finish="stop"):
    """Groups of 8 rollouts with Gaussian features labelled by the sign of w.x."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden, generator=gen)
    groups = []
    for g in range(n_groups):
        x = torch.randn(8, hidden, generator=gen)
        feats = encode_features(x)
        members = [mk(i, 8, f"f{g}", reward=float((x[i] @ w) > 0), finish=finish) for i in range(8)]
        for r, f in zip(members, feats):
            r.features = f
        groups.append(Group(group_id=f"f{g}", rollouts=members))
    return groups, w


def test_trainer_learns_separable_labels():
    """On linearly separable features the head's training AUC passes 0.9 within a few dozen train() calls."""
    hidden = 6
    t = QualityHeadTrainer(hidden, head_cfg(), seed=0)
    assert t.train()["head_replay"] == 0  # nothing to train on yet
    groups, _ = separable_groups(24, head_input_size(hidden), seed=1)
    assert t.add(groups) == 24 * 8
    for _ in range(40):
        out = t.train()
    assert out["head_replay"] == 24 * 8 and math.isfinite(out["head_loss"])
    feats = decode_features([r.features for g in groups for r in g.rollouts])
    labels = [r.reward >= 0.5 for g in groups for r in g.rollouts]
    with torch.no_grad():
        logits = t.head(feats).tolist()
    auc = ref_auc(logits, labels)
    assert auc > 0.9, auc
    acc = sum((s >= 0) == y for s, y in zip(logits, labels)) / len(labels)
    assert out["head_train_acc"] == pytest.approx(acc)


def test_trainer_add_rejects_wrong_feature_size():
    """Features of the wrong length raise a ValueError naming the rollout."""
    t = QualityHeadTrainer(4, head_cfg(), seed=0)
    r = mk(3, 8, "bad", reward=1.0, finish="stop")
    r.features = encode_features(torch.zeros(1, 5))[0]
    with pytest.raises(ValueError, match="bad-3"):
        t.add([Group(group_id="bad", rollouts=[r])])


def test_trainer_skips_pruned_and_unlabelled():
    """Only scored survivors with a reward feed the replay: pruned rollouts,
    rollouts without features and rollouts without a reward are left out."""
    t = QualityHeadTrainer(4, head_cfg(), seed=0)
    f = encode_features(torch.ones(4, head_input_size(4)))
    rs = [mk(i, 8, "p", reward=1.0, finish=fin) for i, fin in enumerate(["stop", "pruned", "length", "pruned"])]
    for r, b in zip(rs, f):
        r.features = b
    rs[2].reward = None
    extra = mk(4, 8, "p", reward=0.0, finish="stop")  # no features
    assert t.add([Group(group_id="p", rollouts=rs + [extra])]) == 1
    x, y = t.replay()
    assert torch.equal(x, decode_features([f[0]])) and y.tolist() == [1.0]
    # A pruned rollout with features of the wrong size is not even looked at.
    bad = mk(5, 8, "q", reward=1.0, finish="pruned")
    bad.features = b"\x00" * 12
    assert t.add([Group(group_id="q", rollouts=[bad])]) == 0


def test_trainer_replay_keeps_the_latest_window():
    """The replay holds the last head_replay labelled rows, oldest overwritten first."""
    t = QualityHeadTrainer(1, head_cfg(head_replay=5), seed=0)
    width = head_input_size(1)
    for start in (0, 3, 6):  # 9 rows in three adds
        rs = [mk(i, 8, f"w{start}", reward=float(i % 2), finish="stop") for i in range(3)]
        for k, r in enumerate(rs):
            r.features = encode_features(torch.full((1, width), float(start + k)))[0]
        assert t.add([Group(group_id=f"w{start}", rollouts=rs)]) == 3
    x, y = t.replay()
    assert sorted(x[:, 0].tolist()) == [4.0, 5.0, 6.0, 7.0, 8.0]
    assert len(y) == 5 and t.train()["head_replay"] == 5


def test_trainer_deterministic_per_seed():
    """Two trainers with the same seed and data end with identical heads."""
    groups, _ = separable_groups(4, head_input_size(5), seed=2)
    heads = []
    for _ in range(2):
        t = QualityHeadTrainer(5, head_cfg(), seed=7)
        t.add(groups)
        for _ in range(3):
            t.train()
        heads.append(t.head.named_for_sync())
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


# =============================================================================================
# 6. The pruner's fields on Rollout
# =============================================================================================

def chunk(offset: int, n: int, score: QualityScore | None = None) -> TokenChunk:
    return TokenChunk(request_id="r.0", offset=offset, token_ids=list(range(offset, offset + n)),
                      logprobs=[-0.5] * n, versions=[0] * n, score=score)


def test_rollout_append_takes_first_score_only():
    """A scored chunk sets score and features; a later scored chunk does not overwrite them."""
    r = mk(0)
    append_chunk(r, chunk(0, 4))
    assert r.score is None and r.features is None
    first = QualityScore(at_tokens=8, logit=1.25, features=b"\x01\x02\x03\x04")
    append_chunk(r, chunk(4, 4, first))
    assert r.score == 1.25 and r.features == b"\x01\x02\x03\x04"
    append_chunk(r, chunk(8, 4, QualityScore(at_tokens=12, logit=-3.0, features=b"\x09" * 8)))
    assert r.score == 1.25 and r.features == b"\x01\x02\x03\x04"
    assert r.response_ids == list(range(12))


def test_scored_chunk_survives_the_wire():
    """A TokenChunk's QualityScore round-trips through encode/Decoder unchanged."""
    c = chunk(0, 2, QualityScore(at_tokens=2, logit=0.75, features=encode_features(torch.ones(1, 3))[0]))
    back = Decoder().decode(encode(c))
    assert back == c and msgspec.structs.asdict(back.score)["logit"] == 0.75


def test_rollout_restart_clears_pruner_state():
    """restart() clears score, features, q and decision; keep_prob stays (the
    draws it survived before the restart still stand between it and the batch)."""
    r = mk(0)
    append_chunk(r, chunk(0, 8, QualityScore(at_tokens=8, logit=0.5, features=b"\x00" * 4)))
    r.q, r.decision, r.keep_prob = 0.7, "kept", 0.4
    assert restart(r) == 8
    assert (r.score, r.features, r.q, r.decision, r.keep_prob) == (None, None, None, None, 0.4)
    assert r.response_ids == [] and r.restarts == 1
    # A new score is taken after the restart.
    append_chunk(r, chunk(0, 8, QualityScore(at_tokens=8, logit=-1.0, features=b"\x00" * 4)))
    assert r.score == -1.0


# --- the head's confidence features -------------------------------------------------

def test_token_confidence_summary():
    lps = [-0.1, -5.0, -0.2, -2.5, -0.3, -0.4]
    got = token_confidence(lps)
    want = [np.mean(lps), -5.0, np.mean([-5.0, -2.5, -0.4]), 2 / 6, 1 / 6]
    assert got.dtype == np.float32 and len(got) == CONFIDENCE_FEATURES
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError):
        token_confidence([])


@given(st.lists(st.floats(-30, 0), min_size=1, max_size=64))
def test_token_confidence_bounds(lps):
    mean, low, low3, below2, below4 = token_confidence(lps).tolist()
    assert low <= low3 + 1e-5 and low <= mean + 1e-5
    assert 0 <= below4 <= below2 <= 1


def test_head_features_and_input_size():
    hidden = torch.arange(4, dtype=torch.float32)
    f = head_features(hidden, [-1.0, -3.0])
    assert f.shape == (head_input_size(4),) and torch.equal(f[:4], hidden)
    assert f[4:].tolist() == pytest.approx(token_confidence([-1.0, -3.0]).tolist())
    head = QualityHead(head_input_size(4), 8)
    assert head(f[None]).shape == (1,)


def test_inclusion_weighted_mean():
    from stream_rl.pruner.quality import inclusion_weighted_mean

    # Kept with p = 0.5, a negative stands for two: the policy's rate is 1/3.
    assert inclusion_weighted_mean([1.0, 0.0], [1.0, 0.5]) == pytest.approx(1 / 3)
    assert inclusion_weighted_mean([1.0, 0.0, 1.0], [1.0, 1.0, 1.0]) == pytest.approx(2 / 3)
    assert math.isnan(inclusion_weighted_mean([], []))
    with pytest.raises(ValueError):
        inclusion_weighted_mean([1.0], [0.0])
    with pytest.raises(ValueError):
        inclusion_weighted_mean([1.0, 0.0], [1.0])


@given(st.lists(st.tuples(st.booleans(), st.floats(0.05, 1.0)), min_size=1, max_size=50))
def test_inclusion_weighted_mean_is_a_mean(pairs):
    from stream_rl.pruner.quality import inclusion_weighted_mean

    v = [float(b) for b, _ in pairs]
    m = inclusion_weighted_mean(v, [p for _, p in pairs])
    assert min(v) - 1e-12 <= m <= max(v) + 1e-12
