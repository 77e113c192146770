"""The tiny world's measured properties (`stats.json`), on held-out prompts.

The properties the RLVR papers describe and a miniature has to reproduce
(issue 23): a long-tailed length distribution with truncation, wrong
answers that run long, rollouts whose fate shows early (a quality head at
L_detect ranks them), a pass rate with room to learn, and room for voting
(majority vote above pass@1, pass@k above the vote). Everything is measured
on the warm start sampled at temperature 1, plain ancestral sampling, as RL
starts from it; the head is ARRoL's own (`pruner.head`: the final hidden
state at L_detect and the confidence of the L_detect sampled tokens), trained
on rollouts of training prompts and scored on held-out ones.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import torch

from stream_rl.eval.voting import majority_vote
from stream_rl.pruner.head import QualityHead, head_features, head_input_size
from stream_rl.pruner.quality import stratified_auc
from stream_rl.tiny import task
from stream_rl.tiny.warmstart import percentile, sample_responses
from stream_rl.verifier import MathVerifier


def _rollouts(model, tokenizer, problems: list[task.Problem], k: int, max_tokens: int, seed: int) -> list[dict]:
    """k samples per problem: ids, text, reward (whole solution), answer, truncated."""
    prompts = [tokenizer(p.prompt).input_ids for p in problems]
    samples = sample_responses(model, tokenizer, prompts, n=k, max_new_tokens=[max_tokens] * len(problems),
                               seed=seed)
    eos, exact, answer_re = tokenizer.eos_token_id, MathVerifier(match="exact"), re.compile(task.ANSWER_REGEX)
    out = []
    for g, (p, ids, group) in enumerate(zip(problems, prompts, samples)):
        for s in group:
            text = tokenizer.decode(s, skip_special_tokens=True)
            truncated = eos not in s
            m = None if truncated else answer_re.search(text.strip())
            out.append({"group": g, "problem": p, "prompt_ids": ids, "ids": s, "len": len(s), "truncated": truncated,
                        "reward": exact.score(text, p.solution), "answer": m.group(1) if m else None})
    return out


@torch.no_grad()
def _head_features(model, rollouts: list[dict], l_detect: int) -> torch.Tensor:
    """What the engine's scorer captures for each rollout at L_detect: the
    final (normed) hidden state of response token l_detect and the
    confidence of response tokens 1..l_detect."""
    rows = []
    for r in rollouts:
        ids = torch.tensor([r["prompt_ids"] + r["ids"][:l_detect]])
        hidden = model.model(input_ids=ids).last_hidden_state[0]  # after the final norm, as vLLM's
        n = len(r["prompt_ids"])
        lps = torch.log_softmax(model.lm_head(hidden[n - 1:-1]).float(), -1).gather(-1, ids[0, n:, None])[:, 0]
        rows.append(head_features(hidden[-1], lps.tolist()))
    return torch.stack(rows)


def _train_head(x: torch.Tensor, y: torch.Tensor, hidden: int, seed: int, steps: int = 600) -> QualityHead:
    torch.manual_seed(seed)
    head = QualityHead(x.shape[1], hidden)
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (min(256, len(y)),), generator=gen)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


def _first_number(p: task.Problem, ids: list[int], tokenizer) -> str:
    first = tokenizer.decode(ids[:4], skip_special_tokens=True).split(" ")[0]
    if first == f"{p.start - p.step:02d}":
        return "right"
    if first == f"{p.start - task.wrong_step(p.step):02d}":
        return "wrong_step"
    return "count_up" if first.isdigit() and int(first) >= p.start else "other"  # task.count_up


def world_stats(model, tokenizer, train: list[task.Problem], held_out: list[task.Problem], *, max_tokens: int,
                l_detect: int, k: int, head_prompts: int, head_samples: int, head_hidden: int, seed: int) -> dict:
    model.eval()
    ro = _rollouts(model, tokenizer, held_out, k, max_tokens, seed)
    lens = [r["len"] for r in ro]
    correct = [r["len"] for r in ro if r["reward"] == 1.0]
    wrong = [r["len"] for r in ro if r["reward"] != 1.0]
    pass1, maj, passk = [], [], []
    for g, p in enumerate(held_out):
        answers = [r["answer"] for r in ro if r["group"] == g]
        pass1.append(np.mean([a == p.answer for a in answers]))
        maj.append(float(majority_vote(answers) == p.answer))
        passk.append(float(p.answer in answers))
    levels = np.array([r["problem"].level for r in ro])
    hard = np.array([r["problem"].step >= task.HARD_STEP for r in ro])
    rewards = np.array([r["reward"] for r in ro])
    approach = Counter(_first_number(r["problem"], r["ids"], tokenizer) for r in ro)
    stats = {
        "max_tokens": max_tokens,
        "samples_per_heldout_prompt": k,
        "heldout_prompts": len(held_out),
        "heldout_pass_rate": float(rewards.mean()),
        "pass_rate_by_level": {str(lv): float(rewards[levels == lv].mean()) for lv in sorted(set(levels))},
        "pass_rate_easy_steps": float(rewards[~hard].mean()), "pass_rate_hard_steps": float(rewards[hard].mean()),
        "len_p50": percentile(lens, 0.5), "len_p90": percentile(lens, 0.9), "len_p99": percentile(lens, 0.99),
        "truncated_frac": float(np.mean([r["truncated"] for r in ro])),
        "correct_len_mean": float(np.mean(correct)) if correct else math.nan,
        "wrong_len_mean": float(np.mean(wrong)) if wrong else math.nan,
        "first_number": {a: n / len(ro) for a, n in sorted(approach.items())},
        # The vote's key is the final answer (eval's answer_regex), as in `stream-rl eval`.
        "pass1": float(np.mean(pass1)), f"maj_at_{k}": float(np.mean(maj)), f"pass_at_{k}": float(np.mean(passk)),
    }
    stats["len_p99_over_p50"] = stats["len_p99"] / stats["len_p50"]
    stats["wrong_over_correct_len"] = stats["wrong_len_mean"] / stats["correct_len_mean"]
    stats["maj_minus_pass1"] = stats[f"maj_at_{k}"] - stats["pass1"]
    stats["passk_minus_maj"] = stats[f"pass_at_{k}"] - stats[f"maj_at_{k}"]

    # The head: trained on training prompts' rollouts, scored on the held-out
    # ones, on the rollouts the engine scores (those that reach L_detect).
    fit = [r for r in _rollouts(model, tokenizer, train[:head_prompts], head_samples, max_tokens, seed + 1)
           if r["len"] > l_detect]
    test = [r for r in ro if r["len"] > l_detect]
    x_fit, x_test = _head_features(model, fit, l_detect), _head_features(model, test, l_detect)
    assert x_fit.shape[1] == head_input_size(model.config.hidden_size)
    y_fit = torch.tensor([r["reward"] for r in fit], dtype=torch.float32)
    head = _train_head(x_fit, y_fit, head_hidden, seed)
    with torch.no_grad():
        scores = head(x_test).numpy()
    y_test = np.array([r["reward"] == 1.0 for r in test])
    stats.update({
        "l_detect": l_detect,
        "head_fit_rollouts": len(fit),
        "heldout_scored_frac": len(test) / len(ro),
        # Within a group (one prompt): the ranking ARRoL's pruning uses.
        "head_auc_heldout": stratified_auc(scores, y_test, [r["group"] for r in test]),
        "head_auc_heldout_pooled": stratified_auc(scores, y_test, np.zeros(len(test))),
    })
    return stats
