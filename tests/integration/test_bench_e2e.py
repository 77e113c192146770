"""Parts of the end-to-end benchmark on the tiny world, without the engine:
held-out greedy accuracy (Hugging Face generate) and the TRL peer."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import msgspec
import pytest
import torch
from tests.conftest import ROOT


SMALL = ["generator.target_groups=2", "generator.max_tokens=64", "run.progress=false", "generator.chunk_tokens=16"]


@pytest.fixture(scope="module")
def small_cfg(tiny_world):
    from stream_rl.config import load_config

    d = tiny_world["dir"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      SMALL + [f"model.path={d / 'model'}", f"data.path={d / 'data' / 'train.jsonl'}"])
    # The overrides validate and take effect.
    assert (cfg.generator.target_groups, cfg.generator.max_tokens, cfg.generator.chunk_tokens) == (2, 64, 16)
    assert cfg.run.progress is False and cfg.generator.group_size == 8
    return cfg


def test_heldout_default_path_is_eval_beside_train(small_cfg, tiny_world):
    from stream_rl.eval.heldout import default_heldout_path

    assert default_heldout_path(small_cfg) == tiny_world["dir"] / "data" / "eval.jsonl"


def test_heldout_accuracy_on_a_slice(small_cfg, tiny_world):
    from benchmarks.heldout import heldout_accuracy

    res = heldout_accuracy(small_cfg.model.path, small_cfg, limit=16, batch_size=8)
    assert set(res) >= {"heldout_accuracy", "heldout_n", "heldout_path", "heldout_s"}
    assert res["heldout_n"] == 16
    assert 0.0 <= res["heldout_accuracy"] <= 1.0
    assert Path(res["heldout_path"]) == tiny_world["dir"] / "data" / "eval.jsonl"
    assert res["heldout_s"] > 0


def test_batched_greedy_equals_one_at_a_time(small_cfg):
    """Left padding with an attention mask changes no greedy token: the tiny
    held-out prompts all have one length, so prompts of other lengths join
    them to make the batch padded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.heldout import greedy_generate
    from stream_rl.data import render_prompt
    from stream_rl.eval.heldout import load_heldout

    tok = AutoTokenizer.from_pretrained(small_cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(small_cfg.model.path)
    rows, _ = load_heldout(small_cfg, tok, limit=2)
    prompts = [list(r.prompt_ids) for r in rows]
    prompts += [render_prompt(small_cfg.data, tok, text) for text in ("9a=", "123b=")]
    assert len({len(p) for p in prompts}) == 3  # the batch is padded
    batched = greedy_generate(model, tok, prompts, small_cfg.generator.max_tokens, batch_size=4)
    alone = [greedy_generate(model, tok, [p], small_cfg.generator.max_tokens, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert all(len(r) > 0 for r in batched)
    assert tok.eos_token_id not in {t for r in batched for t in r}  # cut at the first eos


def test_sampling_near_zero_temperature_gives_each_prompt_its_greedy_response(small_cfg):
    """sample_generate's n responses of a prompt are that prompt's (the
    sequences generate() returns are regrouped per prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.heldout import greedy_generate, sample_generate
    from stream_rl.eval.heldout import load_heldout

    tok = AutoTokenizer.from_pretrained(small_cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(small_cfg.model.path)
    rows, _ = load_heldout(small_cfg, tok, limit=5)
    prompts = [list(r.prompt_ids) for r in rows]
    greedy = greedy_generate(model, tok, prompts, small_cfg.generator.max_tokens)
    assert len(set(map(tuple, greedy))) > 1  # the prompts' answers differ
    cold = sample_generate(model, tok, prompts, small_cfg.generator.max_tokens, n=3, temperature=1e-4,
                           batch_size=6)
    assert cold == [[g] * 3 for g in greedy]
    hot = sample_generate(model, tok, prompts, small_cfg.generator.max_tokens, n=3, temperature=1.0, seed=1)
    assert [len(r) for r in hot] == [3] * 5 and hot != cold


def test_trl_missing_says_how_to_install(small_cfg, tmp_path, monkeypatch):
    from benchmarks import trl_peer

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'stream_rl\[trl\]'.*trl==1\.16\.0"):
        trl_peer.run_trl(small_cfg, tmp_path, 1)


def test_trl_args_match_the_config(small_cfg, tmp_path):
    pytest.importorskip("trl")
    from benchmarks.trl_peer import grpo_args

    a = grpo_args(small_cfg, tmp_path, 3)
    g, lc = small_cfg.generator, small_cfg.learner
    assert a.num_generations == g.group_size
    assert a.per_device_train_batch_size == g.target_groups * g.group_size == a.generation_batch_size
    assert a.steps_per_generation == 1 and a.num_iterations == 1 and a.max_steps == 3
    assert a.max_completion_length == g.max_tokens and a.temperature == g.temperature
    assert a.learning_rate == lc.lr and a.beta == 0.0 and a.loss_type == "grpo"
    assert a.max_grad_norm == lc.grad_clip and (a.adam_beta1, a.adam_beta2) == tuple(lc.betas)
    assert a.adam_epsilon == lc.adam_eps and a.weight_decay == lc.weight_decay
    assert a.mask_truncated_completions == lc.mask_truncated
    assert a.use_cpu and not a.bf16 and not a.fp16 and not a.use_vllm and a.report_to == []
    assert a.logging_steps == 1 and a.seed == small_cfg.run.seed


def test_trl_peer_two_steps(small_cfg, tmp_path):
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.trl_peer import run_trl

    cfg = msgspec.structs.replace(small_cfg, run=msgspec.structs.replace(small_cfg.run, snapshot_every=2))
    res = run_trl(cfg, tmp_path / "trl", 2, threshold_hint=2.0)
    lines = [json.loads(x) for x in (tmp_path / "trl" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len(lines) == 2 and lines == res["records"]
    assert [r["step"] for r in lines] == [1, 2]
    assert 0 < lines[0]["wall_s"] < lines[1]["wall_s"]
    for r in lines:
        assert math.isfinite(r["reward_policy_mean"]) and 0.0 <= r["reward_policy_mean"] <= 1.0
        assert r["tokens_trained"] > 0 and r["step_s"] > 0
        assert r["completions"] == 2 * 8
        assert r["tokens_trained"] <= r["completions"] * small_cfg.generator.max_tokens
    # The records agree with TRL's own logs.
    chk = res["trl_log_check"]
    assert chk["steps_checked"] == 2 and chk["reward_max_abs_diff"] < 1e-6 and chk["tokens_max_abs_diff"] < 1e-3
    assert res["steps"] == 2 and res["startup_s"] > 0 and res["wall_s"] >= lines[-1]["wall_s"]
    assert res["trl_version"] == "1.16.0"
    assert res["threshold_step"] is None  # a reward of 2 is never reached
    final = Path(res["final_model"])
    assert final == tmp_path / "trl" / "final_model"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size >= tok.vocab_size
    base = AutoModelForCausalLM.from_pretrained(small_cfg.model.path)
    # Two optimizer steps moved the weights.
    assert any((p - q).abs().max() > 0 for p, q in zip(model.parameters(), base.parameters()))
    # run.snapshot_every=2: the policy after step 2, as the project's learner saves it.
    snap = AutoModelForCausalLM.from_pretrained(tmp_path / "trl" / "snapshots" / "step_00002")
    assert all(torch.equal(p, q) for p, q in zip(snap.parameters(), model.parameters()))


# --- time to reward (pure) ---------------------------------------------------------


