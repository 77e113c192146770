"""The prepared tiny world: a standard checkpoint in the band RL needs."""

from __future__ import annotations

import json

import pytest


def test_warm_start_lands_in_the_rl_band(tiny_world):
    s = tiny_world["stats"]
    # Measured by sampling 8 answers per prompt at temperature 1.
    assert 0.20 <= s["pass_rate"] <= 0.70
    assert s["disagreeing_prompt_fraction"] >= 0.3  # groups with signal
    assert s["correct_len_p99_over_p50"] >= 4.0  # long tail of correct lengths
    by_level = [s["pass_rate_by_level"][k] for k in sorted(s["pass_rate_by_level"])]
    assert by_level[0] > by_level[-1]  # harder levels are harder


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

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-m", "stream_rl", "check-config", "--config",
                           str(ROOT / "configs" / "tiny.yaml"), *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert needle in proc.stderr


def test_shipped_gpu_config_validates_offline():
    from conftest import ROOT
    from stream_rl.config import load_config

    cfg = load_config(ROOT / "configs" / "qwen3-1.7b-dapo-math.yaml")
    assert cfg.generator.group_size == 16 and cfg.learner.lr == 1e-6
    assert cfg.pruner.mode == "arrol" and cfg.pruner.kappa == cfg.pruner.rho == 0.5 and cfg.pruner.l_detect == 512
    assert cfg.generator.max_tokens == 8192


def test_teacher_slip_is_wrong_from_the_first_number_and_follows_the_rule_after():
    from stream_rl.tiny import task

    right, slip = task.countdown(73, 3), task.teacher_slip(73, 3)
    assert right == "70 67 64 61 58 55 52 49 46 43 40 37 34 31 28 25 22 19 16 13 10 07 04 01 #### 1"
    assert slip == "73 " + right and slip.split()[0] != right.split()[0]
    p = task.make_dataset(1, seed=0)[0]
    assert p.solution == task.countdown(p.start, p.step) and p.prompt.startswith(f"{p.start:02d}")


def test_the_shipped_warm_start_is_this_recipes_and_is_used(tiny_world):
    from stream_rl.tiny.prepare import shipped_weights

    # RECIPE changed without a new shipped warm start: `prepare-tiny --rebuild`
    # then `stream_rl.tiny.prepare.ship_warm_start(OUT/model)`.
    assert shipped_weights() is not None
    assert tiny_world["stats"]["warm_start"] == "shipped"
