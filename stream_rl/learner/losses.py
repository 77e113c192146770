"""Policy-gradient losses over padded token tensors (ALGORITHMS.md §1).

All tensors are [batch, tokens]; `mask` is 1 on response tokens. Each loss
returns per-sequence *sums* and a normaliser so callers can split a batch into
micro-batches and still get exactly the full-batch loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar contribution of this micro-batch
    clipped_tokens: torch.Tensor  # number of tokens whose ratio was clipped
    tokens: torch.Tensor


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                      clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -min(r A, clip(r, 1-eps_low, 1+eps_high) A) and a clipped flag."""
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(-1) if adv.dim() < ratio.dim() else adv
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * a
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ || π_ref) estimate k3 = exp(ref − logp) − (ref − logp) − 1
    (non-negative, unbiased on samples from π_θ; verl's "low_var_kl")."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def policy_loss(kind: str, logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                *, clip_low: float, clip_high: float, num_seqs: float, num_tokens: float,
                tok_weight: torch.Tensor | None = None, seq_weight: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, kl_beta: float = 0.0) -> LossTerms:
    """GRPO: token-mean per sequence, then summed over sequences / num_seqs.
    DAPO: summed over every response token / num_tokens.
    GSPO: sequence ratio = exp(mean token log-ratio), clipped per sequence.

    `num_seqs`/`num_tokens` are the full batch's normalisers (not the
    micro-batch's), so micro-batch losses add up to the batch loss.
    `tok_weight` [B, T] multiplies each token's term (off-policy correction:
    IS weights, 0 masks a token); for GSPO a masked token leaves the sequence
    mean and the sequence term takes the mean weight of its tokens.
    `seq_weight` [B] multiplies each sequence's terms (pruning correction).
    With `kl_beta` > 0, β·k3(π_θ, π_ref) joins every token's term.
    """
    mask = mask.to(logp.dtype)
    w_tok = mask if tok_weight is None else mask * tok_weight.to(logp.dtype)
    live = mask if tok_weight is None else mask * (tok_weight > 0).to(logp.dtype)
    w_seq = torch.ones(logp.shape[0], dtype=logp.dtype, device=logp.device) if seq_weight is None \
        else seq_weight.to(logp.dtype)
    kl = kl_beta * kl_k3(logp, ref_logp) if kl_beta > 0 and ref_logp is not None else None
    if kind == "gspo":
        n = live.sum(-1)
        seq_logratio = ((logp - old_logp) * live).sum(-1) / n.clamp_min(1.0)
        per_seq, flag = clipped_surrogate(seq_logratio, torch.zeros_like(seq_logratio), adv,
                                          clip_low, clip_high)
        if tok_weight is not None:
            per_seq = per_seq * w_tok.sum(-1) / n.clamp_min(1.0)
        if kl is not None:
            per_seq = per_seq + (kl * live).sum(-1) / n.clamp_min(1.0)
        return LossTerms((w_seq * per_seq).sum() / num_seqs, (flag.unsqueeze(-1) * live).sum(), live.sum())
    per_tok, flag = clipped_surrogate(logp, old_logp, adv, clip_low, clip_high)
    per_tok = per_tok * w_tok
    if kl is not None:
        per_tok = per_tok + kl * live
    if kind == "grpo":
        loss = (w_seq * per_tok.sum(-1) / live.sum(-1).clamp_min(1.0)).sum() / num_seqs
    elif kind == "dapo":
        loss = (w_seq * per_tok.sum(-1)).sum() / num_tokens
    else:
        raise ValueError(f"unknown learner.loss {kind!r}; allowed: 'grpo', 'dapo', 'gspo'")
    return LossTerms(loss, (flag * live.bool()).sum(), live.sum())
