"""How good the quality head is, and how balanced the kept groups are.

AUC and Spearman correlation come from scipy (Mann-Whitney U, rank
correlation with ties averaged); both are NaN when the labels are all equal.
"""

from __future__ import annotations

import math

import numpy as np


def head_auc(scores, labels) -> float:
    """P(score of a random positive > score of a random negative), ties 1/2."""
    from scipy.stats import mannwhitneyu

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    return float(mannwhitneyu(pos, neg, alternative="two-sided").statistic / (len(pos) * len(neg)))


def stratified_auc(scores, labels, strata) -> float:
    """AUC over positive/negative pairs from the same stratum only (the same
    step, so the same head): pooling steps would mix head versions and
    drifting pass rates, which can invert a pooled AUC (Simpson's paradox)."""
    s, y, g = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool), np.asarray(strata)
    wins = pairs = 0.0
    for k in np.unique(g):
        m = g == k
        auc = head_auc(s[m], y[m])
        if not math.isnan(auc):
            n = float(y[m].sum() * (~y[m]).sum())
            wins += auc * n
            pairs += n
    return wins / pairs if pairs else math.nan


def head_spearman(scores, labels) -> float:
    from scipy.stats import spearmanr

    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(s) < 2 or np.all(y == y[0]) or np.all(s == s[0]):
        return math.nan
    return float(spearmanr(s, y).statistic)


def head_accuracy(probs, labels, threshold: float = 0.5) -> float:
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=bool)
    return float(np.mean((p >= threshold) == y)) if len(p) else math.nan


def group_balance(positives_per_group: list[list[bool]]) -> tuple[float, float]:
    """E[rho_hat] and E[rho_hat (1 - rho_hat)] over groups (rho_hat: a group's
    fraction of positive kept rollouts); groups with no kept rollout are
    left out. NaN when there are none."""
    fracs = np.array([np.mean(g) for g in positives_per_group if len(g)], dtype=np.float64)
    if fracs.size == 0:
        return math.nan, math.nan
    return float(fracs.mean()), float((fracs * (1 - fracs)).mean())


def inclusion_weighted_mean(values, inclusion_probs) -> float:
    """Self-normalised Horvitz-Thompson mean: each kept sample weighs 1/p.
    Survivors of pruning are a biased sample of the policy (ARRoL keeps more
    likely-negatives when the pass rate is above ρ); this estimates the mean
    over everything the policy sampled. NaN without samples."""
    v = np.asarray(values, dtype=np.float64)
    p = np.asarray(inclusion_probs, dtype=np.float64)
    if v.shape != p.shape:
        raise ValueError(f"{v.size} values but {p.size} inclusion probabilities")
    if v.size == 0:
        return math.nan
    if (p <= 0).any() or (p > 1).any():
        raise ValueError("inclusion probabilities must lie in (0, 1]")
    w = 1.0 / p
    return float((w * v).sum() / w.sum())
