"""The long-context half of `stream-rl bench sparsity` (docs/sparse-rollouts.md):
generation speed and the mismatch tail at each fixed attention window.

One engine, built and placed as the pipeline builds and places its own
(`CapacityProbe`'s child: dtype, compiled or eager, per-request seeds, the
worker's sampled log-probs), generates a batch of `requests` rollouts of
`tokens` tokens with `ignore_eos` at each window in turn. Every window gets
the same prompts and the same per-request seeds, and the windows run in
interleaved rounds (forward, then backward), because this machine's speed
drifts by ±25–40% within minutes: each window's speed-up is its rate over
the dense rate of the same round, and the rounds' median is reported.

The tail: each rollout's tokens are scored by the dense model the learner
trains (Hugging Face, the config's dtype, every key) and m = log π_engine −
log π_dense per response token goes through the learner's own mismatch
monitor (`learner/mismatch.py`), so the quantiles are the ones a training
step would report for the same tokens.

The attention share: window 1 leaves each token its own key only, so
1 − (dense time per token ÷ window-1 time per token) is the part of the
dense step that attends over the context, on this workload and machine.
"""

from __future__ import annotations

import statistics
import time

from stream_rl.config import Config

CALL = "benchmarks.sparsity_stress:windowed_batch"


async def windowed_batch(engine, ledger, cfg: Config, prompts: list[list[int]], window: int, requests: int,
                         tokens: int, seed: int, keep: int) -> dict:
    """In the engine's child: set `window` on every worker (0: dense) and
    generate `requests` rollouts at once; the rate, and the first `keep`
    rollouts' prompts, tokens and engine log-probs."""
    import asyncio
    import contextlib

    from benchmarks.capacity import raw_request
    from stream_rl.controller.rollouts import request_seed
    from stream_rl.generator.engine_updates import while_paused

    # As the generator sets it: on every worker, every cached prefix (the
    # prompts, under the last window) recomputed.
    await while_paused(engine, "stream_rl_set_attention_window", (window,))

    async def one(i: int) -> tuple[list[int], list[int], list[float]]:
        prompt = prompts[i % len(prompts)]
        ids: list[int] = []
        lps: list[float] = []
        # The same seed per window: every window samples from the same draws.
        async with contextlib.aclosing(raw_request(engine, ledger, cfg, f"sparsity-w{window}-s{seed}-{i}", prompt,
                                                   tokens, request_seed(seed, str(i)))) as steps:
            async for new, new_lps in steps:
                ids.extend(new)
                lps.extend(new_lps)
        return prompt, ids, lps

    t0 = time.perf_counter()
    rollouts = await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - t0
    generated = sum(len(r[1]) for r in rollouts)
    return {"window": window, "wall_s": wall, "tokens": generated, "tokens_per_s": generated / wall,
            "rollouts": [list(r) for r in rollouts[:keep]]}


def dense_logprobs(model, rollouts: list) -> list:
    """Per rollout, the dense model's log-prob of each response token."""
    import torch

    out = []
    with torch.no_grad():
        for prompt, ids, _ in rollouts:
            seq = torch.tensor([list(prompt) + list(ids)])
            logits = model(input_ids=seq).logits[0, len(prompt) - 1:-1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, seq[0, len(prompt):, None]).squeeze(-1))
    return out


def tail(model, rollouts: list) -> dict:
    """The mismatch monitor's statistics for these rollouts' tokens against the dense model."""
    import torch

    from stream_rl.learner.mismatch import histogram_counts, mismatch_stats, positions

    dense = dense_logprobs(model, rollouts)
    m = torch.cat([torch.tensor(lps, dtype=torch.float64) - d.double() for (_, _, lps), d in zip(rollouts, dense)])
    return mismatch_stats(histogram_counts(m, positions([len(r[1]) for r in rollouts])))


def load_dense(cfg: Config):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=getattr(torch, cfg.model.dtype),
                                                trust_remote_code=cfg.model.trust_remote_code).eval()


def stress(probe, cfg: Config, windows: list[int], requests: int, tokens: int, rounds: int,
           keep: int) -> dict:
    """Speed-up and tail per window on one engine (`probe`: a `CapacityProbe`)."""
    if not cfg.generator.return_logprobs:
        raise ValueError("bench sparsity needs the engine's log-probs: set generator.return_logprobs: true")
    order = [0, *[w for w in windows if w != 0]]
    rates: dict[int, list[float]] = {w: [] for w in order}
    ratios: dict[int, list[float]] = {w: [] for w in order}
    tails: dict[int, dict] = {}
    model = load_dense(cfg)
    probe.call(CALL, 600.0, window=0, requests=min(requests, 16), tokens=16, seed=-1, keep=0)  # compile, warm
    for r in range(rounds):
        seq = order if r % 2 == 0 else order[::-1]
        res = {w: probe.call(CALL, 1800.0, window=w, requests=requests, tokens=tokens, seed=cfg.run.seed,
                             keep=keep if r == 0 else 0) for w in seq}
        for w in order:
            rates[w].append(res[w]["tokens_per_s"])
            ratios[w].append(res[w]["tokens_per_s"] / res[0]["tokens_per_s"])
            if r == 0:
                tails[w] = tail(model, res[w]["rollouts"])
    per_window = {str(w): {"tokens_per_s": [round(x, 1) for x in rates[w]],
                           "speedup_vs_dense": round(statistics.median(ratios[w]), 4),
                           "speedup_per_round": [round(x, 4) for x in ratios[w]],
                           **{k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in tails[w].items()}}
                  for w in order}
    out = {"requests": requests, "tokens_per_request": tokens, "rounds": rounds,
           "context_tokens_max": cfg.model.max_model_len, "scored_rollouts": keep, "windows": per_window}
    if 1 in rates:
        out["attention_share"] = round(1 - 1 / statistics.median(ratios[1]), 4)
    return out


def speedup_at(stress_result: dict, window: int) -> float | None:
    """The measured speed-up at `window` (0: dense, 1.0)."""
    if window == 0:
        return 1.0
    entry = stress_result["windows"].get(str(window))
    return entry["speedup_vs_dense"] if entry else None
