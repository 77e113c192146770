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


def policy_loss(kind: str, logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                *, clip_low: float, clip_high: float, num_seqs: int, num_tokens: int) -> LossTerms:
    """GRPO: token-mean per sequence, then mean over the batch's sequences.
    DAPO: token-level mean over every response token of the batch.
    GSPO: sequence ratio = exp(mean token log-ratio), clipped per sequence.

    `num_seqs`/`num_tokens` are the full batch's counts (not the micro-batch's).
    """
    mask = mask.to(logp.dtype)
    if kind == "gspo":
        seq_logratio = ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
        per_seq, flag = clipped_surrogate(seq_logratio, torch.zeros_like(seq_logratio), adv,
                                          clip_low, clip_high)
        return LossTerms(per_seq.sum() / num_seqs, (flag.unsqueeze(-1) * mask).sum(), mask.sum())
    per_tok, flag = clipped_surrogate(logp, old_logp, adv, clip_low, clip_high)
    per_tok = per_tok * mask
    if kind == "grpo":
        loss = (per_tok.sum(-1) / mask.sum(-1).clamp_min(1.0)).sum() / num_seqs
    elif kind == "dapo":
        loss = per_tok.sum() / num_tokens
    else:
        raise ValueError(f"unknown learner.loss {kind!r}; allowed: 'grpo', 'dapo', 'gspo'")
    return LossTerms(loss, (flag * mask.bool()).sum(), mask.sum())
