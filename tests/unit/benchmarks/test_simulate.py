"""`stream-rl simulate`: the real schedulers on the virtual clock, against
cost models with known answers."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.simulate.costs import CostModel
from benchmarks.simulate.run import sim_config, simulate
from benchmarks.simulate.workload import SimTokenizer, Workload, answer_texts
from stream_rl.config import load_config
from stream_rl.verifier import make_verifier
from tests.conftest import ROOT

# A step of 10 ms whatever the batch, a 1 s update, a 0.2 s weight load (all of it paused).
COST = CostModel(decode_a=0.01, decode_b=0.0, learner_fixed_s=1.0, learner_per_token_s=0.0, stage_s=0.0,
                 load_s=0.2, pause_s=0.2)


def _cfg(mode: str, *extra: str):
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      ["pruner.mode=none", "generator.group_size=4", "generator.target_groups=4",
                       "generator.max_tokens=320", *extra])
    return sim_config(cfg, mode)


def test_a_sync_step_is_its_longest_rollout_then_the_update_then_the_load():
    length = 50
    res = simulate(_cfg("sync"), COST, Workload(truncated=[0.0], fixed_length=length), steps=4, keep_records=True)
    for r in res["records"]:
        assert r["step_s"] == pytest.approx(length * 0.01 + 1.0 + 0.2, abs=1e-9)
        assert r["gen_s"] == pytest.approx(length * 0.01, abs=1e-9)
        assert r["tokens_generated"] == 16 * length  # every rollout, exactly its length
    assert res["wall_s"] == pytest.approx(4 * 1.7, abs=1e-9)
    assert res["staleness"]["0"] == 1.0


def test_stream_overlaps_the_update_with_generation_and_beats_sync():
    wl = dict(truncated=[0.0], fixed_length=50)
    sync = simulate(_cfg("sync"), COST, Workload(**wl), steps=6)
    stream = simulate(_cfg("stream"), COST, Workload(**wl), steps=6)
    # Sync: 0.5 + 1.0 + 0.2 a step; stream: the 1 s update bounds it, generation runs meanwhile.
    assert stream["step_s_mean"] < 0.75 * sync["step_s_mean"]
    assert stream["engine_bubble_fraction"] < sync["engine_bubble_fraction"]
    assert stream["learner_busy_fraction"] > 0.8


def test_the_virtual_clock_runs_minutes_of_jobs_in_seconds():
    res = simulate(_cfg("sync"), COST, Workload(truncated=[0.5], length_mean=[200.0]), steps=30)
    assert res["wall_s"] > 30 * 1.2  # at least the updates and loads
    assert res["simulator_real_s"] < 10.0


@pytest.mark.parametrize("reward", [0.0, 1.0])
def test_the_real_verifier_scores_what_the_engines_generate(reward):
    res = simulate(_cfg("sync"), COST, Workload(reward=[reward], truncated=[0.0], length_mean=[30.0]), steps=2)
    assert res["reward_mean"] == pytest.approx(reward, abs=1e-3)


def test_answer_texts_suit_each_verifier():
    for regex, match in ((None, "exact"), (None, "math"), (r"####\s*(-?\d+)\s*$", "math")):
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.answer_match={match}"])
        import msgspec

        data = msgspec.structs.replace(cfg.data, answer_regex=regex)
        v = make_verifier(data)
        right, wrong, ref = answer_texts(v)
        tok = SimTokenizer(right, wrong)
        assert v.score(tok.decode([3, 3, 1]), ref) == 1.0
        assert v.score(tok.decode([3, 3, 2]), ref) == 0.0
        assert v.score(tok.decode([3, 3, 3]), ref) == 0.0  # cut off: no answer


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_staleness=st.integers(0, 2), seed=st.integers(0, 1000))
def test_stream_never_trains_tokens_staler_than_the_bound(max_staleness, seed):
    cfg = _cfg("stream", f"buffer.max_staleness={max_staleness}", "buffer.stale_policy=restart",
               "generator.overprovision=2.0")
    # Long-tailed lengths and a fast learner: rollouts outlive several updates.
    cost = CostModel(decode_a=0.01, learner_fixed_s=0.1, learner_per_token_s=0.0, load_s=0.02, pause_s=0.01)
    res = simulate(cfg, cost, Workload(truncated=[0.2], length_mean=[60.0], length_cv=1.0, seed=seed), steps=8,
                   keep_records=True)
    assert res["version_lag_max"] <= max_staleness
    assert res["steps"] == 8


def test_the_fit_recovers_the_costs_a_run_was_made_with(tmp_path):
    """A simulated sync run written as `bench e2e --keep` would: fitting it
    gives back its decode and learner costs, and validating against it
    reproduces its numbers."""
    import json

    from benchmarks.simulate.costs import fit_from_run
    from benchmarks.simulate.studies import validate

    truth = CostModel(decode_a=0.004, decode_b=5e-5, learner_fixed_s=0.3, learner_per_token_s=2e-5,
                      load_s=0.05, pause_s=0.03)
    cfg = _cfg("sync")
    res = simulate(cfg, truth, Workload(truncated=[0.3], length_mean=[60.0], seed=3), steps=12, keep_records=True)
    (tmp_path / "sync").mkdir()
    (tmp_path / "sync" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in res["records"]))
    fit = fit_from_run(tmp_path, "sync", cfg.generator.max_tokens)
    assert fit.decode_a == pytest.approx(truth.decode_a, rel=0.02)
    assert fit.decode_b == pytest.approx(truth.decode_b, rel=0.05)
    assert fit.learner_fixed_s == pytest.approx(truth.learner_fixed_s, rel=0.02)
    assert fit.learner_per_token_s == pytest.approx(truth.learner_per_token_s, rel=0.02)
    out = validate(load_config(ROOT / "configs" / "tiny.yaml",
                               ["generator.group_size=4", "generator.target_groups=4", "generator.max_tokens=320"]),
                   str(tmp_path), systems=("sync",))
    assert out["max_rel_error"] < 0.1


def test_the_command_prints_each_mode_as_json(capsys, tmp_path):
    import json

    from stream_rl.cli import main

    out = tmp_path / "sim.json"
    assert main(["simulate", "--config", str(ROOT / "configs" / "tiny.yaml"), "--mode", "sync,april,stream",
                 "--steps", "2", "--set", "pruner.mode=none", "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert set(printed["modes"]) == {"sync", "april", "stream"}
    assert all(m["steps"] == 2 for m in printed["modes"].values())


def test_contention_slows_only_generation_that_overlaps_an_update():
    wl = dict(truncated=[0.0], fixed_length=50)
    slow = CostModel(**{**COST.to_dict(), "engine_slowdown_while_training": 1.0})
    # Sync never generates during an update: unchanged, to the microsecond.
    assert simulate(_cfg("sync"), slow, Workload(**wl), steps=3)["wall_s"] == \
        pytest.approx(simulate(_cfg("sync"), COST, Workload(**wl), steps=3)["wall_s"], abs=1e-6)
    # Stream generates while it trains: fewer tokens a second.
    fast = simulate(_cfg("stream"), COST, Workload(**wl), steps=6)
    slowed = simulate(_cfg("stream"), slow, Workload(**wl), steps=6)
    assert slowed["rollout_tokens_per_s"] < 0.8 * fast["rollout_tokens_per_s"]
