"""Importance corrections the learner applies (ALGORITHMS.md §4, §5).

Pruning (DPPO's Horvitz–Thompson weights): a sample kept with inclusion
probability p weighs 1/p, and the loss is normalised by the batch's size
*before* pruning, so the corrected loss is an unbiased estimate of the
unpruned one:
  GRPO/GSPO: Σ_kept ℓ_i / p_i / N, with N = Σ over groups of their members
  before pruning (DPPO's (N'/N)/p_i weights over a mean of the N' kept);
  with prompt-level pruning each kept group counts N_g / p_q, the
  Horvitz–Thompson count of the groups' members before prompt pruning;
  DAPO: Σ_kept L_i / p_i / T̂, T̂ = Σ_kept n_i / p_i the Horvitz–Thompson
  estimate of the tokens before pruning (the pruned ones' lengths are
  unknown), a ratio estimator: consistent, not exactly unbiased.

Off-policy tokens (sampled by an older policy version, or by the engine's
numerics): per-token weights from π_old (the learner before this update, the
proximal policy of AReaL's decoupled objective) and the rollout log-prob.
"""

from __future__ import annotations

import random

import torch

from stream_rl.learner.samples import Sample

LAG_BUCKETS = ("0", "1", "2", "3", "4+")


def pruning_weights(samples: list[Sample], correction: str) -> list[float]:
    """Per-sample loss weight: 1/inclusion under `ht`, 1 under `none`."""
    if correction == "none":
        return [1.0] * len(samples)
    if correction != "ht":
        raise ValueError(f"unknown learner.pruning_correction {correction!r}; allowed: 'none', 'ht'")
    return [1.0 / s.inclusion for s in samples]


def loss_normalisers(samples: list[Sample], correction: str) -> tuple[float, float]:
    """(num_seqs, num_tokens) that divide the batch's summed loss terms."""
    if correction == "none":
        return float(len(samples)), float(sum(len(s.response_ids) for s in samples))
    # Prompt-level pruning: a kept group stands for 1/p_q groups' members.
    sizes = {s.group_id: s.group_size / s.prompt_inclusion for s in samples}
    return float(sum(sizes.values())), sum(len(s.response_ids) / s.inclusion for s in samples)


def dppo_prune_completions(samples: list[Sample], rate: float, rng: random.Random) -> list[Sample]:
    """DPPO's completion-level pruning: in each group, a completion whose |A|
    is below the group's mean |A| is dropped with probability `rate`; a kept
    one's inclusion probability is multiplied by 1 − rate."""
    if rate <= 0.0:
        return samples
    by_group: dict[str, list[Sample]] = {}
    for s in samples:
        by_group.setdefault(s.group_id, []).append(s)
    kept = []
    for members in by_group.values():
        mean_abs = sum(abs(s.advantage) for s in members) / len(members)
        for s in members:
            if abs(s.advantage) < mean_abs:
                if rng.random() < rate:
                    continue
                s.inclusion *= 1.0 - rate
            kept.append(s)
    return kept


def offpolicy_weights(mode: str, old_logp: torch.Tensor, rollout_logp: torch.Tensor | None, lag: torch.Tensor,
                      *, tis_cap: float, behave_cap: float) -> torch.Tensor:
    """Per-token loss weights (0 masks the token), flat over response tokens.

    mask_stale: tokens sampled by an older version than the learner's get 0.
    tis: min(exp(log π_old − log π_rollout), tis_cap), truncated IS.
    decoupled: AReaL's behaviour weight exp(log π_prox − log π_behave), with
      π_prox = π_old; tokens whose weight exceeds behave_cap are masked.
    """
    if mode == "none":
        return torch.ones_like(old_logp)
    if mode == "mask_stale":
        return (lag == 0).to(old_logp.dtype)
    if mode not in ("tis", "decoupled"):
        raise ValueError(f"unknown learner.offpolicy {mode!r}; allowed: 'none', 'mask_stale', 'tis', 'decoupled'")
    if rollout_logp is None:
        raise ValueError(f"learner.offpolicy={mode} needs the rollout log-probs (generator.return_logprobs)")
    w = torch.exp(old_logp - rollout_logp)
    if mode == "tis":
        return w.clamp(max=tis_cap)
    return torch.where(w > behave_cap, torch.zeros_like(w), w)


def offpolicy_stats(mode: str, weights: torch.Tensor, old_logp: torch.Tensor, rollout_logp: torch.Tensor | None,
                    lag: torch.Tensor) -> dict:
    """Off-policy token fraction, version-lag histogram, IS weights, mask."""
    n = max(lag.numel(), 1)
    stats = {"offpolicy_token_frac": float((lag > 0).sum()) / n,
             "masked_token_frac": float((weights == 0).sum()) / n}
    clipped = lag.clamp(max=len(LAG_BUCKETS) - 1)
    for k, name in enumerate(LAG_BUCKETS):
        stats[f"version_lag/{name}"] = float((clipped == k).sum()) / n
    if rollout_logp is not None and lag.numel():
        raw = torch.exp(old_logp - rollout_logp)  # before the cap/mask
        stats["is_weight_mean"] = float(raw.mean())
        stats["is_weight_max"] = float(raw.max())
    return stats
