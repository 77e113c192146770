"""`stream-rl prepare-tiny`: build the tiny world once and cache it.

Writes, under OUT (default `.cache/tiny`):
  model/            Hugging Face checkpoint (config, safetensors, tokenizer)
  data/train.jsonl  training prompts  {"prompt", "solution", "answer", "level"}
  data/eval.jsonl   every held-out prompt (about 1/8 of the task's 810), never trained on
  stats.json        measured warm-start pass rate, length distribution, ...
A second call with the same recipe returns the cached stats at once.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from stream_rl.tiny import task
from stream_rl.tiny.model import build_model, build_tokenizer, save_checkpoint
from stream_rl.tiny.warmstart import WarmStartResult, encode, greedy_exact, percentile, sample_responses, warm_start
from stream_rl.verifier import MathVerifier

RECIPE = {
    "version": 9,
    "train_prompts": 20000,
    "probe_prompts": 128,
    "samples_per_prompt": 8,
    # Long enough to converge: the model then follows the teacher's mixture
    # of rules (pass rate ~0.63, greedy 0.93) instead of stopping at a
    # half-trained point that depends on floating-point detail (1500 steps,
    # version 8, passed 0.33 on one machine and 0.19 on another).
    "sft_steps": 3000,
    # A noisy teacher: this share of the warm start's reference solutions
    # count down by the wrong step (task.teacher_slip). The warm start then
    # picks the wrong rule about as often at temperature 1 -- a systematic,
    # learnable mistake, like a base model's competing strategies, which RL
    # removes in tens of steps (sampling noise baked in as a flat temperature
    # took a sub-million-parameter model hundreds of noisy RL steps to undo).
    "teacher_slip_rate": 0.35,
    "seed": 0,
}

# The warm start this recipe gave when it was written, shipped so that every
# machine starts RL from the same weights: CPUs differ in floating-point
# detail, and thousands of training steps carry the difference into other
# weights and another world. `prepare-tiny --rebuild` trains it here instead.
SHIPPED_WARM_START = Path(__file__).with_name("warm_start.safetensors")


def recipe_key() -> str:
    return json.dumps(RECIPE, sort_keys=True)


def shipped_weights() -> dict | None:
    """The shipped warm start's tensors, if they were made by this RECIPE."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not SHIPPED_WARM_START.is_file():
        return None
    with safe_open(SHIPPED_WARM_START, "pt") as f:
        if (f.metadata() or {}).get("recipe") != recipe_key():
            return None
    return load_file(SHIPPED_WARM_START)


def ship_warm_start(model_dir: str | Path) -> Path:
    """Write the warm start in `model_dir` (built by this RECIPE) as the shipped one."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(Path(model_dir) / "model.safetensors"), SHIPPED_WARM_START, metadata={"recipe": recipe_key()})
    return SHIPPED_WARM_START


def _write_jsonl(path: Path, problems: list[task.Problem]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "solution": p.solution, "answer": p.answer,
                                "level": p.level}) + "\n")


def prepare_tiny(out: str | Path = ".cache/tiny", force: bool = False, rebuild: bool = False, log=print) -> dict:
    """`rebuild`: train the warm start here even where the shipped one fits."""
    out = Path(out)
    stats_path = out / "stats.json"
    if not force and not rebuild and stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        if stats.get("recipe") == RECIPE:
            log(f"tiny world already prepared in {out} (pass rate {stats['pass_rate']:.3f})")
            return stats
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seed = RECIPE["seed"]
    train = task.make_dataset(RECIPE["train_prompts"], seed=seed + 1)
    _write_jsonl(out / "data" / "train.jsonl", train)
    _write_jsonl(out / "data" / "eval.jsonl", task.held_out_problems())

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    probe = train[: RECIPE["probe_prompts"]]
    probe_enc = encode(probe, tokenizer)
    shipped = None if rebuild else shipped_weights()
    if shipped is not None:
        missing, unexpected = model.load_state_dict(shipped, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the tied lm_head is the embedding
            raise RuntimeError(f"{SHIPPED_WARM_START} does not fit the tiny model: missing {missing}, "
                               f"unexpected {unexpected}")
        model.tie_weights()
        ws = WarmStartResult(0, greedy_exact(model, probe_enc, tokenizer.eos_token_id), 0.0)
        log(f"warm start: the shipped one ({SHIPPED_WARM_START.name}), greedy-exact {ws.greedy_exact:.3f}")
    else:
        slip = random.Random(seed + 2)
        taught = [dataclasses.replace(p, solution=task.teacher_slip(p.start, p.step))
                  if slip.random() < RECIPE["teacher_slip_rate"] else p for p in train]
        ws = warm_start(model, encode(taught, tokenizer), probe_enc, tokenizer.eos_token_id,
                        steps=RECIPE["sft_steps"], seed=seed, log=log)
        log(f"warm start: greedy-exact {ws.greedy_exact:.3f}")
    save_checkpoint(model, tokenizer, out / "model")

    # Measure what RL will start from: sampling at temperature 1.
    k = RECIPE["samples_per_prompt"]
    # Room for twice the reference length: enough to see wrong, longer
    # responses, while short problems do not wait for long ones.
    caps = [2 * len(tokenizer(p.solution).input_ids) + 16 for p in probe]
    samples = sample_responses(model, tokenizer, [tokenizer(p.prompt).input_ids for p in probe], n=k,
                               max_new_tokens=caps, seed=seed)
    # The tiny config's reward: the whole worked solution, exactly.
    verifier = MathVerifier(match="exact")
    texts = [[tokenizer.decode(s, skip_special_tokens=True) for s in ss] for ss in samples]
    rewards = np.array([[verifier.score(t, p.solution) for t in ts] for ts, p in zip(texts, probe)])
    final_answer = MathVerifier(task.ANSWER_REGEX)
    answer_rewards = np.array([[final_answer.score(t, p.answer) for t in ts] for ts, p in zip(texts, probe)])
    correct_lens = [len(s) for ss, rs in zip(samples, rewards) for s, r in zip(ss, rs) if r == 1.0]
    per_prompt = rewards.mean(1)
    levels = np.array([p.level for p in probe])
    stats = {
        "recipe": RECIPE,
        "params": sum(p.numel() for p in model.parameters()),
        "warm_start": "shipped" if shipped is not None else "trained here",
        "warm_start_steps": RECIPE["sft_steps"],
        "warm_start_greedy_exact": ws.greedy_exact,
        "pass_rate": float(rewards.mean()),
        # Final answer only: higher, as the model often recovers from a slip.
        "final_answer_pass_rate": float(answer_rewards.mean()),
        "pass_rate_by_level": {str(lv): float(rewards[levels == lv].mean()) for lv in sorted(set(levels))},
        "disagreeing_prompt_fraction": float(((per_prompt > 0) & (per_prompt < 1)).mean()),
        "correct_len_p50": percentile(correct_lens, 0.5),
        "correct_len_p99": percentile(correct_lens, 0.99),
        "seconds": time.time() - t0,
    }
    stats["correct_len_p99_over_p50"] = stats["correct_len_p99"] / stats["correct_len_p50"]
    stats_path.write_text(json.dumps(stats, indent=2))
    log(f"tiny world ready in {out}: pass rate {stats['pass_rate']:.3f}, "
        f"{stats['disagreeing_prompt_fraction']:.2f} of prompts with disagreeing samples, "
        f"correct length p50 {stats['correct_len_p50']:.0f} p99 {stats['correct_len_p99']:.0f} "
        f"({stats['seconds']:.0f} s)")
    return stats
