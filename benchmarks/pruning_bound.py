"""The fewest generated tokens per trained sample that pruning at L_detect can reach.

Issue 23 asks ARRoL for <= 0.6x the no-pruning run's generated tokens per
trained sample. Whatever a pruner knows, a rollout it prunes has already cost
min(length, L_detect) tokens and is not trained on, and a rollout that ends
before L_detect is never scored, so it is kept. The best a pruner keeping a
fraction kappa of the scored rollouts can do is keep the shortest ones: the
oracle here sees every rollout's final length. Sampling a model's groups on
the held-out prompts (as the generators sample) and replaying them under the
oracle and under random pruning gives the bound of that model's policy:
`bench e2e`'s measured ratio can be judged against it.

    stream-rl bench pruning-bound --config configs/tiny.yaml --models A,B
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from stream_rl.config import Config


def pruning_cost(groups: list[list[int]], kappa: float, l_detect: int, oracle: bool) -> dict:
    """Expected generated tokens and kept (trained) rollouts when each group's
    scored rollouts (length > l_detect) are kept at mean rate kappa: by a
    random draw (each with probability kappa), or by the oracle (the shortest
    kappa-share of each group's scored rollouts; a fractional share keeps the
    boundary rollout in part, so the expected keep rate is kappa exactly).
    Unscored rollouts end before the decision and are kept; a pruned rollout
    costs l_detect tokens."""
    if not 0.0 < kappa <= 1.0 or l_detect < 1:
        raise ValueError(f"kappa must be in (0, 1] and l_detect >= 1 (got {kappa}, {l_detect})")
    tokens = kept = 0.0
    for lens in groups:
        lens = np.asarray(lens, dtype=float)
        short, scored = lens[lens <= l_detect], np.sort(lens[lens > l_detect])
        tokens += short.sum()
        kept += len(short)
        if oracle:
            w = np.clip(kappa * len(scored) - np.arange(len(scored)), 0.0, 1.0)
        else:
            w = np.full(len(scored), kappa)
        tokens += float((w * scored + (1.0 - w) * l_detect).sum())
        kept += float(w.sum())
    return {"tokens": tokens, "kept": kept}


def tokens_per_sample_ratio(groups: list[list[int]], kappa: float, l_detect: int, oracle: bool) -> float:
    """Generated tokens per trained sample under pruning over the same without pruning."""
    c = pruning_cost(groups, kappa, l_detect, oracle)
    n = sum(len(g) for g in groups)
    total = float(sum(sum(g) for g in groups))
    if not n or not c["kept"] or not total:
        return math.nan
    return (c["tokens"] / c["kept"]) / (total / n)


def bound_of_lengths(groups: list[list[int]], kappa: float, l_detect: int, max_tokens: int) -> dict:
    lens = [x for g in groups for x in g]
    kappas = sorted({0.25, 0.5, 0.75, kappa})
    detects = sorted({max(1, l_detect // 2), l_detect, 2 * l_detect})
    return {
        "groups": len(groups), "rollouts": len(lens),
        "tokens_per_sample_nopruning": float(np.mean(lens)),
        "scored_frac": float(np.mean([x > l_detect for x in lens])),
        "truncated_frac": float(np.mean([x >= max_tokens for x in lens])),
        "random_ratio": tokens_per_sample_ratio(groups, kappa, l_detect, oracle=False),
        "oracle_ratio": tokens_per_sample_ratio(groups, kappa, l_detect, oracle=True),
        "oracle_ratio_by_kappa": {str(k): tokens_per_sample_ratio(groups, k, l_detect, True) for k in kappas},
        "oracle_ratio_by_l_detect": {str(d): tokens_per_sample_ratio(groups, kappa, d, True) for d in detects},
    }


def sampled_group_lengths(cfg: Config, model_dir: str | Path, samples: int, seed: int = 0,
                          limit: int | None = None) -> list[list[int]]:
    """Response lengths of `samples` rollouts per held-out prompt, sampled as the generators sample."""
    from benchmarks.heldout import heldout_responses

    # 512 rows a generate() call, as bench e2e's held-out sampling (its fastest here).
    _, _, _, out = heldout_responses(model_dir, cfg, limit=limit, batch_size=512, samples=samples, seed=seed)
    return [[len(r) for r in group] for group in out]


def main(cfg: Config, out_json: str | None, models: list[str] | None = None, samples: int | None = None,
         limit: int | None = None) -> dict:
    from benchmarks.common import BenchSetupError, emit

    p, g = cfg.pruner, cfg.generator
    samples = samples or g.group_size
    result = {"benchmark": "pruning_bound", "kappa": p.kappa, "l_detect": p.l_detect, "max_tokens": g.max_tokens,
              "samples_per_prompt": samples, "models": {}}
    for m in models or [cfg.model.path]:
        if not Path(m).is_dir():
            raise BenchSetupError(f"--models: {m} is not a model directory")
        groups = sampled_group_lengths(cfg, m, samples, cfg.run.seed, limit)
        result["models"][m] = bound_of_lengths(groups, p.kappa, p.l_detect, g.max_tokens)
    return emit(result, out_json)
