"""Importance corrections the learner applies (ALGORITHMS.md §4, §5;
docs/pruning-correction.md).

Pruning (Horvitz–Thompson, as in DPPO: the seed paper, not prime-rl's DPPO
trust-region mask): a sample kept with inclusion probability p weighs 1/p,
and the loss is divided by a normaliser fixed before any pruning draw, so
the corrected loss is an unbiased estimate of the unpruned one:
  GRPO/GSPO: Σ_kept ℓ_i / p_i / N, N the members before pruning of the
  groups in the batch (DPPO's (N'/N)/p_i over a mean of the N' kept); a
  prompt kept with probability p_q stands for 1/p_q drawn prompts through
  its samples' weights;
  DAPO: Σ_kept L_i / p_i over either N x a token budget (fixed: unbiased)
  or T̂ = Σ_kept n_i / p_i, the Horvitz–Thompson estimate of the tokens
  before pruning (the pruned ones' lengths are unknown), a ratio estimator:
  consistent, not exactly unbiased (`learner.dapo_norm`).
The survivors' advantages need their own correction when the pruner acts
before the reward (`samples.samples_from_groups`).

Off-policy tokens (sampled by an older policy version, or by the engine's
numerics): per-token weights from π_old (the learner before this update, the
proximal policy of AReaL's decoupled objective) and the rollout log-prob.
"""

from __future__ import annotations

import random
from dataclasses import replace

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


def loss_normalisers(samples: list[Sample], correction: str, batch: list[Sample] | None = None,
                     members: float | None = None, token_budget: int | None = None) -> tuple[float, float]:
    """(num_seqs, num_tokens) that divide the summed loss terms of `samples`,
    a mini-batch of `batch` (default: the whole batch).

    "none": the samples and their tokens. "ht": the members before pruning
    of the batch's groups (`members`, which also counts groups none of whose
    samples are in `batch`; default: those of the groups in it), split over
    mini-batches by each sample's share of its group; tokens: their
    Horvitz–Thompson estimate. `token_budget`: num_tokens is num_seqs x it,
    a constant, instead of a count of the batch's tokens.
    """
    if correction == "none":
        num_seqs = float(len(samples))
        num_tokens = float(sum(len(s.response_ids) for s in samples))
    else:
        full = samples if batch is None else batch
        kept: dict[str, int] = {}
        for s in full:
            kept[s.group_id] = kept.get(s.group_id, 0) + 1
        share = lambda xs: sum(s.group_size / kept[s.group_id] for s in xs)  # noqa: E731
        num_seqs = share(samples)
        if members is not None and full:
            num_seqs *= members / share(full)
        num_tokens = sum(len(s.response_ids) / s.inclusion for s in samples)
    if token_budget is not None:
        num_tokens = num_seqs * token_budget
    return float(num_seqs), float(num_tokens)


def effective_sample_size(weights: list[float]) -> float:
    """(Σw)² / Σw²: how many equally weighted samples the weighted batch is
    worth; heavy Horvitz–Thompson weights lower it (their price for
    unbiasedness)."""
    sq = sum(w * w for w in weights)
    return sum(weights) ** 2 / sq if sq else 0.0


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
                s = replace(s, inclusion=s.inclusion * (1.0 - rate))  # the caller's sample stays as it was
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


def mask_stale_tokens(weights: torch.Tensor, lag: torch.Tensor, bound: int | None) -> torch.Tensor:
    """buffer.stale_policy "mask": tokens more than `bound` versions behind
    get weight 0."""
    return weights if bound is None else weights * (lag <= bound).to(weights.dtype)


def offpolicy_counts(weights: torch.Tensor, old_logp: torch.Tensor, rollout_logp: torch.Tensor | None,
                     lag: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Sums that add over ranks: [tokens, off-policy, masked, lag buckets...,
    Σ raw IS weight, tokens with one], and the largest raw IS weight."""
    n_b = len(LAG_BUCKETS)
    sums = torch.zeros(3 + n_b + 2, dtype=torch.float64)
    sums[0], sums[1], sums[2] = lag.numel(), float((lag > 0).sum()), float((weights == 0).sum())
    if lag.numel():
        sums[3:3 + n_b] = torch.bincount(lag.clamp(0, n_b - 1), minlength=n_b).double()
    w_max = 0.0
    if rollout_logp is not None and lag.numel():
        raw = torch.exp(old_logp - rollout_logp)  # before the cap/mask
        sums[3 + n_b], sums[4 + n_b] = float(raw.sum()), raw.numel()
        w_max = float(raw.max())
    return sums, w_max


def offpolicy_stats_from(sums: torch.Tensor, w_max: float) -> dict:
    """Off-policy token fraction, version-lag histogram, IS weights, mask."""
    n_b = len(LAG_BUCKETS)
    n = max(float(sums[0]), 1.0)
    stats = {"offpolicy_token_frac": float(sums[1]) / n, "masked_token_frac": float(sums[2]) / n}
    for k, name in enumerate(LAG_BUCKETS):
        stats[f"version_lag/{name}"] = float(sums[3 + k]) / n
    if sums[4 + n_b] > 0:
        stats["is_weight_mean"] = float(sums[3 + n_b] / sums[4 + n_b])
        stats["is_weight_max"] = w_max
    return stats


def offpolicy_stats(mode: str, weights: torch.Tensor, old_logp: torch.Tensor, rollout_logp: torch.Tensor | None,
                    lag: torch.Tensor) -> dict:
    """Off-policy token fraction, version-lag histogram, IS weights, mask."""
    return offpolicy_stats_from(*offpolicy_counts(weights, old_logp, rollout_logp, lag))
