"""The learner: a Hugging Face causal LM trained with a group-relative loss,
with pruning and off-policy corrections, dense packing and data parallelism
over torch.distributed ranks."""

from __future__ import annotations

import math
import random

import torch

from stream_rl.config import Config
from stream_rl.learner.correction import (dppo_prune_completions, effective_sample_size, loss_normalisers,
                                          mask_stale_tokens, offpolicy_counts, offpolicy_stats_from,
                                          offpolicy_weights, pruning_weights)
from stream_rl.learner.losses import policy_loss
from stream_rl.learner.mismatch import histogram_counts, mismatch_stats, positions
from stream_rl.learner.packing import Layout, pack_layout, pad_layout, response_logprobs, split_by_budget
from stream_rl.learner.samples import Sample, SampleSet, samples_from_groups  # noqa: F401 (re-exported)
from stream_rl.learner.varlen_attention import implementation as attention_implementation
from stream_rl.protocol import Group


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


def micro_batches(samples: list[Sample], max_tokens: int, packing: bool = False,
                  row_tokens: int = 1024) -> list[list[Sample]]:
    """Samples split so each forward pass stays within max_tokens (see
    `packing.split_by_budget`)."""
    lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
    return [[samples[i] for i in mb] for mb in split_by_budget(lengths, max_tokens, packing, row_tokens)]


def as_rows(flat: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values -> [S, max len] right-padded, and its mask."""
    width = max(lengths) if lengths else 0
    out = flat.new_zeros((len(lengths), width))
    mask = torch.zeros((len(lengths), width), dtype=torch.bool, device=flat.device)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    out = out.masked_scatter(mask, flat) if flat.numel() else out
    return out, mask


def pad_token_id(config) -> int:
    """The id padding positions carry (never attended to, never trained): the
    model's pad token, else its (first) end-of-sequence token, else 0.
    Llama-3-style configs list several eos ids and no pad id."""
    for tok in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(tok, (list, tuple)):
            tok = tok[0] if tok else None
        if tok is not None:
            return int(tok)
    return 0


def learning_rate(lc, steps_done: int) -> float:
    """The lr of the update after `steps_done` updates: linear warm-up to
    `lc.lr`, as transformers' constant_with_warmup schedule (verl's and
    TRL's; its first update has lr 0)."""
    return lc.lr * min(1.0, steps_done / lc.warmup_steps) if lc.warmup_steps else lc.lr


class Learner:
    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1):
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        lc = cfg.learner
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
        load = dict(dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        attn = attention_implementation(lc.attention, lc.packing)
        if attn is not None:  # None: the model's default
            load["attn_implementation"] = attn
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model.path, **load).to(lc.device)
        self.model.train()
        self.ref_model = None
        if lc.kl_beta > 0:  # the initial policy, frozen
            self.ref_model = AutoModelForCausalLM.from_pretrained(cfg.model.path, **load).to(lc.device).eval()
            self.ref_model.requires_grad_(False)
        self.pad_id = pad_token_id(self.model.config)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lc.lr, betas=tuple(lc.betas),
                                     eps=lc.adam_eps, weight_decay=lc.weight_decay)
        self.steps = 0
        # DPPO's completion pruning draws; seeded, the same on every rank.
        self.rng = random.Random(cfg.run.seed)
        # ARRoL's quality head: trained beside the policy, synced with it.
        self.head_trainer = None
        if cfg.pruner.mode == "arrol":
            from stream_rl.learner.quality_head import QualityHeadTrainer

            self.head_trainer = QualityHeadTrainer(self.model.config.hidden_size, cfg.pruner, cfg.run.seed)

    def train_head(self, groups: list[Group]) -> dict:
        """One round of quality-head training on the groups' final rewards."""
        return self.head_trainer.learn(groups) if self.head_trainer is not None else {}

    # --- passes --------------------------------------------------------------------

    def _layout(self, batch: list[Sample]) -> Layout:
        seqs = [(s.prompt_ids, s.response_ids) for s in batch]
        lc = self.cfg.learner
        lay = pack_layout(seqs, lc.pack_row_tokens, self.pad_id) if lc.packing else pad_layout(seqs, self.pad_id)
        return lay.to(lc.device)

    def _micro_batches(self, samples: list[Sample]) -> list[list[Sample]]:
        lc = self.cfg.learner
        return micro_batches(samples, lc.micro_batch_tokens, lc.packing, lc.pack_row_tokens)

    def logprobs(self, samples: list[Sample]) -> tuple[dict[int, torch.Tensor], float]:
        """The log-prob pass: log π(response tokens) per sample (keyed by
        id(sample)), without gradients; and the padding fraction."""
        out, real, total = {}, 0, 0
        with torch.no_grad():
            for mb in self._micro_batches(samples):
                lay = self._layout(mb)
                for s, lp in zip(mb, response_logprobs(self.model, lay).split(lay.lengths)):
                    out[id(s)] = lp
                real, total = real + lay.real_tokens, total + lay.ids.numel()
        return out, 1.0 - real / total if total else 0.0

    # --- the update --------------------------------------------------------------------

    def step(self, samples: list[Sample], policy_version: int | None = None, members: int | None = None) -> dict:
        """One policy update (or `minibatches` of them) on the global batch.

        Every rank gets the same `samples`; rank k trains on samples[k::world]
        with the global batch's normalisers, and the summed gradients equal a
        single rank's on the whole batch. `policy_version`: the version of the
        learner's current weights (token lag = it minus the token's version).
        `members`: the batch's members before pruning (`SampleSet.members`),
        the normaliser under pruning_correction=ht (default: those of the
        groups `samples` hold).
        """
        lc = self.cfg.learner
        samples = dppo_prune_completions(samples, lc.dppo_completion_rate, self.rng)
        stats = {"loss": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "rollout_logprob_abs_diff": math.nan,
                 "rollout_logprob_tokens": 0, "stale_token_frac": 0.0, "samples_trained": len(samples)}
        if not samples:
            return stats
        weights = pruning_weights(samples, lc.pruning_correction)
        stats["ht_weight_max"] = max(weights)
        stats["ht_weight_mean"] = sum(weights) / len(weights)
        stats["ht_ess"] = effective_sample_size(weights)
        stats["ht_ess_frac"] = stats["ht_ess"] / len(weights)
        w_of = {id(s): w for s, w in zip(samples, weights)}
        n_mb = min(lc.minibatches, len(samples))
        minibatches = [samples[i::n_mb] for i in range(n_mb)]
        # A sample with advantage 0 (its group's rewards all equal) has a loss
        # term and a gradient of exactly 0 when there is no KL term: it only
        # counts in the normalisers, which come from the whole batch. Its
        # forward and backward are skipped; ranks share the rest.
        live = (lambda xs: xs) if lc.kl_beta > 0 else (lambda xs: [s for s in xs if s.advantage != 0.0])  # noqa: E731
        mine = lambda xs: live(xs)[self.rank::self.world_size]  # noqa: E731
        stats["samples_without_gradient"] = len(samples) - len(live(samples))
        # π_old must be fixed before the first update when there are several.
        # The first mini-batch's own forward runs before any update, so its
        # log-probs are π_old already: only the later ones need this pass.
        old, _ = self.logprobs([s for mb in minibatches[1:] for s in mine(mb)]) if n_mb > 1 else ({}, 0.0)
        # Sums reduced over ranks at the end: loss, clipped, tokens, |Δlogp|, n(Δ), real, total.
        acc = torch.zeros(7, dtype=torch.float64)
        offp = []
        for k, mb_samples in enumerate(minibatches):
            num_seqs, num_tokens = loss_normalisers(mb_samples, lc.pruning_correction, samples, members,
                                                    self.cfg.dapo_token_budget)
            self.opt.zero_grad(set_to_none=True)
            for mb in self._micro_batches(mine(mb_samples)):
                lay = self._layout(mb)
                logp = response_logprobs(self.model, lay)
                old_flat = torch.cat([old[id(s)] for s in mb]) if k > 0 else logp.detach()
                dev = logp.device
                rollout = None
                if all(s.rollout_logprobs is not None for s in mb):
                    rollout = torch.tensor([x for s in mb for x in s.rollout_logprobs], dtype=logp.dtype, device=dev)
                lag = torch.tensor([(policy_version - v) if policy_version is not None else 0
                                    for s in mb for v in s.versions], dtype=torch.long, device=dev)
                tok_w = mask_stale_tokens(offpolicy_weights(lc.offpolicy, old_flat, rollout, lag, tis_cap=lc.tis_cap,
                                                            behave_cap=lc.behave_cap),
                                          lag, self.cfg.buffer.token_staleness)
                offp.append((tok_w, old_flat, rollout, lag, positions(lay.lengths)))
                ref = None
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref = response_logprobs(self.ref_model, lay)
                lengths = lay.lengths
                rows = lambda x: as_rows(x, lengths)[0]  # noqa: E731
                lp_rows, mask = as_rows(logp, lengths)
                adv = torch.tensor([s.advantage for s in mb], dtype=logp.dtype, device=dev)
                seq_w = torch.tensor([w_of[id(s)] for s in mb], dtype=logp.dtype, device=dev)
                terms = policy_loss(lc.loss, lp_rows, rows(old_flat), adv, mask, clip_low=lc.clip_low,
                                    clip_high=lc.clip_high, num_seqs=num_seqs, num_tokens=num_tokens,
                                    tok_weight=None if lc.offpolicy == "none" and self.cfg.buffer.token_staleness is None
                                    else rows(tok_w),
                                    seq_weight=seq_w, ref_logp=None if ref is None else rows(ref),
                                    kl_beta=lc.kl_beta)
                terms.loss.backward()
                acc[0] += float(terms.loss.detach()) / n_mb
                acc[1] += float(terms.clipped_tokens)
                acc[2] += float(terms.tokens)
                if rollout is not None:
                    # Engine/learner mismatch on the tokens of the learner's own
                    # version, before this step's first update (π_old).
                    same = lag == 0
                    acc[3] += float((old_flat - rollout).abs()[same].sum())
                    acc[4] += float(same.sum())
                acc[5] += lay.real_tokens
                acc[6] += lay.ids.numel()
            for p in self.model.parameters():  # nothing to train here: a zero gradient, as the full pass gives
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self._reduce_grads()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), lc.grad_clip)
            for g in self.opt.param_groups:
                g["lr"] = learning_rate(lc, self.steps)
            self.opt.step()
            stats["grad_norm"] = max(stats["grad_norm"], float(gn))
        self.steps += 1
        stats["lr"] = self.opt.param_groups[0]["lr"]
        acc = self._reduce_sum(acc)
        stats["loss"] = float(acc[0])
        stats["clip_frac"] = float(acc[1] / max(acc[2], 1.0))
        # NaN when no token of the learner's own version was there to compare
        # (stream steps whose batch is all older tokens): not a perfect 0.
        stats["rollout_logprob_abs_diff"] = float(acc[3] / acc[4]) if acc[4] > 0 else math.nan
        stats["rollout_logprob_tokens"] = int(acc[4])
        stats["padding_fraction"] = float(1.0 - acc[5] / max(acc[6], 1.0))
        # Off-policy statistics over every rank's tokens that carry a gradient.
        cat = lambda k: torch.cat([o[k] for o in offp]) if offp else torch.zeros(0)  # noqa: E731
        has_rollout = bool(offp) and all(o[2] is not None for o in offp)
        sums, w_max = offpolicy_counts(cat(0), cat(1), cat(2) if has_rollout else None, cat(3).long())
        sums = self._reduce_sum(sums)
        w_max = self._reduce_max(torch.tensor([w_max], dtype=torch.float64))
        stats.update(offpolicy_stats_from(sums, float(w_max[0])))
        # The engine/learner mismatch, log π_rollout − log π_old, over every rank's trained tokens.
        if has_rollout or self.world_size > 1:
            counts = histogram_counts(cat(2) - cat(1) if has_rollout else torch.zeros(0), cat(4))
            stats.update(mismatch_stats(self._reduce_sum(counts)))
        stats["stale_token_frac"] = stats["offpolicy_token_frac"]
        return stats

    # --- torch.distributed ----------------------------------------------------------

    def _reduce_grads(self) -> None:
        """Sum gradients over ranks: each rank's loss carries the global
        normalisers, so the sum is the whole batch's gradient. One flat
        buffer per dtype: one collective instead of one per parameter."""
        if self.world_size == 1:
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = list(self.model.parameters())  # every one has a gradient (`step`)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for g, v in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(v)

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, "SUM")

    def _reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, "MAX")

    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        # These sums live on the host; nccl reduces CUDA tensors only.
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
        moved = t.to(dev)
        dist.all_reduce(moved, op=getattr(dist.ReduceOp, op))
        return moved.to(t.device)

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
