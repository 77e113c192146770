"""The prepared tiny world: a standard checkpoint in the band RL needs."""

from __future__ import annotations

import json

import pytest


def test_world_is_in_the_regime_the_papers_target(tiny_world):
    """Issue 23's properties, measured on held-out prompts by prepare-tiny."""
    s = tiny_world["stats"]
    assert s["len_p99_over_p50"] >= 6  # a long tail stalls synchronous batches
    assert s["truncated_frac"] >= 0.05  # some rollouts ramble to the budget
    assert s["wrong_over_correct_len"] >= 2  # wrong answers run long
    assert s["l_detect"] <= s["max_tokens"] / 8 and s["head_auc_heldout"] >= 0.75  # fate shows early
    assert 0.2 <= s["heldout_pass_rate"] <= 0.5  # room to learn
    assert s["maj_minus_pass1"] >= 0.1 and s["passk_minus_maj"] >= 0.1  # room for voting
    assert s["pass_rate_hard_steps"] < s["pass_rate_easy_steps"]  # the teacher errs more on hard steps


def test_checkpoint_loads_like_a_hub_model(tiny_world):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_world["dir"] / "model"
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.config.model_type == "qwen3" and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    ids = tok("57c=", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.startswith("54 51")  # greedy decoding follows the task's rule


def test_held_out_prompts_are_disjoint_from_training(tiny_world):
    d = tiny_world["dir"] / "data"
    train = {json.loads(l)["prompt"] for l in (d / "train.jsonl").read_text().splitlines()}
    held = [json.loads(l)["prompt"] for l in (d / "eval.jsonl").read_text().splitlines()]
    assert held and not (set(held) & train)


@pytest.mark.parametrize("args,needle", [
    (["--set", "learner.loss=foo"], "allowed values: 'grpo', 'dapo', 'gspo'"),
    (["--set", "generator.group_sizes=4"], "unknown config field 'generator.group_sizes'"),
    (["--set", "learner.lr=-1"], "invalid config field 'learner.lr'"),
])
def test_cli_rejects_bad_config_with_the_field_named(args, needle):
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "stream_rl", "check-config", "--config",
                           str(ROOT / "configs" / "tiny.yaml"), *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert needle in proc.stderr


def test_shipped_gpu_config_validates_offline():
    from tests.conftest import ROOT
    from stream_rl.config import load_config

    cfg = load_config(ROOT / "configs" / "qwen3-1.7b-dapo-math.yaml")
    assert cfg.generator.group_size == 16 and cfg.learner.lr == 1e-6
    assert cfg.pruner.mode == "arrol" and cfg.pruner.kappa == cfg.pruner.rho == 0.5 and cfg.pruner.l_detect == 512
    assert cfg.generator.max_tokens == 8192


def test_teacher_errs_at_the_first_number_and_count_ups_never_end():
    import random

    from stream_rl.tiny import task

    right = task.countdown(73, 3)
    assert right == "70 67 64 61 58 55 52 49 46 43 40 37 34 31 28 25 22 19 16 13 10 07 04 01 #### 1"
    assert task.countdown(73, task.wrong_step(3)).startswith("69 65 ")  # short, wrong, the same every time
    up = task.count_up(73, 3, 360)
    assert up.startswith("73 76 79 ") and len(up) == 360 and "####" not in up
    p = task.make_dataset(1, seed=0)[0]
    assert p.solution == task.countdown(p.start, p.step) and p.prompt.startswith(f"{p.start:02d}")
    rng = random.Random(0)
    draws = [task.teacher_solution(p, rng, 360) for _ in range(2000)]
    rates = task.APPROACH_RATES["hard" if p.step >= task.HARD_STEP else "easy"]
    assert abs(sum(t == p.solution for t, _ in draws) / 2000 - rates[0]) < 0.04
    assert all(ends == ("####" in t) for t, ends in draws)


def test_the_shipped_warm_start_is_this_recipes_and_is_used(tiny_world):
    from stream_rl.tiny.prepare import shipped_weights

    # RECIPE changed without a new shipped warm start: `prepare-tiny --rebuild`
    # then `stream_rl.tiny.prepare.ship_warm_start(OUT/model)`.
    assert shipped_weights() is not None
    assert tiny_world["stats"]["warm_start"] == "shipped"
