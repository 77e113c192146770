"""Supervised warm start of the tiny model, then flattened into the RL band.

RLVR needs a policy that sometimes succeeds: a group whose samples all agree
carries no signal. The warm start trains on reference solutions until the
model is competent (its greedy decoding is mostly right), then bakes a logit
temperature tau > 1 into the final norm so that, sampled at temperature 1,
it follows the reference with a chosen probability (`target_exact`). This is
the regime of a real instruction-tuned model: it knows the task and loses
answers to sampling noise, which RL then learns to remove. Supervised
training alone, stopped early, gives a model that errs systematically
(greedy barely beats sampling) and RL of a sub-million-parameter model from
there is slow and fragile.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stream_rl.learner.trainer import pad_batch, token_logprobs
from stream_rl.tiny.task import Problem


@dataclass
class Encoded:
    prompt_ids: list[int]
    response_ids: list[int]  # reference solution + EOS


def encode(problems: list[Problem], tokenizer) -> list[Encoded]:
    eos = tokenizer.eos_token_id
    out = []
    for p in problems:
        out.append(Encoded(tokenizer(p.prompt).input_ids, tokenizer(p.solution).input_ids + [eos]))
    return out


@dataclass
class WarmStartResult:
    steps: int
    greedy_exact: float  # probe responses whose every token is the argmax
    seconds: float


@torch.no_grad()
def _probe_logprobs(model, probe: list[Encoded], pad: int, temperature: float = 1.0):
    """Per-sequence sums of reference log-probs at a temperature, and whether
    greedy decoding reproduces each reference exactly (teacher forced)."""
    model.eval()
    sums, greedy = [], []
    for i in range(0, len(probe), 128):
        ids, attn, mask = pad_batch(probe[i:i + 128], pad)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
        lp = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None]).squeeze(2)
        sums.append((lp * mask).sum(1))
        greedy.append(((logits.argmax(-1) == ids[:, 1:]) | ~mask).all(1))
    return torch.cat(sums), torch.cat(greedy).float().mean().item()


def warm_start(model, train: list[Encoded], probe: list[Encoded], pad: int, *, steps: int, lr: float = 3e-3,
               batch_size: int = 32, seed: int = 0, log=print) -> WarmStartResult:
    """Supervised training on reference solutions, cosine-decayed learning rate."""
    rng = random.Random(seed)
    # Batches of similar length (a random window of the length-sorted set)
    # keep padding, and so wasted compute, small.
    by_len = sorted(train, key=lambda e: len(e.prompt_ids) + len(e.response_ids))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = 50
    t0 = time.time()
    for step in range(1, steps + 1):
        model.train()
        progress = step / steps
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        start = rng.randrange(0, len(by_len) - batch_size + 1)
        ids, attn, mask = pad_batch(by_len[start:start + batch_size], pad)
        loss = -token_logprobs(model, ids, attn)[mask].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == steps:
            _, greedy = _probe_logprobs(model, probe, pad)
            log(f"warm start step {step}/{steps}: loss {loss.item():.3f}  greedy-exact {greedy:.3f}")
    _, greedy = _probe_logprobs(model, probe, pad)
    return WarmStartResult(steps, greedy, time.time() - t0)


def calibrate_temperature(model, probe: list[Encoded], pad: int, target_exact: float) -> float:
    """The tau at which sampling reproduces a probe reference with mean
    probability `target_exact` (bisection; that probability falls with tau)."""
    lo, hi = 1.0, 8.0
    for _ in range(30):
        mid = (lo + hi) / 2
        sums, _ = _probe_logprobs(model, probe, pad, temperature=mid)
        if sums.exp().mean().item() > target_exact:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def bake_temperature(model, tau: float) -> None:
    """Scale the final RMSNorm by 1/tau: every logit is divided by tau, with
    the architecture and the tied embedding left as they are."""
    with torch.no_grad():
        model.model.norm.weight.div_(tau)


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[list[int]], n: int, max_new_tokens: list[int],
                     batch_size: int = 256, seed: int = 0) -> list[list[list[int]]]:
    """`n` samples per prompt at temperature 1 (plain ancestral sampling).

    `max_new_tokens[i]` caps prompt i; samples are batched by that cap so a
    batch of short problems stops early instead of waiting for long ones.
    """
    torch.manual_seed(seed)
    model.eval()
    eos = tokenizer.eos_token_id
    flat = sorted(((max_new_tokens[i], i) for i in range(len(prompts)) for _ in range(n)))
    out: list[list[list[int]]] = [[] for _ in prompts]
    for b in range(0, len(flat), batch_size):
        chunk = flat[b:b + batch_size]
        width = max(len(prompts[i]) for _, i in chunk)
        ids = torch.full((len(chunk), width), eos, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, (_, i) in enumerate(chunk):  # left padding for generation
            ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attn[j, width - len(prompts[i]):] = 1
        gen = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=max(c for c, _ in chunk), eos_token_id=eos,
                             pad_token_id=eos)
        for (cap, i), row in zip(chunk, gen[:, width:].tolist()):
            row = row[:cap]
            out[i].append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def percentile(values: list[int], q: float) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))
