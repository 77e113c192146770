"""The engine's step trace (`generator/step_trace.py`): what `bench profile` reads."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from benchmarks.profile import engine_steps
from stream_rl.generator.step_trace import read_trace, summarize


def _write(path, steps, events=()):
    lines = [f"S {t:.6f} {dt:.6f} {tok} {rows}\n" for t, dt, tok, rows in steps]
    lines += [f"{k} {t:.6f} {dt:.6f}\n" for k, t, dt in events]
    path.write_text("".join(lines))


@settings(max_examples=40, deadline=None)
@given(fixed=st.floats(1e-4, 1e-2), per_token=st.floats(1e-6, 1e-4),
       tokens=st.lists(st.integers(1, 4000), min_size=3, max_size=50, unique=True))
def test_the_fit_prices_a_step_as_fixed_plus_per_token(tmp_path_factory, fixed, per_token, tokens):
    assume(max(tokens) - min(tokens) >= 100)  # the file keeps microseconds
    d = tmp_path_factory.mktemp("trace")
    steps = [(10.0 + i, fixed + per_token * n, n, 1) for i, n in enumerate(tokens)]
    _write(d / "steps-1.txt", steps)
    s = summarize(d, 0.0, 1e9)
    assert s["steps"] == len(tokens) and s["prefill_tokens"] == sum(tokens) - len(tokens)
    assert s["step_fixed_s"] == pytest.approx(fixed, abs=2e-6)
    assert s["step_per_token_s"] == pytest.approx(per_token, rel=1e-2)


def test_the_window_keeps_what_started_in_it_from_every_worker(tmp_path):
    _write(tmp_path / "steps-1.txt", [(1.0, 0.002, 64, 64), (2.0, 0.004, 200, 50), (9.0, 0.5, 10, 10)],
           [("W", 2.5, 0.03), ("R", 2.2, 0.2), ("W", 9.5, 1.0)])
    _write(tmp_path / "steps-2.txt", [(3.0, 0.002, 60, 60)])
    (tmp_path / "unrelated.txt").write_text("S 2.0 9 9 9\n")
    steps, events = read_trace(tmp_path)
    assert [s[0] for s in steps] == [1.0, 2.0, 3.0, 9.0] and [e[1] for e in events] == [2.2, 2.5, 9.5]
    s = summarize(tmp_path, 1.5, 5.0)
    assert (s["steps"], s["rows"], s["prefill_tokens"]) == (2, 110, 150)
    assert s["forward_s"] == pytest.approx(0.006) and s["mean_rows_per_step"] == 55
    assert (s["weight_loads"], s["weight_load_s"], s["weight_transfer_s"]) == (1, pytest.approx(0.03),
                                                                               pytest.approx(0.2))
    assert s["forward_share"] == pytest.approx(0.006 / 3.5)


def test_each_part_of_the_engine_time_is_priced_per_1k_generated_tokens(tmp_path):
    _write(tmp_path / "steps-1.txt", [(1.0, 0.002, 10, 10), (2.0, 0.012, 110, 10)], [("W", 3.0, 0.1)])
    out = engine_steps(summarize(tmp_path, 0.0, 4.0), generated=2000)
    ms = out["ms_per_1k_generated"]
    assert ms["wall"] == pytest.approx(2000) and ms["forward"] == pytest.approx(7.0)
    assert ms["weight_load"] == pytest.approx(50) and ms["rest"] == pytest.approx(2000 - 7 - 50)
    # 0.0001 s a token, 0.001 s a step: 2 steps' fixed part, 100 prefill tokens
    assert ms["forward_fixed"] == pytest.approx(1.0) and ms["prefill"] == pytest.approx(5.0)
    assert engine_steps(summarize(tmp_path, 0.0, 4.0), generated=0).get("ms_per_1k_generated") is None
