"""`stream-rl bench correction`: is the pruning correction unbiased through
the real code path? (docs/pruning-correction.md)

One fixed batch: 5 groups of 8 rollouts whose full responses, rewards and
quality-head scores are drawn once (the outcomes the rollouts would have
without pruning; the score leans toward the reward, so keep probabilities
do too). Each draw replays the batch through the real pruner, an
`ArrolPruner` (`balance: group`, exempt slice, `min_survivors` 5, keep
probabilities in [0.2, 1]): rollouts reach L_detect and finish in an order
drawn afresh, so a keep probability depends on the siblings' earlier
rewards and draws; a pruned rollout stops there; some kept rollouts are
restarted (`Rollout.restart`) and drawn again. The groups then go through
`samples_from_groups`, and each estimator's `Learner.step` (a micro
Qwen3, one update, weights unchanged) gives the draw's gradient. The mean
over draws is compared with the same step on the unpruned batch, the
objective each estimator stands for:

- relative_bias: |mean - full| / |full| over every parameter, beside
  noise_floor, the value pure noise would give (sqrt(tr Cov / draws) / |full|);
- max_abs_z, t2: the mean's z-scores on 8 fixed random directions, and
  Hotelling's T^2 on them (chi2 with 8 degrees of freedom when unbiased:
  0.999 quantile 26.1).

Estimators: grpo/gspo/dapo x ht/none, as the config resolves them
(`Config.adv_std`, `Config.dapo_token_budget`), and the consistent forms
(ht with std division; DAPO's token count), with truncated responses masked
and with DPPO's completion pruning.
"""

from __future__ import annotations

import math
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import BenchSetupError, emit
from stream_rl.buffer.rollouts import restart
from stream_rl.config import Config, config_from_dict
from stream_rl.protocol import Group, Rollout

GROUPS, G, L_DETECT, MAX_TOKENS, VOCAB = 5, 8, 8, 40, 64
PASS = [1, 3, 4, 6, 7]  # correct members per group
RESTARTED = 0  # the member of each even group restarted after a kept decision
DIRECTIONS = 8
PRUNER = dict(mode="arrol", kappa=0.4, rho=0.5, lam=0.6, l_detect=L_DETECT, p_min=0.2, p_max=1.0, bins=16,
              cold_start_steps=0, min_head_auc=0.0, balance="group", exempt_fraction=0.1, min_survivors=5,
              small_groups="keep", calib_window=512, score_window=256)
# name -> learner settings over the defaults (pruning_correction ht). The
# unpruned reference is the same step without DPPO's completion pruning:
# the objective the corrected step estimates.
ESTIMATORS = {
    "grpo/ht": dict(loss="grpo"),
    "grpo/none": dict(loss="grpo", pruning_correction="none"),
    "gspo/ht": dict(loss="gspo"),
    "gspo/none": dict(loss="gspo", pruning_correction="none"),
    "dapo/ht": dict(loss="dapo"),
    "dapo/none": dict(loss="dapo", pruning_correction="none"),
    "grpo/ht+mask_truncated": dict(loss="grpo", mask_truncated=True),
    "grpo/ht+dppo_completion": dict(loss="grpo", dppo_completion_rate=0.5),
    "grpo/ht+std": dict(loss="grpo", adv_scale="std"),
    "dapo/ht+tokens": dict(loss="dapo", dapo_norm="tokens"),
}


@dataclass
class Outcome:
    """What a rollout would give without pruning."""
    response: list[int]
    reward: float
    finish: str
    logit: float  # the quality head's score at L_detect


def micro_model(path: Path, seed: int) -> None:
    """A randomly initialised one-layer Qwen3: the estimators' bias does not
    depend on the model, and its step takes milliseconds."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    Qwen3ForCausalLM(cfg).save_pretrained(path)


def outcomes(seed: int) -> tuple[list[list[int]], list[list[Outcome]]]:
    """Prompts and the unpruned outcomes of every member."""
    rng = random.Random(seed)
    prompts, groups = [], []
    for k in range(GROUPS):
        prompts.append([rng.randint(1, VOCAB - 1) for _ in range(rng.randint(3, 6))])
        correct = set(rng.sample(range(G), PASS[k]))
        members = []
        for i in range(G):
            y = float(i in correct)
            # Some end before L_detect (never drawn), some hit the budget (truncated).
            n = rng.choice([rng.randint(3, L_DETECT - 1), rng.randint(L_DETECT + 2, MAX_TOKENS - 1), MAX_TOKENS])
            members.append(Outcome([rng.randint(1, VOCAB - 1) for _ in range(n)], y,
                                   "length" if n == MAX_TOKENS else "stop", rng.gauss(1.2 * (2 * y - 1), 1.0)))
        groups.append(members)
    return prompts, groups


def _rollout(k: int, i: int, prompt: list[int]) -> Rollout:
    return Rollout(rollout_id=f"g{k}-{i}", group_id=f"g{k}", prompt_ids=list(prompt), answer="", max_tokens=MAX_TOKENS)


def _grow(r: Rollout, tokens: list[int]) -> None:
    r.response_ids, r.versions, r.logprobs = list(tokens), [0] * len(tokens), None


def _finish(r: Rollout, o: Outcome) -> None:
    _grow(r, o.response)
    r.finish_reason, r.reward = o.finish, o.reward


def full_batch(prompts, world) -> list[Group]:
    groups = []
    for k, members in enumerate(world):
        rs = [_rollout(k, i, prompts[k]) for i in range(G)]
        for r, o in zip(rs, members):
            _finish(r, o)
        groups.append(Group(group_id=f"g{k}", rollouts=rs))
    return groups


def make_pruner(world, seed: int):
    """The real ARRoL pruner, its calibrator fed labelled scores drawn like the batch's."""
    from stream_rl.pruner.arrol import ArrolPruner, sigmoid

    cfg = config_from_dict({"pruner": PRUNER, "generator": {"max_tokens": MAX_TOKENS}, "run": {"seed": seed}})
    p = ArrolPruner(cfg.pruner, seed)
    rng = random.Random(seed + 1)
    scores = []
    for _ in range(400):
        y = rng.random() < 0.5
        s = sigmoid(rng.gauss(1.2 * (2 * y - 1), 1.0))
        p.calibrator.observe(s, y)
        scores.append(s)
    p.recent_scores.extend(scores)
    p.recent_directions.extend([1.0] * len(scores))
    p.policy.solve_delta(p.calibrator.posterior(np.array(scores)))
    return p


def pruned_batch(prompts, world, pruner, rng: random.Random, counts: dict) -> list[Group]:
    """One draw: events in time order; each decision is the pruner's review."""
    groups, events = [], []
    for k, members in enumerate(world):
        rs = [_rollout(k, i, prompts[k]) for i in range(G)]
        groups.append(Group(group_id=f"g{k}", rollouts=rs))
        for i, o in enumerate(members):
            t_dec = L_DETECT * rng.uniform(0.5, 1.5)
            t_end = t_dec + max(1, len(o.response) - L_DETECT) * rng.uniform(0.5, 1.5)
            if len(o.response) > L_DETECT:
                events.append((t_dec, "decide", k, i))
                if k % 2 == 0 and i == RESTARTED:
                    events.append((t_dec + 0.5, "restart", k, i))
            events.append((t_end, "finish", k, i))
    events.sort()
    while events:
        t, what, k, i = events.pop(0)
        r, o, members = groups[k].rollouts[i], world[k][i], groups[k].rollouts
        if r.finished:
            continue
        if what == "decide":
            _grow(r, o.response[:L_DETECT])
            r.score = o.logit
            if not pruner.review(r, members):
                r.finish_reason, r.reward = "pruned", None
            counts[r.decision] = counts.get(r.decision, 0) + 1
        elif what == "restart":  # its tokens grew too stale: generated again, drawn again
            restart(r)
            counts["restart"] = counts.get("restart", 0) + 1
            t_dec = t + L_DETECT * rng.uniform(0.5, 1.5)
            events = sorted([e for e in events if e[1:] != ("finish", k, i)] + [
                (t_dec, "decide", k, i), (t_dec + (len(o.response) - L_DETECT) * rng.uniform(0.5, 1.5), "finish", k, i)])
        else:
            _finish(r, o)
    return groups


class _Recorder:
    """Stands in for the optimizer: keeps the gradient `Learner.step`
    applies, leaves the weights as they are."""

    def __init__(self, params):
        self.params = list(params)
        self.param_groups = [{"lr": 0.0}]
        self.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.grad = torch.cat([p.grad.flatten() for p in self.params]).double().clone()


def estimator_config(model: Path, seed: int, **learner) -> Config:
    lc = dict(lr=1.0, grad_clip=1e12, offpolicy="none", packing=False, device="cpu", threads=0, minibatches=1)
    lc.update(learner)
    return config_from_dict({"model": {"path": str(model)}, "pruner": PRUNER, "learner": lc,
                             "generator": {"max_tokens": MAX_TOKENS}, "run": {"seed": seed}})


def gradient(learner, cfg: Config, groups: list[Group]) -> torch.Tensor:
    from stream_rl.learner.samples import samples_from_groups

    lc = cfg.learner
    batch = samples_from_groups(groups, lc.adv_eps, lc.drop_zero_variance_groups, lc.mask_truncated,
                                correction=lc.pruning_correction, scale=cfg.adv_std)
    learner.opt.grad = None
    learner.step(batch.samples, policy_version=0, members=batch.members)
    if learner.opt.grad is None:  # nothing to train: the step's gradient is 0
        return torch.zeros(sum(p.numel() for p in learner.opt.params), dtype=torch.float64)
    return learner.opt.grad


def compare(draws: torch.Tensor, full: torch.Tensor, directions: torch.Tensor) -> dict:
    n = draws.shape[0]
    mean = draws.mean(0)
    noise = math.sqrt(float(draws.var(0).sum()) / n)
    proj = draws @ directions.T  # [n, K]
    diff = proj.mean(0) - full @ directions.T
    cov = torch.cov(proj.T)
    z = diff / (cov.diagonal() / n).sqrt()
    return {"relative_bias": float((mean - full).norm() / full.norm()), "noise_floor": noise / float(full.norm()),
            "max_abs_z": float(z.abs().max()), "t2": float(n * diff @ torch.linalg.solve(cov, diff)),
            "full_grad_norm": float(full.norm())}


def run(draws: int, seed: int = 0, estimators: dict | None = None, model: Path | None = None,
        draws_of: dict[str, int] | None = None) -> dict:
    """Every estimator's comparison over `draws` pruning draws of one batch
    (`draws_of`: fewer for some estimators, the first ones)."""
    from stream_rl.learner.correction import effective_sample_size
    from stream_rl.learner.trainer import Learner

    estimators = ESTIMATORS if estimators is None else estimators
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = model or Path(tmp) / "model"
        if model is None:
            micro_model(path, seed)
        prompts, world = outcomes(seed)
        pruner = make_pruner(world, seed)
        rng, counts = random.Random(seed + 2), {}
        batches = [pruned_batch(prompts, world, pruner, rng, counts) for _ in range(draws)]
        kept = [r for b in batches for g in b for r in g.survivors]
        drawn = [r for b in batches for g in b for r in g.rollouts if r.decision not in (None, "cold", "unscored")]
        design = {"draws": draws, "groups": GROUPS, "group_size": G, "decisions": counts,
                  "keep_prob_range": [min(r.keep_prob for r in drawn), max(r.keep_prob for r in drawn)],
                  "survivors_per_draw": len(kept) / draws,
                  "ht_ess_mean": float(np.mean([effective_sample_size(
                      [1 / r.keep_prob for g in b for r in g.survivors]) for b in batches]))}
        g = torch.Generator().manual_seed(seed)
        out, directions = {}, None
        for name, learner_kw in estimators.items():
            cfg, ref_cfg = (estimator_config(path, seed, **{**learner_kw, **over}) for over in (
                {}, {"dppo_completion_rate": 0.0}))
            learner, ref = Learner(cfg), Learner(ref_cfg)
            learner.opt, ref.opt = _Recorder(learner.model.parameters()), _Recorder(ref.model.parameters())
            full = gradient(ref, ref_cfg, full_batch(prompts, world))
            if directions is None:
                directions = torch.randn(DIRECTIONS, full.numel(), generator=g, dtype=torch.float64)
                directions /= directions.norm(dim=1, keepdim=True)
            t0 = time.perf_counter()
            grads = torch.stack([gradient(learner, cfg, b) for b in batches[:(draws_of or {}).get(name, draws)]])
            out[name] = {**compare(grads, full, directions), "seconds": time.perf_counter() - t0,
                         "adv_std": cfg.adv_std, "dapo_token_budget": cfg.dapo_token_budget}
    return {"design": design, "estimators": out}


def main(cfg: Config, out_json: str | None, draws: int) -> dict:
    if draws < 10:
        raise BenchSetupError("--steps (pruning draws) must be at least 10")
    result = run(draws, cfg.run.seed)
    result["machine"] = {"platform": platform.platform(), "torch": torch.__version__}
    result["what"] = {"bench": "correction", "draws": draws, "seed": cfg.run.seed}
    return emit(result, out_json)
