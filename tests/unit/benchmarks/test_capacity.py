"""The engine's capacity (`benchmarks/capacity.py`): the pure parts, and the raw
engine placed as the pipeline's, saturated in a child process."""

from __future__ import annotations


import pytest

from benchmarks.capacity import capacity_fraction, mean_response_tokens
from benchmarks.e2e import issue_targets, ratios


def test_capacity_fraction_is_generated_tokens_over_the_wall_over_capacity():
    records = [{"tokens_generated": 3000, "wall_s": 1.0}, {"tokens_generated": 5000, "wall_s": 2.0}]
    out = capacity_fraction(records, 8000.0)
    assert out == {"gen_tokens_per_s": 4000.0, "capacity_fraction": 0.5}
    assert capacity_fraction([], 8000.0)["gen_tokens_per_s"] == 0.0
    assert capacity_fraction(records, 0.0)["capacity_fraction"] is None


def test_mean_response_tokens_over_steps_with_a_default():
    assert mean_response_tokens([{"response_len_mean": 40.0}, {"response_len_mean": 61.0}], 320) == 50
    assert mean_response_tokens([{"tokens_generated": 9}], 320) == 320


def test_the_capacity_target_and_fractions_in_the_ratios():
    systems = {"stream": {"time_to_reward_s": 50.0, "engine_capacity_tokens_per_s": 10000.0, "capacity_fraction": 0.9},
               "sync": {"time_to_reward_s": 90.0, "engine_capacity_tokens_per_s": 12000.0, "capacity_fraction": 0.4,
                        "final_reward": 0.5},
               }
    systems["stream"]["final_reward"] = 0.5
    r = ratios(systems)
    assert r["engine_capacity_tokens_per_s"] == 11000.0
    assert (r["stream_capacity_fraction"], r["sync_capacity_fraction"]) == (0.9, 0.4)
    assert issue_targets(systems, r, "final_reward")["stream_capacity_fraction_at_least_0.85"] is True
    systems["stream"]["capacity_fraction"] = 0.8
    assert issue_targets(systems, ratios(systems), "final_reward")["stream_capacity_fraction_at_least_0.85"] is False
    assert "stream_capacity_fraction_at_least_0.85" not in issue_targets({}, ratios({}), "final_reward")


def test_profile_lists_self_time_per_generated_token():
    from benchmarks.profile import top_functions

    raw = ("process 1:\"python\";thread (0x1);main (a.py:1);step (a.py:9);decode (b.py:3) 30\n"
           "process 1:\"python\";thread (0x1);main (a.py:1);step (a.py:9) 10\n"
           "main (a.py:1);recv (z.py:2) 60\n")
    top = top_functions(raw, rate=100, tokens=1000)
    assert [t["function"] for t in top] == ["recv (z.py:2)", "decode (b.py:3)", "step (a.py:9)"]
    # 60 samples at 100 Hz = 0.6 s over 1000 tokens.
    assert top[0]["us_per_token"] == pytest.approx(600.0) and top[0]["share"] == pytest.approx(0.6)
    assert top_functions("", 100, 0) == []
