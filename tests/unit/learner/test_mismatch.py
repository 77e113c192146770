"""The mismatch monitor's histogram quantiles: against exact quantiles, by
position, and added over ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rl.learner.mismatch import histogram_counts, mismatch_stats, positions


def test_positions_count_within_each_response():
    assert positions([3, 1, 2]).tolist() == [0, 1, 2, 0, 0, 1]
    assert positions([]).numel() == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1e-3, 0.05, 1.0, 8.0]), st.integers(200, 5000))
def test_histogram_quantiles_match_the_exact_ones(seed, scale, n):
    g = torch.Generator().manual_seed(seed)
    # Mostly near 0 with a heavy lower tail, as engine/learner log-ratios are.
    tail = scale * torch.log(torch.rand(n, generator=g))  # exponential, negated
    m = tail * (torch.rand(n, generator=g) < 0.2) + 1e-5 * torch.randn(n, generator=g)
    stats = mismatch_stats(histogram_counts(m, torch.zeros(n, dtype=torch.long)))
    assert stats["mismatch/tokens"] == n and stats["mismatch/mean"] == pytest.approx(float(m.double().mean()))
    for key, q in (("q01", 0.01), ("q05", 0.05)):
        exact = np.quantile(m.double().numpy(), q)
        lo, hi = np.quantile(m.double().numpy(), [max(q - 1 / n, 0), min(q + 1 / n, 1)])
        # Within a bin (≈1.4% relative, or 1e-4 absolute near 0) of the order statistics around q.
        assert lo - 0.02 * abs(lo) - 2e-4 <= stats[f"mismatch/{key}"] <= hi + 0.02 * abs(hi) + 2e-4, (exact, stats)


def test_position_buckets_and_ranks_add_up():
    m = torch.cat([torch.full((64,), -0.5), torch.full((192,), -0.05), torch.full((100,), -2.0)])
    pos = torch.cat([torch.arange(64), torch.arange(64, 256), torch.arange(1024, 1124)])
    whole = histogram_counts(m, pos)
    halves = histogram_counts(m[::2], pos[::2]) + histogram_counts(m[1::2], pos[1::2])
    assert torch.equal(whole, halves)  # what the learner's all-reduce sums
    s = mismatch_stats(whole)
    assert s["mismatch/q01_pos0-63"] == pytest.approx(-0.5, rel=0.02)
    assert s["mismatch/q05_pos64-255"] == pytest.approx(-0.05, rel=0.02)
    assert s["mismatch/q01_pos1024+"] == pytest.approx(-2.0, rel=0.02)
    assert "mismatch/q01_pos256-1023" not in s  # no token there
    assert s["mismatch/q01"] == pytest.approx(-2.0, rel=0.02)


def test_no_rollout_logprobs_no_metrics():
    assert mismatch_stats(histogram_counts(torch.zeros(0), torch.zeros(0, dtype=torch.long))) == {}
