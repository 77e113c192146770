"""The engine/learner mismatch monitor (ALGORITHMS.md §6).

Per trained token, m = log π_rollout(y) − log π_learner(y): the sampler's
log-prob of the token it sampled (the engine's, at the version that
sampled it) against the learner's dense policy before this update (π_old).
Stale versions, engine numerics, low precision and sparse attention all
show up in it; instability comes from its lower tail (tokens the sampler
found far less likely than the learner), so the monitor reports the mean
and the 1% and 5% quantiles, overall and by position in the response.

The quantiles come from a fixed histogram, so ranks add theirs up and the
result is the whole batch's: bins are even in asinh(m / SCALE), about 1%
apart in relative terms for |m| ≫ SCALE and SCALE apart near 0.
"""

from __future__ import annotations

import math

import torch

SCALE = 1e-4
BINS = 2048
SPAN = math.asinh(50.0 / SCALE)  # |m| beyond 50 nats goes to the edge bins
# Position buckets in the response: [0, 64), [64, 256), [256, 1024), [1024, ...).
POSITION_EDGES = (64, 256, 1024)
POSITION_NAMES = ("0-63", "64-255", "256-1023", "1024+")
QUANTILES = (("q01", 0.01), ("q05", 0.05))


def positions(lengths: list[int]) -> torch.Tensor:
    """Each response token's index in its response, for flat per-token values."""
    return torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)


def histogram_counts(m: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[1 + buckets, BINS + 2] float64 sums that add over ranks: row 0 every
    token, row 1 + b the tokens of position bucket b; the last two columns
    hold the count and the sum of m (for the mean)."""
    out = torch.zeros(1 + len(POSITION_NAMES), BINS + 2, dtype=torch.float64)
    if not m.numel():
        return out
    m = m.detach().double().cpu()
    bins = ((torch.asinh(m / SCALE) + SPAN) / (2 * SPAN) * BINS).long().clamp(0, BINS - 1)
    bucket = torch.bucketize(pos.cpu().contiguous(), torch.tensor(POSITION_EDGES), right=True)
    for row, sel in [(0, slice(None))] + [(1 + b, bucket == b) for b in range(len(POSITION_NAMES))]:
        part, vals = bins[sel], m[sel]
        out[row, :BINS] = torch.bincount(part, minlength=BINS).double()
        out[row, BINS], out[row, BINS + 1] = float(vals.numel()), float(vals.sum())
    return out


def _quantile(hist: torch.Tensor, q: float) -> float:
    """The q-quantile of the histogram's values, linear within its bin."""
    total = float(hist.sum())
    cum = torch.cumsum(hist, 0)
    i = int(torch.searchsorted(cum, torch.tensor(q * total, dtype=cum.dtype)))
    i = min(i, BINS - 1)
    before = float(cum[i - 1]) if i else 0.0
    frac = (q * total - before) / float(hist[i]) if hist[i] > 0 else 0.0
    u = (i + min(max(frac, 0.0), 1.0)) / BINS * (2 * SPAN) - SPAN
    return SCALE * math.sinh(u)


def mismatch_stats(counts: torch.Tensor) -> dict:
    """`mismatch/*` metrics from the (rank-summed) `histogram_counts`; none
    when no token had a rollout log-prob."""
    stats = {}
    for row, name in [(0, "")] + [(1 + b, f"_pos{p}") for b, p in enumerate(POSITION_NAMES)]:
        n = float(counts[row, BINS])
        if n == 0:
            continue
        if not name:
            stats["mismatch/tokens"] = int(n)
            stats["mismatch/mean"] = float(counts[row, BINS + 1]) / n
        for key, q in QUANTILES:
            stats[f"mismatch/{key}{name}"] = _quantile(counts[row, :BINS], q)
    return stats
