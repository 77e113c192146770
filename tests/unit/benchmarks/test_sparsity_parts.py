"""`bench sparsity`'s pure parts: tracking error, mean window, pooling over
seeds, the systems' configs, and its argument checks (before any engine)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.common import BenchSetupError
from benchmarks.sparsity import bench_sparsity, mean_window, pooled, system_config, tail_noise, tracking
from benchmarks.sparsity_stress import speedup_at
from stream_rl.config import load_config
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(ROOT / "configs" / "tiny.yaml")


def _records(tails, windows):
    return [{"mismatch/q05": t, "sparsity/window": w} for t, w in zip(tails, windows)]


def test_tracking_is_the_mean_relative_error_after_the_skipped_steps():
    recs = _records([-5.0, -5.0, -1.05, -0.95, -1.0, -1.3], [0] * 6)
    out = tracking(recs, "q05", -1.0, skip=2)
    assert out["tracked_steps"] == 4
    assert out["tail_tracking_rel_error"] == pytest.approx((0.05 + 0.05 + 0.0 + 0.3) / 4)
    assert out["tail_within_10pct"] == pytest.approx(3 / 4)
    assert out["tail_mean"] == pytest.approx(-1.075)
    assert out["tail_median_rel_error"] == pytest.approx(0.025)
    assert out["tail_geomean_rel_error"] == pytest.approx(abs((1.05 * 0.95 * 1.0 * 1.3) ** 0.25 - 1))


def test_tracking_skips_steps_without_a_tail_and_reports_none_without_any():
    recs = [{"sparsity/window": 0}, {"mismatch/q05": -2.0, "sparsity/window": 0}]
    assert tracking(recs, "q05", -1.0, 0)["tracked_steps"] == 1
    assert tracking(recs[:1], "q05", -1.0, 0)["tail_tracking_rel_error"] is None


@given(st.lists(st.integers(1, 4096), min_size=1, max_size=30), st.integers(1, 8192))
def test_mean_window_is_geometric_and_counts_dense_as_the_context(windows, dense_as):
    recs = _records([0.0] * len(windows), windows)
    m = mean_window(recs, 0, dense_as)
    assert min(windows) - 1e-9 <= m <= max(windows) + 1e-9
    assert m == pytest.approx(math.exp(sum(math.log(w) for w in windows) / len(windows)))
    assert mean_window(_records([0.0, 0.0], [0, 16]), 0, 64) == pytest.approx(32.0)


def test_pooled_means_over_seeds_and_keeps_each_run():
    def run(r, err=None):
        d = {"final_heldout_reward": r, "final_reward": r, "gen_tokens_per_s": 10 * r, "wall_s": 1.0}
        return d | ({"tail_tracking_rel_error": err} if err is not None else {})

    out = pooled([{"dense": run(0.4), "schedule": run(0.5, 0.1)}, {"dense": run(0.6), "schedule": run(0.7, 0.3)}])
    assert out["dense"]["final_heldout_reward"] == pytest.approx(0.5)
    assert out["schedule"]["tail_tracking_rel_error"] == pytest.approx(0.2)
    assert "tail_tracking_rel_error" not in out["dense"] and len(out["schedule"]["runs"]) == 2


def test_each_system_differs_only_in_its_sparsity(tiny_cfg):
    cfgs = {s: system_config(tiny_cfg, s, 16, -0.01, 3) for s in ("dense", "fixed", "schedule")}
    assert cfgs["dense"].sparsity.mode == "off"
    assert (cfgs["fixed"].sparsity.mode, cfgs["fixed"].sparsity.window) == ("fixed", 16)
    assert (cfgs["schedule"].sparsity.mode, cfgs["schedule"].sparsity.target) == ("schedule", -0.01)
    assert cfgs["schedule"].sparsity.window == tiny_cfg.sparsity.window
    for c in cfgs.values():
        assert c.run.seed == 3 and c.model == tiny_cfg.model and c.learner.loss == tiny_cfg.learner.loss
        assert c.pruner == tiny_cfg.pruner and c.mode == tiny_cfg.mode


def test_speedup_at_reads_the_measured_window_and_dense_is_one():
    res = {"windows": {"0": {"speedup_vs_dense": 1.0}, "64": {"speedup_vs_dense": 1.2}}}
    assert speedup_at(res, 64) == 1.2 and speedup_at(res, 0) == 1.0 and speedup_at(res, 32) is None


@pytest.mark.parametrize("kw, says", [
    (dict(windows=[-1]), "--windows"),
    (dict(target=0.1), "--tail-target"),
    (dict(steps=5), "--steps"),
    (dict(requests=0), "--requests"),
    (dict(rounds=0), "--rounds"),
    (dict(fixed_window=8), "--fixed-window"),
    (dict(seeds=[]), "--seeds"),
])
def test_bad_arguments_are_refused_before_any_engine_starts(tiny_cfg, kw, says):
    args = dict(steps=40, windows=[64, 16], fixed_window=None, target=None, seeds=[0], eval_samples=1, settle=5,
                requests=8, tokens=32, rounds=1) | kw
    with pytest.raises(BenchSetupError, match=says):
        bench_sparsity(tiny_cfg, **args)


def test_it_needs_the_engines_logprobs(tiny_cfg):
    import msgspec

    cfg = msgspec.structs.replace(tiny_cfg, generator=msgspec.structs.replace(tiny_cfg.generator,
                                                                              return_logprobs=False))
    with pytest.raises(BenchSetupError, match="return_logprobs"):
        bench_sparsity(cfg, 40, [16], None, None, [0], 1, 5, 8, 32, 1)


def test_tail_noise_is_the_spread_around_the_runs_median():
    recs = _records([-9.0, -1.0, -2.0, -3.0], [16] * 4)
    assert tail_noise(recs, "q05", skip=1) == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert tail_noise(_records([0.0, 0.0], [16, 16]), "q05", 0) is None
    assert tracking(recs, "q05", -2.0, 1)["tail_mean_rel_error"] == pytest.approx(0.0)
