"""Parts of the end-to-end benchmark on the tiny world, without the engine:
held-out greedy accuracy (Hugging Face generate) and the TRL peer."""

from __future__ import annotations


import pytest
from tests.conftest import ROOT


# --- time to reward (pure) ---------------------------------------------------------

def test_threshold_is_reached_by_every_system_and_ignores_the_noisy_start():
    from benchmarks.e2e import moving_average, reward_threshold, time_to

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
    from benchmarks.e2e import issue_targets

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
    from benchmarks.e2e import issue_targets, ratios

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
    from benchmarks.e2e import pool_seeds

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
    from benchmarks.common import BenchSetupError
    from benchmarks.e2e import pool_seeds

    a = _run(0, {"sync": ([0.3, 0.4], [0.0, 1.0]), "stream": ([0.3, 0.4], [0.0, 1.0])}, 1.0, sync=0.4, stream=0.4)
    b = dict(a, measure="training_reward_moving_average")
    with pytest.raises(BenchSetupError, match="measure"):
        pool_seeds([a, b])
    with pytest.raises(BenchSetupError):
        pool_seeds([])


def test_cli_bench_e2e_refuses_what_cannot_give_a_result():
    from stream_rl.cli import main

    tiny = str(ROOT / "configs" / "tiny.yaml")
    assert main(["bench", "e2e", "--config", tiny, "--steps", "3"]) == 2  # below the moving-average window
    assert main(["bench", "e2e", "--config", tiny, "--systems", "sync,vllm"]) == 2
    assert main(["bench", "e2e", "--config", tiny, "--set", "mode=sync", "--set", "pruner.mode=none"]) == 2
    assert main(["bench", "e2e", "--config", tiny, "--seeds", "0,x"]) == 2
    assert main(["bench", "e2e", "--config", tiny, "--seeds", "1,1"]) == 2
    assert main(["bench", "e2e", "--config", tiny, "--seeds", ","]) == 2
