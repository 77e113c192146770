"""The pruner stage: sees every rollout as its tokens stream in.

`review` is called after each chunk is appended and returns whether the
rollout should keep generating; False aborts it in the engine at once (the
slot is reused) and it completes its group as "pruned", out of the policy
samples. `end_step` gets the step's complete groups (final rewards) and
returns the step's pruning metrics.

Modes (`pruner.mode`): `none` keeps everything; `random` and `arrol` decide
once, when a rollout reaches `l_detect` tokens, with the same keep rate
kappa, so the ablation is one flag. What they share lives in
`SamplingPruner`: cold start, the exempt slice, the draw, the per-group
minimum, and the metrics.
"""

from __future__ import annotations

import math

import numpy as np

from stream_rl.config import PrunerConfig
from stream_rl.protocol import Group, Rollout
from stream_rl.pruner.quality import group_balance


class Pruner:
    """Keeps every rollout."""

    def score_at(self, rollout: Rollout) -> int | None:
        """Response length at which the engine should score `rollout` with
        the quality head (None: no score wanted)."""
        return None

    def review(self, rollout: Rollout, members: list[Rollout]) -> bool:
        """True to keep generating `rollout`, False to abort it now.
        `members`: its whole group (itself included)."""
        return True

    def group_too_small(self, members: list[Rollout]) -> bool:
        """After a prune: whether the group must be dropped."""
        return False

    def end_step(self, groups: list[Group]) -> dict:
        return {}

    def summary(self) -> dict:
        """Run-level numbers for the job summary."""
        return {}

    # --- checkpoints: plain JSON-able state ------------------------------------

    def state_dict(self) -> dict:
        return {"kind": type(self).__name__}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != type(self).__name__:
            raise ValueError(f"pruner state is a {state.get('kind')}'s; this pruner is a {type(self).__name__}")


class SamplingPruner(Pruner):
    """Decides once per rollout, at its decision point, by a random draw."""

    def __init__(self, cfg: PrunerConfig, seed: int):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.steps = 0  # steps ended so far
        self._counts: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return self.steps >= self.cfg.cold_start_steps

    # --- per mode ----------------------------------------------------------------

    def at_decision_point(self, r: Rollout, members: list[Rollout]) -> bool:
        return len(r.response_ids) >= self.cfg.l_detect

    def keep_probability(self, r: Rollout, members: list[Rollout]) -> float:
        """p_i for a rollout at its decision point (`members`: its group)."""
        return self.cfg.kappa

    # --- shared ------------------------------------------------------------------

    def review(self, r: Rollout, members: list[Rollout]) -> bool:
        """Draw once, at the decision point. The probability recorded is the
        exact chance this draw keeps r, given everything before it: with
        exempt fraction e and keep probability p, e + (1 - e) p; 1 when the
        group is at its minimum (r is kept whatever the draw) or nothing is
        drawn (cold start). It multiplies the rollout's earlier ones (a
        restarted rollout survived each of its draws)."""
        if r.decision is not None or not self.at_decision_point(r, members):
            return True
        if not self.active:
            return self._decide(r, "cold")
        alive = sum(m.decision != "pruned" for m in members) - 1  # without r
        at_minimum = alive < self.cfg.min_survivors and self.cfg.small_groups == "keep"
        p = 1.0 if at_minimum else float(self.keep_probability(r, members))
        e = self.cfg.exempt_fraction
        kept_with = e + (1.0 - e) * p
        # The exempt coin comes first, for every rollout: the head is measured
        # on a uniform slice, whatever the group's state.
        if self.rng.random() < e:
            return self._decide(r, "exempt", kept_with)
        if at_minimum:
            return self._decide(r, "spared")
        if self.rng.random() < p:
            return self._decide(r, "kept", kept_with)
        return self._decide(r, "pruned", kept_with)

    def _decide(self, r: Rollout, decision: str, keep_prob: float = 1.0) -> bool:
        r.decision = decision
        r.keep_prob *= keep_prob
        self._counts[decision] = self._counts.get(decision, 0) + 1
        return decision != "pruned"

    def group_too_small(self, members: list[Rollout]) -> bool:
        return (self.cfg.small_groups == "drop"
                and sum(m.decision != "pruned" for m in members) < self.cfg.min_survivors)

    def end_step(self, groups: list[Group]) -> dict:
        c, self._counts = self._counts, {}
        drawn = c.get("kept", 0) + c.get("spared", 0) + c.get("pruned", 0)
        survivors = [r for g in groups for r in g.survivors]
        pruned = [r for g in groups for r in g.rollouts if r.finish_reason == "pruned"]
        rho_hat, rho_var = group_balance([[r.reward >= 0.5 for r in g.survivors if r.reward is not None]
                                          for g in groups])
        out = {
            "prune_active": float(self.active),
            # Of the rollouts that could be pruned this step (spared ones, at
            # their group's minimum, count as kept), the fraction kept.
            "keep_rate": (c.get("kept", 0) + c.get("spared", 0)) / drawn if drawn else math.nan,
            "drawn": drawn,
            "pruned": c.get("pruned", 0),
            "spared": c.get("spared", 0),
            "exempt": c.get("exempt", 0),
            "unscored": c.get("unscored", 0),
            "reached_l_detect": sum(c.values()),
            "rho_hat_mean": rho_hat,
            "rho_var_mean": rho_var,
            "kept_rollouts": len(survivors),
            # Tokens a pruned rollout generated past L_detect before its abort took effect.
            "prune_lag_tokens": (float(np.mean([len(r.response_ids) - self.cfg.l_detect for r in pruned]))
                                 if pruned else math.nan),
        }
        self.steps += 1
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "steps": self.steps, "counts": dict(self._counts),
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.steps, self._counts = int(state["steps"]), {k: int(v) for k, v in state["counts"].items()}
        self.rng.bit_generator.state = state["rng"]


class RandomPruner(SamplingPruner):
    """Keeps a rollout reaching l_detect tokens with probability kappa."""
