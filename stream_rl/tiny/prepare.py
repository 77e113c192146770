"""`stream-rl prepare-tiny`: build the tiny world once and cache it.

Writes, under OUT (default `.cache/tiny`):
  model/            Hugging Face checkpoint (config, safetensors, tokenizer)
  data/train.jsonl  training prompts  {"prompt", "solution", "answer", "level"}
  data/eval.jsonl   every held-out prompt (about 1/8 of the task's 810), never trained on
  stats.json        measured warm-start pass rate, length distribution, ...
A second call with the same recipe returns the cached stats at once.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from stream_rl.tiny import task
from stream_rl.tiny.model import build_model, build_tokenizer, save_checkpoint
from stream_rl.tiny.stats import world_stats
from stream_rl.tiny.warmstart import WarmStartResult, encode, greedy_exact, warm_start

RECIPE = {
    "version": 10,
    "train_prompts": 20000,
    "probe_prompts": 128,
    # Long enough to converge: the model then follows the teacher's mixture
    # of approaches instead of stopping at a half-trained point that depends
    # on floating-point detail (world 8: 1500 steps passed 0.33 on one
    # machine and 0.19 on another).
    "sft_steps": 3000,
    # The teacher's approaches at the first number are task.APPROACH_RATES;
    # its count-ups run this far past the RL budget (no EOS), so the warm
    # start learns that they do not stop.
    "approach_rates": {k: list(v) for k, v in task.APPROACH_RATES.items()},
    "max_tokens": 320,
    "ramble_chars": 336,
    # Measured on held-out prompts (stats.py): k samples each for the vote,
    # and the head at l_detect (<= max_tokens / 8), fitted on rollouts of
    # head_prompts training prompts.
    "heldout_samples": 16,
    "l_detect": 32,
    "head_prompts": 256,
    "head_samples": 8,
    "head_hidden": 256,
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
            log(f"tiny world already prepared in {out} (held-out pass rate {stats['heldout_pass_rate']:.3f})")
            return stats
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seed = RECIPE["seed"]
    train = task.make_dataset(RECIPE["train_prompts"], seed=seed + 1)
    _write_jsonl(out / "data" / "train.jsonl", train)
    _write_jsonl(out / "data" / "eval.jsonl", task.held_out_problems())

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    probe = encode([(p.prompt, p.solution, True) for p in train[: RECIPE["probe_prompts"]]], tokenizer)
    shipped = None if rebuild else shipped_weights()
    if shipped is not None:
        missing, unexpected = model.load_state_dict(shipped, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the tied lm_head is the embedding
            raise RuntimeError(f"{SHIPPED_WARM_START} does not fit the tiny model: missing {missing}, "
                               f"unexpected {unexpected}")
        model.tie_weights()
        ws = WarmStartResult(0, greedy_exact(model, probe, tokenizer.eos_token_id), 0.0)
        log(f"warm start: the shipped one ({SHIPPED_WARM_START.name}), greedy-exact {ws.greedy_exact:.3f}")
    else:
        teacher = random.Random(seed + 2)
        taught = [(p.prompt, *task.teacher_solution(p, teacher, RECIPE["ramble_chars"])) for p in train]
        ws = warm_start(model, encode(taught, tokenizer), probe, tokenizer.eos_token_id,
                        steps=RECIPE["sft_steps"], seed=seed, log=log)
        log(f"warm start: greedy-exact {ws.greedy_exact:.3f}")
    save_checkpoint(model, tokenizer, out / "model")

    # Measure what RL will start from, on held-out prompts (stats.py).
    measured = world_stats(model, tokenizer, train, task.held_out_problems(), max_tokens=RECIPE["max_tokens"],
                           l_detect=RECIPE["l_detect"], k=RECIPE["heldout_samples"],
                           head_prompts=RECIPE["head_prompts"], head_samples=RECIPE["head_samples"],
                           head_hidden=RECIPE["head_hidden"], seed=seed)
    stats = {
        "recipe": RECIPE,
        "params": sum(p.numel() for p in model.parameters()),
        "warm_start": "shipped" if shipped is not None else "trained here",
        "warm_start_steps": RECIPE["sft_steps"],
        # Right solutions greedy decoding reproduces (teacher forced): on the
        # hard half the teacher's likeliest approach is the wrong step.
        "warm_start_greedy_exact": ws.greedy_exact,
        **measured,
        "seconds": time.time() - t0,
    }
    stats_path.write_text(json.dumps(stats, indent=2))
    log(f"tiny world ready in {out}: held-out pass rate {stats['heldout_pass_rate']:.3f}, length p50 "
        f"{stats['len_p50']:.0f} p99 {stats['len_p99']:.0f}, truncated {stats['truncated_frac']:.2f}, wrong/correct "
        f"length {stats['wrong_over_correct_len']:.2f}, head AUC {stats['head_auc_heldout']:.2f} at "
        f"{stats['l_detect']} tokens ({stats['seconds']:.0f} s)")
    return stats
