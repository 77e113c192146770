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

ROOT = Path(__file__).resolve().parents[1]

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
    from stream_rl.bench.heldout import default_heldout_path

    assert default_heldout_path(small_cfg) == tiny_world["dir"] / "data" / "eval.jsonl"


def test_heldout_accuracy_on_a_slice(small_cfg, tiny_world):
    from stream_rl.bench.heldout import heldout_accuracy

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

    from stream_rl.bench.heldout import greedy_generate, load_heldout
    from stream_rl.data import render_prompt

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

    from stream_rl.bench.heldout import greedy_generate, load_heldout, sample_generate

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
    from stream_rl.bench import trl_peer

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'stream_rl\[trl\]'.*trl==1\.16\.0"):
        trl_peer.run_trl(small_cfg, tmp_path, 1)


def test_trl_args_match_the_config(small_cfg, tmp_path):
    pytest.importorskip("trl")
    from stream_rl.bench.trl_peer import grpo_args

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

    from stream_rl.bench.trl_peer import run_trl

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

def test_threshold_is_reached_by_every_system_and_ignores_the_noisy_start():
    from stream_rl.bench.e2e import moving_average, reward_threshold, time_to

    assert moving_average([1.0, 0.0, 0.5], 2) == [1.0, 0.5, 0.25]
    fast = moving_average([0.5, 0.5, 0.6, 0.7, 0.8, 0.8], 2)
    slow = moving_average([0.9, 0.3, 0.5, 0.55, 0.6, 0.7], 2)  # a lucky first step, then a slow rise
    walls = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    thr, start, lowest_best = reward_threshold({"fast": fast, "slow": slow}, 0.9, 2)
    # Start: each curve at its first full window (0.5 and 0.6), averaged; the
    # slow system's lucky first step (0.9) counts neither as its best nor as reached.
    assert start == pytest.approx(0.55) and lowest_best == pytest.approx(0.65)
    assert thr == pytest.approx(0.64)
    assert time_to(fast, walls, thr, 2) == 4.0 and time_to(slow, walls, thr, 2) == 6.0
    # A system that never rises: the threshold is its best, still reached.
    flat = moving_average([0.4, 0.4, 0.4, 0.4], 2)
    thr, start, best = reward_threshold({"fast": fast, "flat": flat}, 0.9, 2)
    assert start == pytest.approx(0.45) and thr == best == pytest.approx(0.4)
    assert time_to(flat, walls[:4], thr, 2) == 2.0


def test_issue_targets_compare_the_final_reward_on_the_clock_s_measure():
    from stream_rl.bench.e2e import issue_targets

    systems = {"sync": {"final_reward": 0.60, "final_heldout_reward": 0.45},
               "stream": {"final_reward": 0.40, "final_heldout_reward": 0.44}}
    held = issue_targets(systems, {"stream_vs_sync": 2.1, "stream_vs_trl": 1.3}, "final_heldout_reward")
    assert held == {"stream_vs_sync_at_least_2": True, "stream_final_reward_within_0.02_of_sync": True,
                    "stream_vs_trl_at_least_3": False}
    assert not issue_targets(systems, {"stream_vs_sync": 1.9}, "final_reward")[
        "stream_final_reward_within_0.02_of_sync"]
    assert issue_targets({"stream": systems["stream"]}, {"stream_vs_trl": 3.5}, "final_reward") == \
        {"stream_vs_trl_at_least_3": True}


def test_nopruning_ratios_are_time_to_reward_and_tokens_per_trained_sample():
    from stream_rl.bench.e2e import issue_targets, ratios

    systems = {"stream": {"time_to_reward_s": 40.0, "generated_tokens_per_trained_sample": 50.0},
               "stream_nopruning": {"time_to_reward_s": 60.0, "generated_tokens_per_trained_sample": 100.0}}
    r = ratios(systems)
    assert r["stream_vs_nopruning"] == pytest.approx(1.5) and r["stream_vs_sync"] is None
    assert r["tokens_per_trained_sample_vs_nopruning"] == pytest.approx(0.5)
    assert issue_targets(systems, r, "final_reward") == {"stream_vs_nopruning_at_least_1.3": True,
                                                         "tokens_per_trained_sample_at_most_0.6x_nopruning": True}
    systems["stream"]["time_to_reward_s"] = 50.0
    systems["stream"]["generated_tokens_per_trained_sample"] = 61.0
    assert not any(issue_targets(systems, ratios(systems), "final_reward").values())


def _run(seed, held, svs, **finals):
    """A bench_e2e result with only what pool_seeds reads: held-out curves
    {system: (rewards, walls)}, the run's own ratio, final rewards."""
    return {"measure": "heldout_sampled_reward", "final_reward_measure": "final_heldout_reward",
            "threshold": {"fraction": 0.9, "window": 1, "reward": 0.0}, "setup": {"seed": seed},
            "stream_vs_sync": svs, "stream_vs_trl": None,
            "systems": {s: {"wall_s": w[-1], "time_to_reward_s": w[-1], "final_heldout_reward": finals[s]}
                        for s, (_, w) in held.items()},
            "heldout_curves": {s: {"reward": r, "wall_s": w} for s, (r, w) in held.items()}}


def test_pool_seeds_thresholds_the_mean_curves():
    from stream_rl.bench.e2e import pool_seeds

    a = _run(0, {"sync": ([0.3, 0.4, 0.5], [0.0, 10.0, 20.0]), "stream": ([0.3, 0.45, 0.5], [0.0, 4.0, 8.0])},
             2.5, sync=0.5, stream=0.5)
    b = _run(1, {"sync": ([0.4, 0.45, 0.6], [0.0, 12.0, 24.0]), "stream": ([0.4, 0.5, 0.55], [0.0, 5.0, 10.0])},
             2.4, sync=0.6, stream=0.55)
    out = pool_seeds([a, b])
    # Mean curves: sync 0.35, 0.425, 0.55 at 0, 11, 22 s; stream 0.35, 0.475, 0.525 at 0, 4.5, 9 s.
    assert out["mean_curves"]["stream"] == {"reward": [0.35, 0.475, 0.525], "wall_s": [0.0, 4.5, 9.0]}
    thr = out["threshold"]
    assert thr["common_start"] == pytest.approx(0.35) and thr["lowest_best"] == pytest.approx(0.525)
    assert thr["reward"] == pytest.approx(0.35 + 0.9 * 0.175)
    assert out["systems"]["sync"]["time_to_reward_s"] == 22.0 and out["systems"]["stream"]["time_to_reward_s"] == 9.0
    assert out["stream_vs_sync"] == pytest.approx(22.0 / 9.0) and out["stream_vs_trl"] is None
    # Means and ranges over seeds; each seed's own ratio kept.
    assert out["systems"]["stream"]["final_heldout_reward"] == pytest.approx(0.525)
    assert out["systems"]["sync"]["wall_s_min"] == 20.0 and out["systems"]["sync"]["wall_s_max"] == 24.0
    # A seed's time to reward is against its own threshold: no range of those beside the mean curve's.
    assert "time_to_reward_s_min" not in out["systems"]["sync"]
    assert [p["stream_vs_sync"] for p in out["per_seed"]] == [2.5, 2.4] and out["seeds"] == [0, 1]
    assert out["targets"] == {"stream_vs_sync_at_least_2": True, "stream_final_reward_within_0.02_of_sync": False}
    assert out["runs"] == [a, b]


def test_pool_seeds_refuses_runs_on_different_measures():
    from stream_rl.bench.common import BenchSetupError
    from stream_rl.bench.e2e import pool_seeds

    a = _run(0, {"sync": ([0.3, 0.4], [0.0, 1.0]), "stream": ([0.3, 0.4], [0.0, 1.0])}, 1.0, sync=0.4, stream=0.4)
    b = dict(a, measure="training_reward_moving_average")
    with pytest.raises(BenchSetupError, match="measure"):
        pool_seeds([a, b])
    with pytest.raises(BenchSetupError):
        pool_seeds([])


def test_cli_bench_e2e_refuses_what_cannot_give_a_result():
    from stream_rl.cli import main

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    assert main(["bench", "e2e", "--config", tiny, "--steps", "3"]) == 2  # below the moving-average window
    assert main(["bench", "e2e", "--config", tiny, "--systems", "sync,vllm"]) == 2
    assert main(["bench", "e2e", "--config", tiny, "--set", "mode=sync", "--set", "pruner.mode=none"]) == 2
    assert main(["bench", "e2e", "--config", tiny, "--seeds", "0,x"]) == 2
    assert main(["bench", "e2e", "--config", tiny, "--seeds", "1,1"]) == 2
    assert main(["bench", "e2e", "--config", tiny, "--seeds", ","]) == 2
