"""Group-relative advantages (GRPO, ALGORITHMS.md §1), and their
Horvitz–Thompson form for groups pruned before the reward (§4)."""

from __future__ import annotations

import math


def _check_finite(rewards: list[float]) -> None:
    if any(not math.isfinite(r) for r in rewards):
        raise ValueError(f"non-finite reward in group: {rewards}")


def group_advantages(rewards: list[float], eps: float = 1e-6, scale: bool = True) -> list[float]:
    """A_i = (R_i - mean R) / (std R + eps); all-equal rewards give A = 0.
    `scale` False leaves out the division (Dr. GRPO).

    std is the unbiased (Bessel-corrected) sample standard deviation, as in
    verl's and TRL's GRPO, so results compare one to one with them.
    """
    n = len(rewards)
    if n == 0:
        return []
    _check_finite(rewards)
    mean = sum(rewards) / n
    if n == 1:
        return [0.0]
    centred = [r - mean for r in rewards]
    if not scale:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / (n - 1))
    if std == 0.0:
        return [0.0] * n
    return [c / (std + eps) for c in centred]


def ht_group_advantages(rewards: list[float], inclusion: list[float], group_size: int, eps: float = 1e-6,
                        scale: bool = False) -> list[float]:
    """Advantages of a group's survivors when its members were pruned before
    their reward, each survivor j kept with probability `inclusion[j]`, out
    of `group_size` members before pruning (N):

        A_i = R_i - (R_i + sum_{j != i} R_j / p_j) / N

    The baseline is the Horvitz–Thompson estimate of the group's mean reward
    with the survivor's own reward known exactly. Weighted by 1/p_i in the
    loss, E[1{i kept} / p_i * A_i] = R_i - mean R over the whole group when
    the draws are independent given what came before them (each p fixed
    before its draw): the unpruned group's mean-centred advantage, exactly.
    With nothing pruned (every p 1, N survivors) it is R_i - mean R.

    `scale` divides by the group's reward std, estimated with the same
    weights (Hájek: sum_j (R_j - m)^2 / p_j / sum_j 1/p_j, m the weighted
    mean, Bessel-corrected by N/(N-1)): consistent, not unbiased (a ratio);
    a group whose survivors all agree gets A = 0, as in GRPO.
    """
    n = len(rewards)
    if n != len(inclusion):
        raise ValueError(f"{n} rewards but {len(inclusion)} inclusion probabilities")
    if n == 0:
        return []
    if group_size < n:
        raise ValueError(f"group_size {group_size} is below the {n} survivors")
    _check_finite(rewards)
    if any(not 0.0 < p <= 1.0 for p in inclusion):
        raise ValueError(f"inclusion probabilities outside (0, 1]: {inclusion}")
    if group_size == n and all(p == 1.0 for p in inclusion):
        return group_advantages(rewards, eps, scale)  # nothing could be pruned: the plain form, exact zeros
    if group_size == 1:
        return [0.0]
    ht_sum = sum(r / p for r, p in zip(rewards, inclusion))
    adv = [r - (r + ht_sum - r / p) / group_size for r, p in zip(rewards, inclusion)]
    if not scale:
        return adv
    w = [1.0 / p for p in inclusion]
    m = sum(wi * r for wi, r in zip(w, rewards)) / sum(w)
    var = sum(wi * (r - m) ** 2 for wi, r in zip(w, rewards)) / sum(w) * group_size / (group_size - 1)
    if var == 0.0:
        return [0.0] * n
    std = math.sqrt(var)
    return [a / (std + eps) for a in adv]
