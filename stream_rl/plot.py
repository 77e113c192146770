"""PNG charts of a run's metrics.jsonl: reward, pruning, throughput, staleness and the
engine/learner mismatch."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training boxes; must precede the pyplot import
import matplotlib.pyplot as plt  # noqa: E402

from stream_rl.metrics import read_metrics  # noqa: E402

_LAG_KEYS = ("version_lag/0", "version_lag/1", "version_lag/2", "version_lag/3", "version_lag/4+")


def _series(records: list[dict], xkey: str, ykey: str) -> tuple[list[float], list[float]]:
    """(x, y) for records where both values are finite numbers; NaN arrives as NaN or null."""
    xs, ys = [], []
    for i, r in enumerate(records):
        # a record without "step" still has a position in the file, which is its step
        x = r.get(xkey, i + 1 if xkey == "step" else None)
        y = r.get(ykey)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(x) and math.isfinite(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def _moving_average(ys: list[float], window: int = 5) -> list[float]:
    # trailing window, shorter at the start, so the curve spans every point
    return [sum(ys[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(ys))]


def _save(fig, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)  # figures otherwise accumulate across runs in one process
    written.append(path)


def plot_run(run_dir: Path | str, out_dir: Path | str | None = None) -> list[Path]:
    """Write reward/pruning/throughput/staleness PNGs for run_dir; return the paths written."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    records = read_metrics(path)
    if not records:
        raise FileNotFoundError(f"{path} has no records")
    if not any("wall_s" in r for r in records):
        raise ValueError(f"no record in {path} has the field 'wall_s'")
    reward_key = next((k for k in ("reward_policy_mean", "reward_mean") if any(k in r for r in records)), None)
    if reward_key is None:
        raise ValueError(f"no record in {path} has the field 'reward_policy_mean' or 'reward_mean'")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs, ys = _series(records, "wall_s", reward_key)
    ax.plot(xs, ys, ".", alpha=0.4, label=reward_key)
    ax.plot(xs, _moving_average(ys), "-", label="moving average (5 steps)")
    ax.set(title="reward vs wall time", xlabel="wall time (s)", ylabel="reward")
    ax.legend()
    _save(fig, out / "reward.png", written)

    prune = [(k, label) for k, label in (("prune/keep_rate", "keep rate"), ("prune/rho_var_mean", "E[ρ̂(1−ρ̂)]"))
             if _series(records, "step", k)[0]]
    if prune:
        fig, axes = plt.subplots(len(prune), 1, figsize=(8, 3 * len(prune)), sharex=True, squeeze=False)
        for ax, (k, label) in zip(axes[:, 0], prune):
            ax.plot(*_series(records, "step", k), ".-")
            ax.set(ylabel=label, title=k)
        axes[-1, 0].set_xlabel("step")
        _save(fig, out / "pruning.png", written)

    tput = [k for k in ("gen_tokens_per_s", "trained_tokens_per_s") if _series(records, "wall_s", k)[0]]
    if tput:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for k in tput:
            ax.plot(*_series(records, "wall_s", k), ".-", label=k)
        ax.set(title="throughput vs wall time", xlabel="wall time (s)", ylabel="tokens/s")
        ax.legend()
        _save(fig, out / "throughput.png", written)

    lag_max = _series(records, "step", "version_lag_max")
    # the stacked fractions are only meaningful on steps that report all five buckets
    lag_rows = [(r.get("step", i + 1), r) for i, r in enumerate(records)
                if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in _LAG_KEYS)]
    if lag_max[0] or lag_rows:
        fig, axes = plt.subplots(2 if lag_max[0] and lag_rows else 1, 1, figsize=(8, 6), sharex=True,
                                 squeeze=False)
        axes = list(axes[:, 0])
        if lag_max[0]:
            ax = axes.pop(0)
            ax.plot(*lag_max, ".-")
            ax.set(title="staleness", ylabel="version_lag_max")
        if lag_rows:
            ax = axes.pop(0)
            ax.stackplot([s for s, _ in lag_rows], *[[r[k] for _, r in lag_rows] for k in _LAG_KEYS],
                         labels=_LAG_KEYS)
            ax.set(ylabel="fraction of samples", ylim=(0, 1))
            ax.legend(loc="upper left", fontsize="small")
        fig.axes[-1].set_xlabel("step")
        _save(fig, out / "staleness.png", written)

    # The engine/learner mismatch (learner/mismatch.py): its mean and lower tail.
    tail = [(k, label) for k, label in (("mismatch/mean", "mean"), ("mismatch/q05", "5% quantile"),
                                        ("mismatch/q01", "1% quantile")) if _series(records, "step", k)[0]]
    if tail:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for k, label in tail:
            ax.plot(*_series(records, "step", k), ".-", label=label)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set(title="log π_rollout − log π_learner per trained token", xlabel="step", ylabel="nats")
        ax.legend()
        _save(fig, out / "mismatch.png", written)
    return written
