"""Supervised warm start of the tiny model from a noisy teacher.

RLVR needs a policy that sometimes succeeds: a group whose samples all agree
carries no signal. The warm start imitates reference solutions of which a
share (`prepare.RECIPE["teacher_slip_rate"]`) count down by the wrong step,
so the model, sampled at temperature 1, follows the wrong rule about that
often and otherwise makes occasional slips. This is the regime RLVR meets in
a real base model: it knows the task and holds competing strategies, and RL
shifts its weight toward the one the verifier rewards. Two other starts were
tried and dropped: supervised training stopped early errs everywhere at once
(greedy barely beats sampling), and a competent model flattened by a baked
logit temperature (world version 6) loses answers to sampling noise that a
sub-million-parameter model took hundreds of noisy RL steps to undo: its
reward did not rise in 40 steps at lr 3e-4 and fell at 1e-3.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

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
def greedy_exact(model, probe: list[Encoded], pad: int) -> float:
    """The share of references greedy decoding reproduces exactly (teacher forced)."""
    model.eval()
    greedy = []
    for i in range(0, len(probe), 128):
        ids, attn, mask = pad_batch(probe[i:i + 128], pad)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        greedy.append(((logits.argmax(-1) == ids[:, 1:]) | ~mask).all(1))
    return torch.cat(greedy).float().mean().item()


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
            greedy = greedy_exact(model, probe, pad)
            log(f"warm start step {step}/{steps}: loss {loss.item():.3f}  greedy-exact {greedy:.3f}")
    greedy = greedy_exact(model, probe, pad)
    return WarmStartResult(steps, greedy, time.time() - t0)


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
