"""ARRoL's survival probability: how likely a scored rollout is to be kept.

    p_i = clip(kappa + delta + lam d_i (rho - q_i), p_min, p_max)

With d_i = 1 (ARRoL's Eq. 2) a rollout whose posterior q_i is above the
target positive ratio rho is kept less often, one below it more often: the
kept set of a group whose pass rate is above rho leans toward rho. A group
below rho needs the opposite lean (ARRoL's Lemma 4.1, second case), d_i = -1;
`pruner.balance: group` sets d_i from the group's estimated pass rate, and
d_i = 0 keeps every rollout alike. The offset delta makes the mean of p over
the recent (q, d) distribution equal the target keep rate kappa; it is found
by bisection, as the mean is continuous and non-decreasing in delta. p_min > 0 keeps every rollout a
chance to survive (and its inclusion probability away from 0 for importance
correction).
"""

from __future__ import annotations

import numpy as np


class SurvivalPolicy:
    def __init__(self, kappa: float, rho: float, lam: float, p_min: float, p_max: float):
        if not 0 < p_min <= p_max <= 1:
            raise ValueError(f"need 0 < p_min ({p_min}) <= p_max ({p_max}) <= 1")
        self.kappa, self.rho, self.lam, self.p_min, self.p_max = kappa, rho, lam, p_min, p_max
        self.delta = 0.0

    def state_dict(self) -> dict:
        return {"delta": float(self.delta)}

    def load_state_dict(self, state: dict) -> None:
        self.delta = float(state["delta"])

    def probs(self, q: np.ndarray | float, direction: np.ndarray | float = 1.0,
              delta: float | None = None) -> np.ndarray:
        off = self.delta if delta is None else delta
        lean = np.asarray(direction, dtype=np.float64) * (self.rho - np.asarray(q, dtype=np.float64))
        return np.clip(self.kappa + off + self.lam * lean, self.p_min, self.p_max)

    def solve_delta(self, q_ref: np.ndarray, direction_ref: np.ndarray | float = 1.0, iters: int = 100) -> float:
        """Set and return the delta with mean(probs(q_ref, direction_ref)) =
        kappa. When [p_min, p_max] cannot average to kappa, delta pins every
        p at the nearer bound. No reference scores: delta = 0."""
        q = np.asarray(q_ref, dtype=np.float64)
        if q.size == 0:
            self.delta = 0.0
            return self.delta
        base = self.kappa + self.lam * np.asarray(direction_ref, dtype=np.float64) * (self.rho - q)
        # Every p at p_min at lo, at p_max at hi.
        lo = float(self.p_min - base.max()) - 1e-9
        hi = float(self.p_max - base.min()) + 1e-9
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if np.clip(base + mid, self.p_min, self.p_max).mean() < self.kappa:
                lo = mid
            else:
                hi = mid
        self.delta = 0.5 * (lo + hi)
        return self.delta
