"""`bench sparsity`'s long-context half against the real engine: the same
prompts and seeds at each window, the tail scored against the dense model."""

from __future__ import annotations

import pytest

from benchmarks.capacity import CapacityProbe
from benchmarks.sparsity_stress import speedup_at, stress

pytestmark = pytest.mark.engine


def test_each_window_is_timed_against_dense_and_its_tail_measured(engine_cfg):
    requests, tokens = 16, 96
    with CapacityProbe(engine_cfg) as probe:
        st = stress(probe, engine_cfg, [16, 1], requests, tokens, rounds=1, keep=requests)
    w = st["windows"]
    assert list(w) == ["0", "16", "1"] and speedup_at(st, 0) == 1.0
    for entry in w.values():
        assert entry["mismatch/tokens"] == requests * tokens  # every token of every kept rollout scored
        assert len(entry["tokens_per_s"]) == 1 and entry["tokens_per_s"][0] > 0
    # Dense: the engine's log-probs are the dense model's, up to fp32 numerics.
    assert abs(w["0"]["mismatch/q01"]) < 1e-4 and abs(w["0"]["mismatch/mean"]) < 1e-4
    # A window moves the tail, and a narrower one moves it further.
    assert w["16"]["mismatch/q01"] < -1e-3
    assert w["1"]["mismatch/q01"] < w["16"]["mismatch/q01"]
    assert st["attention_share"] == pytest.approx(1 - 1 / w["1"]["speedup_vs_dense"], abs=1e-3)
