"""The learner: a Hugging Face causal LM trained with a group-relative loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stream_rl.buffer.rollouts import Group
from stream_rl.config import Config
from stream_rl.learner.advantages import group_advantages
from stream_rl.learner.losses import policy_loss


@dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    rollout_logprobs: list[float] | None
    versions: list[int]


class BadSampleError(ValueError):
    pass


def samples_from_groups(groups: list[Group], eps: float, drop_zero_variance: bool,
                        mask_truncated: bool = False) -> tuple[list[Sample], int]:
    """Advantages per group; returns the samples and the groups dropped."""
    out, dropped = [], 0
    for g in groups:
        rewards, survivors = g.rewards, g.survivors
        for r in survivors:
            if not r.response_ids:
                raise BadSampleError(f"rollout {r.rollout_id} of group {g.group_id} has an empty response")
            if r.reward is None or not math.isfinite(r.reward):
                raise BadSampleError(f"rollout {r.rollout_id} of group {g.group_id} has reward {r.reward}")
            if r.logprobs is not None and len(r.logprobs) != len(r.response_ids):
                raise BadSampleError(f"rollout {r.rollout_id}: {len(r.logprobs)} logprobs for "
                                     f"{len(r.response_ids)} tokens")
        if drop_zero_variance and len(set(rewards)) == 1:
            dropped += 1
            continue
        for r, a in zip(survivors, group_advantages(rewards, eps)):
            if mask_truncated and r.finish_reason == "length":
                continue
            out.append(Sample(r.prompt_ids, r.response_ids, a, r.logprobs, r.versions))
    return out, dropped


def pad_batch(samples: list[Sample], pad_id: int):
    """Right-padded prompt+response ids, attention mask, and a [B, T-1] mask
    of the positions whose next token is a response token."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    # mask[i, t] = 1 when token t+1 is a response token (its log-prob is at t)
    mask = torch.zeros((len(samples), width - 1), dtype=torch.bool)
    for i, s in enumerate(samples):
        seq = s.prompt_ids + s.response_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        mask[i, len(s.prompt_ids) - 1 : len(seq) - 1] = True
    return ids, attn, mask


def token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) for every position, [B, T-1]."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    target = ids[:, 1:].unsqueeze(-1)
    return (torch.gather(logits, 2, target).squeeze(-1) - torch.logsumexp(logits, -1))


def micro_batches(samples: list[Sample], max_tokens: int) -> list[list[Sample]]:
    """Length-sorted micro-batches whose padded size stays within max_tokens."""
    order = sorted(samples, key=lambda s: len(s.prompt_ids) + len(s.response_ids))
    batches, cur = [], []
    for s in order:
        n = len(s.prompt_ids) + len(s.response_ids)
        if cur and (len(cur) + 1) * n > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(s)
    if cur:
        batches.append(cur)
    return batches


class Learner:
    def __init__(self, cfg: Config):
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        lc = cfg.learner
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.model.path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code).to(lc.device)
        self.model.train()
        self.pad_id = self.model.config.pad_token_id or self.model.config.eos_token_id or 0
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lc.lr, betas=tuple(lc.betas),
                                     eps=lc.adam_eps, weight_decay=lc.weight_decay)
        self.steps = 0
        # ARRoL's quality head: trained beside the policy, synced with it.
        self.head_trainer = None
        if cfg.pruner.mode == "arrol":
            from stream_rl.learner.quality_head import QualityHeadTrainer

            self.head_trainer = QualityHeadTrainer(self.model.config.hidden_size, cfg.pruner, cfg.run.seed)

    def train_head(self, groups: list[Group]) -> dict:
        """One round of quality-head training on the groups' final rewards."""
        if self.head_trainer is None:
            return {}
        added = self.head_trainer.add(groups)
        return {**self.head_trainer.train(), "head_new_labels": added}

    def _logprobs(self, batch: list[Sample], grad: bool):
        ids, attn, mask = pad_batch(batch, self.pad_id)
        ids, attn, mask = ids.to(self.cfg.learner.device), attn.to(self.cfg.learner.device), mask.to(self.cfg.learner.device)
        with torch.set_grad_enabled(grad):
            return token_logprobs(self.model, ids, attn), mask

    def step(self, samples: list[Sample], policy_version: int | None = None) -> dict:
        """One policy update (or `minibatches` of them) on a batch of samples.
        `policy_version`: the version of the learner's current weights; the
        engine/learner log-prob mismatch is then measured on that version's
        tokens only (older tokens differ because the policy moved)."""
        lc = self.cfg.learner
        stats = {"loss": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "rollout_logprob_abs_diff": 0.0,
                 "stale_token_frac": 0.0}
        if not samples:
            return stats
        n_mb = min(lc.minibatches, len(samples))
        minibatches = [samples[i::n_mb] for i in range(n_mb)]
        old: dict[int, torch.Tensor] = {}
        if n_mb > 1:  # π_old must be fixed before the first update
            for mb in micro_batches(samples, lc.micro_batch_tokens):
                lp, mask = self._logprobs(mb, grad=False)
                for s, row, m in zip(mb, lp, mask):
                    old[id(s)] = row[m]  # response tokens only
        diff_sum, diff_n, clipped, toks = 0.0, 0, 0.0, 0.0
        for mb_samples in minibatches:
            num_seqs = len(mb_samples)
            num_tokens = sum(len(s.response_ids) for s in mb_samples)
            self.opt.zero_grad(set_to_none=True)
            for mb in micro_batches(mb_samples, lc.micro_batch_tokens):
                logp, mask = self._logprobs(mb, grad=True)
                old_lp = logp.detach().clone()
                if old:  # row-major mask order matches the samples' order
                    old_lp[mask] = torch.cat([old[id(s)] for s in mb])
                adv = torch.tensor([s.advantage for s in mb], dtype=logp.dtype, device=logp.device)
                terms = policy_loss(lc.loss, logp, old_lp, adv, mask, clip_low=lc.clip_low, clip_high=lc.clip_high,
                                    num_seqs=num_seqs, num_tokens=num_tokens)
                terms.loss.backward()
                stats["loss"] += float(terms.loss.detach()) / n_mb
                clipped += float(terms.clipped_tokens)
                toks += float(terms.tokens)
                d, n = _rollout_diff(logp.detach(), mask, mb, policy_version)
                diff_sum += d
                diff_n += n
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), lc.grad_clip)
            self.opt.step()
            stats["grad_norm"] = max(stats["grad_norm"], float(gn))
        self.steps += 1
        stats["clip_frac"] = clipped / max(toks, 1.0)
        stats["rollout_logprob_abs_diff"] = diff_sum / max(diff_n, 1)
        if policy_version is not None:
            n_all = sum(len(s.versions) for s in samples)
            stats["stale_token_frac"] = sum(v != policy_version for s in samples for v in s.versions) / max(n_all, 1)
        return stats

    def weights_for_sync(self) -> dict[str, torch.Tensor]:
        """Checkpoint-format weights; a tied lm_head is the embedding, so it is
        not sent twice (the engine ties it back on load)."""
        sd = self.model.state_dict()
        if getattr(self.model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        out = {k: v.detach().contiguous() for k, v in sd.items()}
        if self.head_trainer is not None:
            out.update(self.head_trainer.head.named_for_sync())
        return out


def _rollout_diff(logp: torch.Tensor, mask: torch.Tensor, batch: list[Sample],
                  version: int | None = None) -> tuple[float, int]:
    """Sum of |log π_learner − log π_rollout| over tokens (engine/learner
    mismatch), over the tokens of `version` only when it is given."""
    total, n = 0.0, 0
    for i, s in enumerate(batch):
        if s.rollout_logprobs is None:
            continue
        diff = (logp[i][mask[i]] - torch.tensor(s.rollout_logprobs, dtype=logp.dtype)).abs()
        if version is not None:
            keep = torch.tensor([v == version for v in s.versions], dtype=torch.bool)
            diff = diff[keep]
        total += float(diff.sum())
        n += diff.numel()
    return total, n
