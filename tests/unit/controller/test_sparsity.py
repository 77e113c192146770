"""The sparsity schedule on a simulated engine whose mismatch tail grows as
the window narrows, answering a step late as a real job's does."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rl.config import SparsityConfig
from stream_rl.controller.sparsity import SparsitySchedule


def cfg(**kw):
    base = dict(mode="schedule", window=256, quantile="q05", target=-0.5, warmup_steps=3, gain=0.5,
                min_window=16, max_window=4096)
    return SparsityConfig(**{**base, **kw})


def run(schedule, tail_of, steps, delay=1):
    """Steps of a job: the tail measured at a step comes from the window
    `delay` steps earlier (the tokens trained were generated then)."""
    windows, tails = [schedule.window], []
    for _ in range(steps):
        w = windows[max(0, len(windows) - 1 - delay)]
        tails.append(tail_of(w))
        new = schedule.observe({"mismatch/q05": tails[-1], "mismatch/q01": 2 * tails[-1]})
        windows.append(schedule.window if new is None else new)
        assert new is None or new == schedule.window
    return windows, tails


def test_off_and_fixed_never_move():
    off, fixed = SparsitySchedule(cfg(mode="off")), SparsitySchedule(cfg(mode="fixed", window=64))
    assert off.window == 0 and fixed.window == 64
    for s in (off, fixed):
        assert all(s.observe({"mismatch/q05": -9.0}) is None for _ in range(10))
    assert off.window == 0 and fixed.window == 64


@settings(max_examples=30, deadline=None)
@given(st.floats(20.0, 400.0), st.floats(-1.5, -0.1), st.integers(0, 2))
def test_the_tail_is_held_at_its_target_after_warm_up(scale, target, delay):
    # Tail ∝ 1/window: dense (0) is the engine's own small mismatch.
    def tail_of(w):
        return -0.02 if w == 0 else -0.02 - scale / w

    window_for_target = scale / (-target - 0.02)
    if not 16 <= window_for_target <= 4096 or -target <= 0.03:
        return  # the target is outside what the windows can reach
    s = SparsitySchedule(cfg(target=target, gain=0.3))
    windows, tails = run(s, tail_of, 80, delay)
    assert windows[:3] == [0, 0, 0]  # dense through the warm-up
    late = tails[-20:]
    rel = sum(abs(t - target) / abs(target) for t in late) / len(late)
    assert rel < 0.10, (rel, windows[-5:], late[-5:])


def test_a_step_without_a_measured_tail_leaves_the_window():
    s = SparsitySchedule(cfg(warmup_steps=0))
    assert s.window == 256
    assert s.observe({}) is None and s.observe({"mismatch/q05": math.nan}) is None and s.window == 256


def test_bounds_the_narrowest_and_beyond_the_widest_is_dense():
    s = SparsitySchedule(cfg(warmup_steps=0))
    for _ in range(30):
        s.observe({"mismatch/q05": -0.001})  # far better than wanted: ever sparser
    assert s.window == 16
    for _ in range(60):
        s.observe({"mismatch/q05": -50.0})  # far worse: ever denser, then dense
    assert s.window == 0


def test_its_state_round_trips_and_goes_on_the_same():
    a = SparsitySchedule(cfg())
    run(a, lambda w: -100.0 / max(w, 1), 9)
    b = SparsitySchedule(cfg())
    b.load_state_dict(a.state_dict())
    for t in (-0.3, -0.9, -0.6):
        assert a.observe({"mismatch/q05": t}) == b.observe({"mismatch/q05": t})
        assert a.window == b.window


def test_the_config_refuses_a_window_outside_its_bounds():
    from stream_rl.config import ConfigError, load_config
    from tests.conftest import ROOT

    with pytest.raises(ConfigError, match="sparsity.window"):
        load_config(ROOT / "configs" / "tiny.yaml", ["sparsity.mode=fixed", "sparsity.window=8"])


@settings(max_examples=15, deadline=None)
@given(st.floats(-1e-3, -1e-4), st.floats(0.3, 1.2), st.integers(0, 2), st.integers(0, 2**31))
def test_a_noisy_tail_is_held_at_its_target_in_the_middle_of_its_scatter(target, sigma, delay, seed):
    """As on the real engine: the tail scatters log-normally around a level
    that falls with the window (∝ window^-1.7 here, about as measured on the
    tiny world between windows 16 and 64). The schedule holds the level
    where log(tail / target) averages zero, and its window scatters less
    than following each step's tail would make it."""
    import random

    rng = random.Random(seed)

    def tail_of(w):
        level = 3e-3 * (16 / (w or 4096)) ** 1.7
        return -level * math.exp(rng.gauss(0.0, sigma))

    w_star = 16 * (3e-3 / -target) ** (1 / 1.7)
    s = SparsitySchedule(cfg(target=target, window=256, warmup_steps=1, gain=0.2))
    windows, tails = run(s, tail_of, 400, delay)
    late = tails[100:]
    log_err = sum(math.log(t / target) for t in late) / len(late)
    assert abs(log_err) < 0.1, log_err  # the geometric mean of the tail within ~10% of the target
    logw = [math.log(w) for w in windows[100:]]
    mean_logw = sum(logw) / len(logw)
    assert abs(mean_logw - math.log(w_star)) < 0.15
    spread = (sum((x - mean_logw) ** 2 for x in logw) / len(logw)) ** 0.5
    assert spread < sigma / 1.7, spread  # following each step's tail: sigma / 1.7
