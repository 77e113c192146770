"""Supervised warm start of the tiny model from a noisy teacher.

RLVR needs a policy that sometimes succeeds: a group whose samples all agree
carries no signal. The warm start imitates a teacher that sometimes takes a
wrong approach at the first number (`task.teacher_solution`), so the model,
sampled at temperature 1, does so about as often and otherwise makes
occasional slips: the regime RLVR meets in a real base model, which knows
the task and holds competing strategies; RL shifts weight toward the one
the verifier rewards. Two other starts were tried and dropped (worlds 6-8):
supervised training stopped early errs everywhere at once, and a competent
model flattened by a baked logit temperature loses answers to sampling
noise that a sub-million-parameter model takes hundreds of RL steps to undo.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from stream_rl.learner.trainer import pad_batch, token_logprobs


@dataclass
class Encoded:
    prompt_ids: list[int]
    response_ids: list[int]  # the response, + EOS where it ends


def encode(examples: list[tuple[str, str, bool]], tokenizer) -> list[Encoded]:
    """(prompt, response, ends) triples as ids; a response that ends gets EOS."""
    eos = tokenizer.eos_token_id
    return [Encoded(tokenizer(prompt).input_ids, tokenizer(response).input_ids + ([eos] if ends else []))
            for prompt, response, ends in examples]


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
               batch_size: int = 32, chunks: int = 4, seed: int = 0, log=print) -> WarmStartResult:
    """Supervised training on the teacher's responses, cosine-decayed learning rate.

    A step's `batch_size` examples are drawn at random from the whole set and
    its loss is the mean over all their tokens, so each token weighs the same
    whatever its response's length: the optimum is the teacher's own
    distribution. (Batches of similar lengths, each its own token mean, weigh
    the first token of a long response, the approach it takes, by 1/its
    length against a short one's: on world 10 the model then took the
    rambling approach in 0.08 of samples for the teacher's 0.32.) The drawn
    examples run in `chunks` forward passes of similar lengths, so padding
    stays small.
    """
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = 50
    t0 = time.time()
    for step in range(1, steps + 1):
        model.train()
        progress = step / steps
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        drawn = sorted(rng.sample(train, batch_size), key=lambda e: len(e.prompt_ids) + len(e.response_ids))
        size = -(-batch_size // chunks)
        parts = [pad_batch(drawn[i:i + size], pad) for i in range(0, batch_size, size)]
        n_tokens = sum(int(mask.sum()) for _, _, mask in parts)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for ids, attn, mask in parts:
            loss = -token_logprobs(model, ids, attn)[mask].sum() / n_tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == steps:
            greedy = greedy_exact(model, probe, pad)
            log(f"warm start step {step}/{steps}: loss {total:.3f}  greedy-exact {greedy:.3f}")
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
