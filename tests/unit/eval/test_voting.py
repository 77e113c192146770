"""The voting rules of `stream-rl eval` on hand-made candidate sets, and
their properties (hypothesis); the answer key; the head file beside a final
model."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rl.eval.answers import AnswerKey
from stream_rl.eval.run import QuestionResult, summarize
from stream_rl.eval.voting import (deepconf_token_confidence, majority_vote, rank_vote, rank_weights, tally,
                                   trace_confidence, weighted_vote, window_means)
from stream_rl.tiny.task import ANSWER_REGEX

# --- majority ------------------------------------------------------------------


def test_majority_picks_the_most_frequent_answer():
    assert majority_vote(["3", "5", "3", "7", "3", "5"]) == "3"


def test_majority_tie_goes_to_the_smallest_answer_key():
    # 2 vs 2: equal sums, equal largest weight (1) -> lexicographically smallest.
    assert majority_vote(["9", "10", "9", "10"]) == "10"
    assert majority_vote(["b", "a"]) == "a"


def test_single_candidate_wins_alone():
    assert majority_vote(["42"]) == "42"
    assert weighted_vote(["42"], [0.0]) == "42"
    assert rank_vote(["42"], [-3.0]) == "42"


def test_no_extractable_answer_means_no_winner():
    assert majority_vote([None, None, None]) is None
    assert weighted_vote([None, None], [1.0, 2.0]) is None
    assert rank_vote([None, None], [0.5, 0.1]) is None
    assert majority_vote([]) is None


def test_candidates_without_an_answer_do_not_vote():
    # Three unanswered candidates would outvote "1" if None counted.
    assert majority_vote([None, None, None, "1"]) == "1"
    assert tally([None, "1", None], [5.0, 1.0, 7.0]) == {"1": (1.0, 1.0)}


def test_all_same_answer():
    answers = ["4"] * 6
    assert majority_vote(answers) == "4"
    assert weighted_vote(answers, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == "4"
    assert rank_vote(answers, [3.0, -1.0, 2.0, 0.0, 1.0, 5.0]) == "4"


# --- weighted vote ------------------------------------------------------------------


def test_weights_can_overturn_the_majority():
    # "1": 0.1 + 0.2 + 0.3 = 0.6 < "2": 0.9
    assert weighted_vote(["1", "1", "1", "2"], [0.1, 0.2, 0.3, 0.9]) == "2"
    assert majority_vote(["1", "1", "1", "2"]) == "1"


def test_weighted_tie_goes_to_the_larger_single_weight():
    # Both sum to 1.0 (0.1 + 0.2 + 0.7 has float noise: still a tie);
    # "b" has the single largest weight 0.9.
    assert weighted_vote(["a", "a", "a", "b", "b"], [0.1, 0.2, 0.7, 0.1, 0.9]) == "b"


def test_weighted_tie_with_equal_largest_weight_goes_to_the_smallest_key():
    assert weighted_vote(["z", "z", "y", "y"], [0.5, 0.25, 0.25, 0.5]) == "y"


def test_weights_must_be_finite_and_non_negative():
    with pytest.raises(ValueError):
        weighted_vote(["a"], [-1.0])
    with pytest.raises(ValueError):
        weighted_vote(["a"], [math.nan])
    with pytest.raises(ValueError):
        weighted_vote(["a", "b"], [1.0])


# --- quality-head ranks --------------------------------------------------------------


def test_rank_weights_rescale_ranks_linearly():
    assert rank_weights([0.3, -2.0, 5.0]) == [0.5, 0.0, 1.0]
    assert rank_weights([10.0, 20.0, 30.0, 40.0, 50.0]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert rank_weights([7.0]) == [1.0]
    assert rank_weights([]) == []


def test_rank_weights_share_tied_ranks():
    # Ranks 0, (1+2)/2, (1+2)/2, 3 over 3.
    assert rank_weights([0.0, 1.0, 1.0, 2.0]) == [0.0, 0.5, 0.5, 1.0]
    assert rank_weights([4.0, 4.0, 4.0]) == [0.5, 0.5, 0.5]


def test_rank_vote_follows_the_head_not_the_count():
    # "7" x3 with low scores (weights 0, 0.25, 0.5 -> 0.75); "8" x2 with the
    # top scores (0.75 + 1 = 1.75): the head overturns the majority.
    answers = ["7", "7", "7", "8", "8"]
    scores = [-3.0, -2.0, -1.0, 2.0, 3.0]
    assert majority_vote(answers) == "7"
    assert rank_vote(answers, scores) == "8"


def test_rank_vote_ranks_only_the_voters():
    # The unanswered candidate's top score must not push the voters' weights
    # down: among voters "1" (0.9) ranks 1.0 and "2" (0.1) ranks 0.
    assert rank_vote([None, "1", "2"], [99.0, 0.9, 0.1]) == "1"


def test_rank_vote_unscored_voters_rank_lowest():
    # "5" (unscored twice: tied lowest, weight 0.25 each -> 0.5) vs "6" (scored: 1.0).
    assert rank_vote(["5", "5", "6"], [None, None, -10.0]) == "6"
    # None scored at all: the majority.
    assert rank_vote(["5", "5", "6"], [None, None, None]) == "5"


def test_rank_vote_tie():
    # Two voters, two answers: weights 0 and 1; a tie needs equal scores.
    assert rank_vote(["b", "a"], [1.0, 1.0]) == "a"  # 0.5 vs 0.5: smallest key
    assert rank_vote(["b", "a"], [2.0, 1.0]) == "b"


# --- DeepConf --------------------------------------------------------------------------


def test_token_confidence_is_minus_the_mean_top_logprob():
    assert deepconf_token_confidence([-0.1, -2.0, -3.9]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        deepconf_token_confidence([])


def test_window_means_slide_by_one_token():
    np.testing.assert_allclose(window_means([1, 2, 3, 4, 5], 2), [1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(window_means([1, 2, 3], 3), [2.0])
    # A trace shorter than the window is one window.
    np.testing.assert_allclose(window_means([1, 2, 3], 10), [2.0])


def test_trace_confidence_lowest_window_and_bottom_ten_percent():
    conf = [5.0] * 10 + [1.0, 1.0] + [5.0] * 10  # a dip of two tokens
    assert trace_confidence(conf, 2, "lowest") == pytest.approx(1.0)
    # 21 windows -> the lowest ceil(2.1) = 3: 3.0, 1.0, 3.0
    assert trace_confidence(conf, 2, "bottom10") == pytest.approx(7.0 / 3)
    # Longer windows dilute the dip.
    assert trace_confidence(conf, 4, "lowest") == pytest.approx(3.0)
    with pytest.raises(ValueError):
        trace_confidence(conf, 2, "median")
    with pytest.raises(ValueError):
        trace_confidence([], 2)


def test_deepconf_vote_prefers_the_steady_trace():
    # "3": two traces with one low-confidence window each; "4": one steady trace.
    wobbly = [8.0, 8.0, 0.5, 8.0]
    steady = [6.0, 6.0, 6.0, 6.0]
    w = [trace_confidence(c, 1) for c in (wobbly, wobbly, steady)]
    assert w == [0.5, 0.5, 6.0]
    assert weighted_vote(["3", "3", "4"], w) == "4"


# --- properties --------------------------------------------------------------------------

answers_st = st.lists(st.one_of(st.none(), st.sampled_from(["0", "1", "2", "10", "x"])), min_size=0, max_size=24)
scores_st = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.lists(scores_st, min_size=1, max_size=32))
def test_rank_weights_lie_in_unit_interval_and_follow_the_scores(scores):
    w = rank_weights(scores)
    assert all(0.0 <= x <= 1.0 for x in w)
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] < scores[j]:
                assert w[i] < w[j]
            elif scores[i] == scores[j]:
                assert w[i] == w[j]
    if len(set(scores)) == len(scores) and len(scores) > 1:
        assert min(w) == 0.0 and max(w) == 1.0


@settings(max_examples=200, deadline=None)
@given(answers_st, st.randoms(use_true_random=False))
def test_majority_vote_ignores_candidate_order(answers, rnd):
    shuffled = list(answers)
    rnd.shuffle(shuffled)
    assert majority_vote(shuffled) == majority_vote(answers)


@settings(max_examples=200, deadline=None)
@given(answers_st, st.floats(min_value=1e-3, max_value=1e3))
def test_equal_weights_are_the_majority(answers, w):
    assert weighted_vote(answers, [w] * len(answers)) == majority_vote(answers)
    assert rank_vote(answers, [0.0] * len(answers)) == majority_vote(answers)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_weighted_and_rank_votes_ignore_candidate_order(data):
    answers = data.draw(answers_st)
    weights = data.draw(st.lists(st.floats(min_value=0, max_value=10), min_size=len(answers),
                                 max_size=len(answers)))
    order = data.draw(st.permutations(range(len(answers))))
    assert weighted_vote([answers[i] for i in order], [weights[i] for i in order]) == \
        weighted_vote(answers, weights)
    assert rank_vote([answers[i] for i in order], [weights[i] for i in order]) == rank_vote(answers, weights)


@settings(max_examples=200, deadline=None)
@given(answers_st, st.lists(st.floats(min_value=0, max_value=10), min_size=24, max_size=24))
def test_the_winner_is_a_voter_with_the_largest_sum(answers, weights):
    weights = weights[:len(answers)]
    win = weighted_vote(answers, weights)
    sums = tally(answers, weights)
    if not sums:
        assert win is None
    else:
        assert win in sums and sums[win][0] >= max(t for t, _ in sums.values()) * (1 - 1e-9) - 1e-12


# --- the answer key ---------------------------------------------------------------------


def test_tiny_answer_key_extracts_the_final_answer():
    key = AnswerKey(ANSWER_REGEX, "math")
    assert key.extract("70 67 64 #### 1") == "1"
    assert key.extract("70 67 64 61") is None  # cut off: no answer, no vote
    assert key.correct("1", "1") and not key.correct("2", "1") and not key.correct(None, "1")
    # A slip in the worked solution still lands on an answer, which is judged by itself.
    assert key.extract("70 66 64 #### 1") == "1"


def test_math_answer_key_merges_equivalent_answers_independently_of_order():
    key = AnswerKey(None, "math")
    assert key.extract("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert key.extract("no math here") is None
    answers = ["0.5", "\\frac{1}{2}", "3", None, "1/2"]
    classes = key.classes(answers)
    assert classes[0] == classes[1] == classes[4] != classes[2]
    assert classes[3] is None
    rnd = random.Random(0)
    for _ in range(5):
        perm = list(range(len(answers)))
        rnd.shuffle(perm)
        assert key.classes([answers[i] for i in perm]) == [classes[i] for i in perm]
    assert majority_vote(classes) == classes[0]


def test_exact_answer_key_compares_up_to_whitespace():
    key = AnswerKey(None, "exact")
    assert key.extract(" 70  67 #### 1 ") == "70 67 #### 1"
    answers = [key.extract(r) for r in ["a b", "a  b\n", "a c"]]
    assert key.classes(answers) == ["a b", "a b", "a c"]


def test_answer_key_refuses_a_regex_without_a_group():
    with pytest.raises(ValueError, match="capturing group"):
        AnswerKey(r"####\s*\d+", "math")


# --- summaries ------------------------------------------------------------------------------


def _result(answers, correct, scores, maj, qhead, deep):
    return QuestionResult(prompt="p", reference="r", answers=answers, correct=correct, scores=scores,
                          scored_at=[1] * len(answers), lengths=[40] * len(answers),
                          trace_confidence=[1.0] * len(answers), finish_reasons=["stop"] * len(answers),
                          responses=["r"] * len(answers), maj=maj, qhead=qhead,
                          deepconf=deep, winners_correct={"maj": maj == "1", "qhead": qhead == "1",
                                                          "deepconf": deep == "1"})


def test_summary_metrics_by_hand():
    results = [
        # 2 of 4 correct; the majority tie "1" vs "2" goes to "1" (smallest key), which is right.
        _result(["1", "2", "1", "2"], [True, False, True, False], [1.0, 0.0, 2.0, -1.0], "1", "1", "2"),
        # None correct.
        _result(["3", "3", None, "4"], [False, False, False, False], [0.0, 0.1, 0.2, 0.3], "3", "4", "3"),
    ]
    s = summarize(results, k=4, has_head=True, l_detect=32)
    assert s["pass_at_1"] == pytest.approx((0.5 + 0.0) / 2)
    assert s["pass_at_k"] == 0.5
    assert s["maj_at_k"] == 0.5 and s["qhead_at_k"] == 0.5 and s["deepconf_at_k"] == 0.0
    assert s["questions"] == 2 and s["k"] == 4
    assert s["answered_fraction"] == pytest.approx((1.0 + 0.75) / 2)
    assert s["disagreement"]["maj_vs_deepconf"] == {"questions": 1, "maj_right": 1, "deepconf_right": 0}
    assert s["head"]["scored"] == 8 and s["head"]["auc"] == 1.0
    assert s["qhead_ceiling_at_k"] == 0.5  # the first question; nothing can win the second


def test_head_ceiling_and_auc_split_by_the_majority():
    """qhead_ceiling_at_k: a perfect head's rank vote, which still loses to a
    large enough wrong majority (ranks, not scores, are summed). The head's
    within-question AUC is split by whether the majority was right."""
    results = [
        # Majority right; the head ranks the correct candidates first (AUC 1).
        _result(["1", "1", "2"], [True, True, False], [2.0, 1.0, 0.0], "1", "1", "1"),
        # Majority wrong ("2" twice): a perfect head gives "1" weight 1 and the
        # tied "2"s 0.25 each, so "1" wins; this head ranks "1" last (AUC 0).
        _result(["2", "2", "1"], [False, False, True], [1.0, 2.0, 0.0], "2", "2", "2"),
        # Four wrong votes: even a perfect head loses (4 x 0.375 > 1).
        _result(["2", "2", "2", "2", "1"], [False] * 4 + [True], [0.0] * 5, "2", "2", "2"),
    ]
    s = summarize(results, k=5, has_head=True, l_detect=32)
    assert s["maj_at_k"] == pytest.approx(1 / 3) and s["qhead_at_k"] == pytest.approx(1 / 3)
    assert s["qhead_ceiling_at_k"] == pytest.approx(2 / 3)
    assert s["head"]["auc_within_question_maj_right"] == 1.0
    # Majority-wrong pairs: question 2 (2 pairs, AUC 0) and question 3 (4 tied pairs, 0.5).
    assert s["head"]["auc_within_question_maj_wrong"] == pytest.approx((0 * 2 + 0.5 * 4) / 6)


def test_summary_without_a_head_skips_qhead():
    r = _result(["1"], [True], [None], "1", None, "1")
    s = summarize([r], k=1, has_head=False, l_detect=32)
    assert s["qhead_at_k"] is None and "head" not in s and "maj_vs_qhead" not in s["disagreement"]
    assert s["maj_at_k"] == 1.0 and s["pass_at_1"] == 1.0


# --- where the head comes from ----------------------------------------------------------------


