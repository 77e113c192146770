"""Group-relative advantages (GRPO, ALGORITHMS.md §1)."""

from __future__ import annotations

import math


def group_advantages(rewards: list[float], eps: float = 1e-6) -> list[float]:
    """A_i = (R_i - mean R) / (std R + eps); all-equal rewards give A = 0.

    std is the unbiased (Bessel-corrected) sample standard deviation, as in
    verl's and TRL's GRPO, so results compare one to one with them.
    """
    n = len(rewards)
    if n == 0:
        return []
    if any(not math.isfinite(r) for r in rewards):
        raise ValueError(f"non-finite reward in group: {rewards}")
    mean = sum(rewards) / n
    if n == 1:
        return [0.0]
    var = sum((r - mean) ** 2 for r in rewards) / (n - 1)
    std = math.sqrt(var)
    if std == 0.0:
        return [0.0] * n
    return [(r - mean) / (std + eps) for r in rewards]
