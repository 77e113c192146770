"""Aggregating k candidates' answers into one: plain functions, no engine.

Every rule is a weighted vote over answer keys (already canonical, see
`eval.answers`): each candidate adds its weight to its answer, and the answer
with the largest sum wins. A candidate whose answer is None (nothing
extractable) does not vote; with no voter at all there is no winner (None).

Ties (sums equal within a relative 1e-9, so float summation order cannot
decide) go to the answer whose single largest weight is larger, then to the
lexicographically smallest answer key. The first rule lets the strongest
candidate decide between equally supported answers; the second makes the
result independent of candidate order.

- majority: weight 1 each.
- quality head (ARRoL §4.4): the head's logits are uncalibrated, so voters
  are sorted by logit and their ranks rescaled linearly to [0, 1] (the lowest
  0, the highest 1; equal logits share their average rank).
- DeepConf (Fu et al. 2025): token confidence = -mean of the top-k
  log-probs at a position; a trace's confidence is the lowest mean over
  sliding windows of `window` tokens (or the mean of its lowest 10% of
  window means), used as the voting weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TIE_RULE = ("largest summed weight; ties (within relative 1e-9) go to the answer with the larger single "
            "largest weight, then to the lexicographically smallest answer key")
TRACE_MODES = ("lowest", "bottom10")


def tally(answers: Sequence[str | None], weights: Sequence[float]) -> dict[str, tuple[float, float]]:
    """Per answer: (summed weight, largest single weight) of its voters."""
    if len(answers) != len(weights):
        raise ValueError(f"{len(answers)} answers but {len(weights)} weights")
    out: dict[str, tuple[float, float]] = {}
    for a, w in zip(answers, weights):
        if a is None:
            continue
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"voting weights must be finite and >= 0, got {w}")
        total, top = out.get(a, (0.0, -math.inf))
        out[a] = (total + w, max(top, w))
    return out


def _near(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> str | None:
    """The winning answer key (see the module's tie rule), or None with no voter."""
    sums = tally(answers, weights)
    if not sums:
        return None
    best = max(t for t, _ in sums.values())
    tied = [a for a, (t, _) in sums.items() if _near(t, best)]
    top = max(sums[a][1] for a in tied)
    return min(a for a in tied if _near(sums[a][1], top))


def majority_vote(answers: Sequence[str | None]) -> str | None:
    return weighted_vote(answers, [1.0] * len(answers))


def rank_weights(scores: Sequence[float]) -> list[float]:
    """Ranks of `scores` (ascending, ties averaged) rescaled to [0, 1]; a
    single score gets 1.0."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all():
        raise ValueError("rank_weights needs a 1-D sequence of finite scores")
    n = len(s)
    if n == 0:
        return []
    if n == 1:
        return [1.0]
    order = np.argsort(s, kind="stable")
    ranks = np.empty(n)
    sorted_s = s[order]
    i = 0
    while i < n:  # runs of equal scores share their mean rank
        j = i
        while j + 1 < n and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2
        i = j + 1
    return (ranks / (n - 1)).tolist()


def rank_vote(answers: Sequence[str | None], scores: Sequence[float | None]) -> str | None:
    """ARRoL's vote: rank weights over the voters' (answered) scores.

    Voters without a score (the engine could not score them) rank below
    every scored voter, tied among themselves; with none scored this is the
    majority vote."""
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers but {len(scores)} scores")
    voters = [i for i, a in enumerate(answers) if a is not None]
    # -inf would break the rescaling: put the unscored just below the lowest score.
    known = [scores[i] for i in voters if scores[i] is not None]
    floor = (min(known) - 1.0) if known else 0.0
    w = rank_weights([scores[i] if scores[i] is not None else floor for i in voters])
    return weighted_vote([answers[i] for i in voters], w)


# --- DeepConf ---------------------------------------------------------------

def deepconf_token_confidence(top_logprobs: Sequence[float]) -> float:
    """-mean of one position's top-k log-probs (larger: more confident)."""
    if len(top_logprobs) == 0:
        raise ValueError("a token confidence needs at least one log-prob")
    return -float(np.mean(top_logprobs))


def window_means(confidence: Sequence[float], window: int) -> np.ndarray:
    """Means of every `window` consecutive token confidences (stride 1); a
    trace shorter than the window is one window."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    c = np.asarray(confidence, dtype=np.float64)
    if c.size == 0:
        raise ValueError("a trace confidence needs at least one token")
    if c.size <= window:
        return np.array([c.mean()])
    csum = np.concatenate([[0.0], np.cumsum(c)])
    return (csum[window:] - csum[:-window]) / window


def trace_confidence(confidence: Sequence[float], window: int, mode: str = "lowest") -> float:
    """DeepConf's trace score: the lowest window mean ("lowest") or the mean
    of the lowest 10% of window means, at least one ("bottom10")."""
    if mode not in TRACE_MODES:
        raise ValueError(f"trace confidence mode must be one of {TRACE_MODES}, not {mode!r}")
    means = window_means(confidence, window)
    if mode == "lowest":
        return float(means.min())
    n = max(1, math.ceil(0.1 * means.size))
    return float(np.sort(means)[:n].mean())
