"""`stream-rl bench sparsity`: sparse rollouts (ALGORITHMS.md §6; docs/sparse-rollouts.md).

Training: three systems train the same model on the same prompts, seed and
steps, one after the other, and differ only in the engines' attention
window (`sparsity`):

- `dense`: `sparsity.mode: off`;
- `fixed`: `sparsity.mode: fixed` at `fixed_window` (high sparsity);
- `schedule`: `sparsity.mode: schedule`, holding the monitor's
  `sparsity.quantile` at `tail_target`.

Per system: the tail per step (`tail`), the windows, the generated tokens/s,
and `final_heldout_reward` (the final policy's mean reward on the held-out
prompts, `eval_samples` sampled responses each, as `bench e2e` scores it).
For the schedule, `tail_tracking_rel_error` = mean |tail − target| / |target|
over the steps after its dense warm-up and `settle_steps` more (the window
starts where the config says and needs a few steps to find the level;
`tail_tracking_rel_error_all` counts those too); the level it held,
`tail_geomean_rel_error` = |exp(mean log(tail / target)) − 1| (what the
schedule steers to zero) and `tail_median_rel_error`; `tail_noise` per
system, mean |tail − median| / |median|, which at a constant window is the
floor under any schedule's per-step error; and `mean_window`, the
geometric mean of its windows over the same steps (it steers log(window);
dense counts as the context length).

Long context (`benchmarks/sparsity_stress.py`): one engine, placed as the
pipeline's, generates `requests` × `tokens` tokens with `ignore_eos` at each
fixed window, the schedule's mean window and window 1, in interleaved
rounds: speed-up against dense in the same round, the tail of the same
tokens against the dense model, and `attention_share`.
`speedup_at_mean_sparsity` is the measured speed-up at the schedule's mean
window on that workload.

With `--seeds` the training runs once per seed (systems interleaved within
each) and `final_heldout_reward` is the mean over seeds, each seed's kept.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from benchmarks.common import BenchSetupError, emit, with_free_ports
from stream_rl.config import Config
from stream_rl.metrics import read_metrics

SYSTEMS = ("dense", "fixed", "schedule")


def system_config(cfg: Config, system: str, fixed_window: int, target: float, seed: int) -> Config:
    s = cfg.sparsity
    mode = {"dense": "off", "fixed": "fixed", "schedule": "schedule"}[system]
    sparsity = msgspec.structs.replace(s, mode=mode, target=target,
                                       window=fixed_window if system == "fixed" else s.window)
    run = msgspec.structs.replace(cfg.run, seed=seed, progress=False, checkpoint_every=0, snapshot_every=0)
    return msgspec.structs.replace(with_free_ports(cfg), sparsity=sparsity, run=run)


def _tails(records: list[dict], quantile: str, skip: int) -> list[float]:
    """The monitor's `quantile` on the steps after the first `skip` that measured one."""
    return [r[f"mismatch/{quantile}"] for r in records[skip:] if f"mismatch/{quantile}" in r]


def tracking(records: list[dict], quantile: str, target: float, skip: int) -> dict:
    """How closely the tail held `target` on the steps after the first `skip`."""
    tails = _tails(records, quantile, skip)
    if not tails:
        return {"tail_tracking_rel_error": None, "tail_mean": None, "tracked_steps": 0}
    errors = [abs(t - target) / abs(target) for t in tails]
    mean = statistics.fmean(tails)
    # The level the schedule holds: the tail scatters multiplicatively, and
    # the schedule steers log(tail / target) to zero on average.
    logs = [math.log(max(t / target, 1e-12)) for t in tails]
    return {"tail_tracking_rel_error": statistics.fmean(errors), "tail_mean": mean,
            "tail_mean_rel_error": abs(mean - target) / abs(target),
            "tail_geomean_rel_error": abs(math.exp(statistics.fmean(logs)) - 1),
            "tail_median_rel_error": abs(statistics.median(tails) - target) / abs(target),
            "tail_log_sd": statistics.pstdev(logs),
            "tail_within_10pct": sum(e <= 0.1 for e in errors) / len(errors), "tracked_steps": len(tails)}


def tail_noise(records: list[dict], quantile: str, skip: int) -> float | None:
    """mean |tail − median| / |median| over the steps after `skip`: how far
    one step's tail strays from its run's level. At a constant window it is
    the floor under any schedule's per-step tracking error."""
    tails = _tails(records, quantile, skip)
    mid = statistics.median(tails) if tails else 0.0
    return statistics.fmean(abs(t - mid) / abs(mid) for t in tails) if mid else None


def mean_window(records: list[dict], skip: int, dense_as: int) -> float | None:
    """The geometric mean of the engines' windows over the steps after `skip` (0, dense, as `dense_as`)."""
    ws = [r["sparsity/window"] or dense_as for r in records[skip:]]
    return math.exp(statistics.fmean(math.log(w) for w in ws)) if ws else None


def train_system(cfg: Config, system: str, run_dir: Path, steps: int, fixed_window: int, target: float,
                 seed: int, eval_samples: int, settle: int) -> dict:
    from benchmarks.e2e import heldout_reward
    from stream_rl.controller.launch import train

    scfg = system_config(cfg, system, fixed_window, target, seed)
    t0 = time.time()
    summary = train(scfg, run_dir, steps)
    records = read_metrics(run_dir / "metrics.jsonl")
    if len(records) != steps:
        raise RuntimeError(f"{system} logged {len(records)} of {steps} steps")
    q = scfg.sparsity.quantile
    wall = records[-1]["wall_s"]
    tokens = sum(r.get("tokens_generated", 0) for r in records)
    res = {"seed": seed, "steps": steps, "wall_s": wall, "startup_s": summary["startup_s"],
           "gen_tokens_per_s": tokens / wall if wall else 0.0,
           "step_s_median": statistics.median(r["step_s"] for r in records),
           "final_reward": statistics.fmean(r["reward_policy_mean"] for r in records[-max(1, steps // 5):]),
           "windows": [r["sparsity/window"] for r in records],
           "tail": [r.get(f"mismatch/{q}") for r in records],
           "mismatch_mean": [r.get("mismatch/mean") for r in records]}
    te = time.time()
    res["final_heldout_reward"] = heldout_reward(run_dir / "final_model", scfg, eval_samples)
    res["heldout_s"] = time.time() - te
    skip = scfg.sparsity.warmup_steps + settle
    res["tail_noise"] = tail_noise(records, q, skip)
    if system == "schedule":
        res.update(tracking(records, q, target, skip),
                   tail_tracking_rel_error_all=tracking(records, q, target, scfg.sparsity.warmup_steps)
                   ["tail_tracking_rel_error"],
                   mean_window=mean_window(records, skip, cfg.model.max_model_len))
    res["run_s"] = time.time() - t0
    return res


def pooled(per_seed: list[dict[str, dict]]) -> dict:
    """Each system's means over seeds, with the per-seed results."""
    out = {}
    for system in per_seed[0]:
        runs = [s[system] for s in per_seed]
        entry = {k: statistics.fmean(r[k] for r in runs) for k in
                 ("final_heldout_reward", "final_reward", "gen_tokens_per_s", "wall_s")}
        for k in ("tail_tracking_rel_error", "tail_tracking_rel_error_all", "tail_mean_rel_error",
                  "tail_geomean_rel_error", "tail_median_rel_error", "tail_log_sd", "mean_window",
                  "tail_within_10pct", "tail_noise"):
            vals = [r[k] for r in runs if r.get(k) is not None]
            if vals:
                entry[k] = statistics.fmean(vals)
        entry["runs"] = runs
        out[system] = entry
    return out


def bench_sparsity(cfg: Config, steps: int, windows: list[int], fixed_window: int | None, target: float | None,
                   seeds: list[int], eval_samples: int, settle: int, requests: int, tokens: int | None,
                   rounds: int, keep_dir: str | None = None, train: bool = True) -> dict:
    from benchmarks.capacity import CapacityProbe
    from benchmarks.sparsity_stress import speedup_at, stress

    if not cfg.generator.return_logprobs:
        raise BenchSetupError("bench sparsity needs the engine's log-probs (generator.return_logprobs: true): "
                              "the monitor compares them with the learner's")
    if any(w < 0 for w in windows) or not windows:
        raise BenchSetupError(f"--windows must be non-negative attention windows; got {windows}")
    for flag, value in (("--requests", requests), ("--rounds", rounds), ("--eval-samples", eval_samples),
                        ("--tokens", tokens or 1), ("--seeds", len(seeds))):
        if value < 1:
            raise BenchSetupError(f"{flag} must be at least 1; got {value}")
    sp = cfg.sparsity
    fixed_window = fixed_window or min((w for w in windows if w > 1), default=sp.min_window)
    if not sp.min_window <= fixed_window < sp.max_window:
        raise BenchSetupError(f"--fixed-window ({fixed_window}) must be within sparsity.min_window "
                              f"({sp.min_window}) and below sparsity.max_window ({sp.max_window})")
    target = sp.target if target is None else target
    if target >= 0:
        raise BenchSetupError(f"--tail-target must be negative (a lower-tail log-ratio in nats); got {target}")
    if settle < 0 or steps <= sp.warmup_steps + settle:
        raise BenchSetupError(f"--steps ({steps}) must exceed sparsity.warmup_steps "
                              f"({sp.warmup_steps}) + --settle-steps ({settle})")
    result: dict = {"tail_target": target, "tail_quantile": sp.quantile, "fixed_window": fixed_window,
                    "settle_steps": settle, "config": msgspec.to_builtins(sp)}
    t0 = time.time()
    mean_w = None
    if train:
        per_seed = []
        with tempfile.TemporaryDirectory(prefix="bench-sparsity-") as tmp:
            root = Path(keep_dir or tmp)
            for seed in seeds:
                per_seed.append({s: train_system(cfg, s, root / f"seed{seed}" / s, steps, fixed_window, target,
                                                 seed, eval_samples, settle) for s in SYSTEMS})
        systems = pooled(per_seed)
        result["systems"] = systems
        sched = systems["schedule"]
        result["tail_tracking_rel_error"] = sched.get("tail_tracking_rel_error")
        for k in ("tail_geomean_rel_error", "tail_median_rel_error", "tail_mean_rel_error"):
            result[k] = sched.get(k)
        # The floor under the per-step error: the fixed window's own step-to-step spread.
        result["tail_noise_at_fixed_window"] = systems["fixed"].get("tail_noise")
        mean_w = sched.get("mean_window")
        result["schedule_mean_window"] = mean_w
        for s in SYSTEMS:
            result[f"final_heldout_reward_{s}"] = systems[s]["final_heldout_reward"]
        result["schedule_minus_dense_heldout"] = systems["schedule"]["final_heldout_reward"] - \
            systems["dense"]["final_heldout_reward"]
        result["fixed_minus_dense_heldout"] = systems["fixed"]["final_heldout_reward"] - \
            systems["dense"]["final_heldout_reward"]
    # The engine's own speed per window, after training (its engine is gone by then).
    mean_round = None
    if mean_w is not None:
        mean_round = 0 if mean_w >= min(sp.max_window, cfg.model.max_model_len) else round(mean_w)
    stress_windows = sorted({*windows, fixed_window, 1, *([mean_round] if mean_round else [])})
    with CapacityProbe(cfg) as probe:
        st = stress(probe, cfg, stress_windows, requests, tokens or cfg.model.max_model_len, rounds,
                    keep=min(requests, 64))
    result["long_context"] = st
    result["attention_share"] = st.get("attention_share")
    if mean_round is not None:
        result["speedup_at_mean_sparsity"] = speedup_at(st, mean_round)
        result["speedup_at_mean_sparsity_window"] = mean_round
    result["wall_s"] = time.time() - t0
    return result


def main(cfg: Config, out_json: str | None, steps: int, windows: list[int], fixed_window: int | None,
         target: float | None, seeds: list[int], eval_samples: int, settle: int, requests: int,
         tokens: int | None, rounds: int, keep_dir: str | None, train: bool) -> dict:
    return emit(bench_sparsity(cfg, steps, windows, fixed_window, target, seeds, eval_samples, settle, requests,
                               tokens, rounds, keep_dir, train), out_json)
