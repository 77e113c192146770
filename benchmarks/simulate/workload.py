"""What the simulated engines generate: per prompt a difficulty, per rollout
a fate (correct or not, its length), encoded in the tokens themselves so
the REAL verifier scores them through a tokenizer stand-in.

Token ids: a prompt is [PROMPT + index, FILL...]; a response's first token
carries its fate (FATE + 4 * length + 2 * rambles + correct), the tokens
after it are FILL, and a response that stops (at its drawn length) ends with
RIGHT or WRONG. `SimTokenizer.decode` maps those to texts that the job's own
verifier (`make_verifier(cfg.data)`) scores 1 and 0 (`answer_texts` picks
them for the config's matching rule), and a response cut off by the budget
to "" (no answer: reward 0). A continued partial keeps its first token, so
its fate survives recycling; a restarted one (stale) draws a new one.

The policy improves with its version: `reward(v)`, `truncated(v)` (ramblers
that run to max_tokens, always wrong) and `length_mean(v)` (of the responses
that stop) are curves over versions, given or read from a run's metrics
(`from_records`). A prompt's pass rate is the version's mean shifted on the
logit scale by the prompt's fixed difficulty (logit-normal, `spread`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from stream_rl.data import PromptDataset, PromptRow

RIGHT, WRONG, FILL = 1, 2, 3
PROMPT = 16
FATE = 1 << 20

_CANDIDATES = (("7", "8", "7"), ("#### 7", "#### 8", "7"), ("\\boxed{7}", "\\boxed{8}", "7"))


def answer_texts(verifier) -> tuple[str, str, str]:
    """(right response, wrong response, reference) the real verifier scores 1 and 0."""
    for right, wrong, ref in _CANDIDATES:
        if verifier.score(right, ref) == 1.0 and verifier.score(wrong, ref) == 0.0:
            return right, wrong, ref
    raise ValueError("no simulated answer the config's verifier scores right and wrong")


class SimTokenizer:
    """The stand-in for the model's tokenizer: decodes a response's last token."""

    def __init__(self, right: str, wrong: str):
        self.right, self.wrong = right, wrong

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if not ids:
            return ""
        return self.right if ids[-1] == RIGHT else self.wrong if ids[-1] == WRONG else ""


def _curve(xs: list[float], v: int) -> float:
    return xs[min(max(v, 0), len(xs) - 1)]


@dataclass
class Workload:
    """Rewards and lengths by policy version (index: updates applied)."""
    reward: list[float] = field(default_factory=lambda: [0.5])
    truncated: list[float] = field(default_factory=lambda: [0.0])
    length_mean: list[float] = field(default_factory=lambda: [100.0])
    length_cv: float = 0.5  # coefficient of variation of a stopping response's length (log-normal)
    wrong_length_ratio: float = 1.0  # a wrong response's mean length over a right one's
    spread: float = 1.5  # std of a prompt's difficulty on the logit scale
    head_auc: float = 0.8  # the quality head's AUC (ARRoL) vs the rollout's reward
    prompt_len: int = 32
    prompts: int = 4096
    fixed_length: int | None = None  # every response stops at exactly this length (tests)
    seed: int = 0
    source: str = "given"

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.difficulty = rng.standard_normal(self.prompts) * self.spread
        self.rng = np.random.default_rng(self.seed + 1)
        from scipy.stats import norm

        self.head_mu = math.sqrt(2.0) * float(norm.ppf(min(max(self.head_auc, 0.5), 0.999)))

    def dataset(self, answer: str) -> PromptDataset:
        rows = [PromptRow(index=i, prompt=f"simulated prompt {i}", answer=answer,
                          prompt_ids=(PROMPT + i,) + (FILL,) * (self.prompt_len - 1)) for i in range(self.prompts)]
        return PromptDataset(rows=rows, source="simulated", overlong=[])

    def pass_rate(self, prompt: int, version: int) -> float:
        """P(reward 1) of a prompt under a version, ramblers included."""
        r = min(max(_curve(self.reward, version), 1e-4), 1 - 1e-4)
        z = math.log(r / (1 - r)) - self.difficulty[prompt % self.prompts]
        return 1.0 / (1.0 + math.exp(-z))

    def draw(self, prompt_ids, version: int, max_tokens: int) -> int:
        """A new rollout's fate token."""
        prompt = prompt_ids[0] - PROMPT if prompt_ids and prompt_ids[0] >= PROMPT else 0
        rng = self.rng
        tf = _curve(self.truncated, version)
        rambles = rng.random() < tf
        correct = (not rambles) and rng.random() < min(1.0, self.pass_rate(prompt, version) / max(1e-9, 1 - tf))
        if self.fixed_length is not None:
            n = self.fixed_length
        elif rambles:
            n = max_tokens + 1
        else:
            m = _curve(self.length_mean, version)
            if not correct:
                m *= self.wrong_length_ratio
            s = math.sqrt(math.log(1 + self.length_cv ** 2))
            n = int(round(m * math.exp(rng.standard_normal() * s - s * s / 2)))
        n = min(max(2, n), (FATE >> 3) - 1)
        return FATE + 4 * n + 2 * rambles + int(correct)

    @staticmethod
    def fate(token: int) -> tuple[int, bool]:
        """(stop length, correct) of a fate token."""
        k = token - FATE
        return k >> 2, bool(k & 1)

    def score_logit(self, correct: bool) -> float:
        """The quality head's logit: N(mu, 1) for a right rollout, N(0, 1) else (AUC = Phi(mu / sqrt 2))."""
        return float(self.rng.standard_normal() + (self.head_mu if correct else 0.0))

    @classmethod
    def from_records(cls, records: list[dict], max_tokens: int, **kw) -> "Workload":
        """Curves by version from a run's metrics (one point per step: the
        step's rollouts came from about the weights of `step - 1` updates):
        reward_mean, truncated_frac, response_len_mean (the mean of those
        that stop: (mean - frac * max_tokens) / (1 - frac))."""
        rewards = [r["reward_mean"] for r in records]
        trunc = [r["truncated_frac"] for r in records]
        lens = []
        for r, tf in zip(records, trunc):
            stop = (r["response_len_mean"] - tf * max_tokens) / max(1e-9, 1 - tf)
            lens.append(max(2.0, stop))
        aucs = [r["prune/head_auc"] for r in records if isinstance(r.get("prune/head_auc"), float)
                and math.isfinite(r["prune/head_auc"])]
        if aucs:
            kw.setdefault("head_auc", float(np.mean(aucs)))
        return cls(reward=rewards, truncated=trunc, length_mean=lens, source="run metrics", **kw)
