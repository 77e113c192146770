"""ARRoL's pruner: the quality head's score, calibrated, sets the survival
probability of each rollout when it reaches L_detect tokens.

The engine scores the rollout (`score_at`) and the score arrives on its token
stream; `review` then maps the head's logit s to s' = sigmoid(s), to the
posterior q = P(Y=1 | bin of s') (`BinnedCalibrator`), and to
p = clip(kappa + delta + lam (rho - q), p_min, p_max) (`SurvivalPolicy`).
At each step's end the step's labelled scores feed the calibrator and delta
is solved again over the recent scores of every rollout that reached
L_detect (pruned ones too: their scores need no label), so the realised keep
rate follows kappa.

The head's quality is measured on rollouts no draw could remove (the
exempt slice, and everything during cold start): survivors alone are a
sample selected by the head itself. With `min_head_auc` that measure also
gates pruning: while the head is no better than it, every rollout passes
(as in cold start) and counts toward the measure.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from stream_rl.config import PrunerConfig
from stream_rl.protocol import Group, Rollout
from stream_rl.pruner.base import SamplingPruner
from stream_rl.pruner.calibration import BinnedCalibrator
from stream_rl.pruner.quality import head_accuracy, head_auc, head_spearman, stratified_auc
from stream_rl.pruner.survival import SurvivalPolicy

# Unbiased (score, label) pairs the head's quality metrics pool over.
QUALITY_WINDOW = 512
# A score later than this many tokens past L_detect is taken as lost.
SCORE_GRACE_TOKENS = 64


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class ArrolPruner(SamplingPruner):
    def __init__(self, cfg: PrunerConfig, seed: int):
        super().__init__(cfg, seed)
        self.calibrator = BinnedCalibrator(cfg.bins, cfg.alpha, cfg.calib_window)
        self.policy = SurvivalPolicy(cfg.kappa, cfg.rho, cfg.lam, cfg.p_min, cfg.p_max)
        self.recent_scores: deque[float] = deque(maxlen=cfg.score_window)
        # The lean d_i of each of those (`SurvivalPolicy`), for delta's solve.
        self.recent_directions: deque[float] = deque(maxlen=cfg.score_window)
        # (score, label, after cold start, step) of every rollout no draw could remove.
        self.unbiased: list[tuple[float, bool, bool, int]] = []
        # prune/head_auc at the last step's end: the gate of `min_head_auc`.
        self.head_auc = math.nan

    @property
    def active(self) -> bool:
        # NaN (no pairs yet) keeps the gate shut.
        gate = self.cfg.min_head_auc <= 0.0 or self.head_auc >= self.cfg.min_head_auc
        return super().active and gate

    def score_at(self, r: Rollout) -> int | None:
        if r.score is not None or r.decision is not None or len(r.response_ids) > self.cfg.l_detect:
            return None
        return self.cfg.l_detect

    def at_decision_point(self, r: Rollout, members: list[Rollout]) -> bool:
        if r.score is not None:
            if not math.isfinite(r.score):
                self._decide(r, "unscored")  # a broken head says nothing: keep
                return False
            s = sigmoid(r.score)
            self.recent_scores.append(s)
            # q of every scored rollout, drawn or not: its group's pass-rate estimate uses it.
            r.q = float(self.calibrator.posterior(s))
            self.recent_directions.append(self.direction(r, members))
            return True
        if len(r.response_ids) >= self.cfg.l_detect + SCORE_GRACE_TOKENS:
            self._decide(r, "unscored")  # kept: a decision without its evidence would be random
        return False

    def keep_probability(self, r: Rollout, members: list[Rollout]) -> float:
        return float(self.policy.probs(r.q, self.direction(r, members)))

    def direction(self, r: Rollout, members: list[Rollout]) -> float:
        """d_i: 1 under `balance: fixed`; under "group", the sign of (the
        group's estimated pass rate - rho), the estimate being the mean over
        its members of the reward where known, else the posterior q where
        scored (r's own included)."""
        if self.cfg.balance == "fixed":
            return 1.0
        est = []
        for m in members:
            if m.reward is not None and m.finish_reason != "pruned":
                est.append(float(m.reward >= 0.5))
            elif m.q is not None:
                est.append(m.q)
        if not est:
            return 1.0
        # Plain floats: numpy on a handful of scalars cost a controller fed by
        # many engines 7% of its CPU (`bench controller`). NaN stays NaN.
        lean = sum(est) / len(est) - self.cfg.rho
        return float((lean > 0) - (lean < 0)) if lean == lean else math.nan

    def end_step(self, groups: list[Group]) -> dict:
        out = super().end_step(groups)
        step_scores, step_labels = [], []
        for g in groups:
            for r in g.survivors:
                if r.score is None or r.reward is None or not math.isfinite(r.score):
                    continue
                s, y = sigmoid(r.score), r.reward >= 0.5
                self.calibrator.observe(s, y)
                step_scores.append(s)
                step_labels.append(y)
                if r.decision in ("cold", "exempt"):
                    self.unbiased.append((s, y, r.decision == "exempt", self.steps))
        self.policy.solve_delta(self.calibrator.posterior(np.array(self.recent_scores)),
                                np.array(self.recent_directions))
        recent = self.unbiased[-QUALITY_WINDOW:]
        us = np.array([u[0] for u in recent])
        uy = np.array([u[1] for u in recent], dtype=bool)
        self.head_auc = stratified_auc(us, uy, [u[3] for u in recent])
        out.update({
            "head_auc": self.head_auc,
            "head_spearman": head_spearman(us, uy),
            "head_accuracy": head_accuracy(us, uy),
            "head_eval_n": len(us),
            # Over this step's kept rollouts: biased by the pruning itself.
            "head_auc_kept": head_auc(step_scores, step_labels),
            "calib_prior": self.calibrator.prior,
            "survival_delta": self.policy.delta,
        })
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "calibrator": self.calibrator.state_dict(),
                "policy": self.policy.state_dict(), "recent_scores": [float(s) for s in self.recent_scores],
                "recent_directions": [float(d) for d in self.recent_directions],
                "unbiased": [[float(s), bool(y), bool(e), int(k)] for s, y, e, k in self.unbiased],
                "head_auc": float(self.head_auc)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.calibrator.load_state_dict(state["calibrator"])
        self.policy.load_state_dict(state["policy"])
        self.recent_scores.clear()
        self.recent_scores.extend(float(s) for s in state["recent_scores"])
        self.recent_directions.clear()
        self.recent_directions.extend(float(d) for d in state["recent_directions"])
        self.unbiased = [(float(s), bool(y), bool(e), int(k)) for s, y, e, k in state["unbiased"]]
        self.head_auc = float(state["head_auc"])

    def summary(self) -> dict:
        """The head's quality over the whole run's exempt slice after cold start."""
        after = [u for u in self.unbiased if u[2]]
        s = np.array([u[0] for u in after])
        y = np.array([u[1] for u in after], dtype=bool)
        return {"head_auc": stratified_auc(s, y, [u[3] for u in after]), "head_auc_pooled": head_auc(s, y),
                "head_spearman": head_spearman(s, y), "head_accuracy": head_accuracy(s, y),
                "head_eval_n": int(len(s))}
