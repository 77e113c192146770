"""`stream-rl bench e2e`: the whole system against synchronous GRPO and TRL.

Three systems train the same tiny model on the same prompts with the same
seed, group size, batch (`target_groups` groups a step), reward and number
of steps, one after the other on this machine:

- `sync`: `stream-rl train` with `mode: sync` (pruner off), the synchronous
  GRPO baseline of this code base;
- `stream`: `stream-rl train` with the config as given (the tiny default:
  stream mode, generation one batch ahead of the updates, in-flight syncs,
  TIS; pruning off, `--set pruner.mode=arrol` turns ARRoL on);
- `stream_nopruning`: the same config with `pruner.mode: none`, the
  ablation that isolates what ARRoL's pruning buys (`stream_vs_nopruning`);
- `trl`: TRL's `GRPOTrainer` (`benchmarks/trl_peer.py`).

Per system: `wall_s` (training only: from the first step's start to the
last update; engine and model start-up are reported apart as `startup_s`),
`time_to_reward_s`, `final_reward` (mean training reward of the last 20% of
steps; stream's is the policy's, its kept rollouts weighted by 1/keep_prob),
`trained_tokens_per_s`, `generated_tokens_per_trained_sample` (every token
the engine generated, pruned rollouts' included, over the samples the
learner trained on), and the greedy held-out accuracy of the final model
(`benchmarks/heldout.py`).

time_to_reward: the first wall time at which a system's reward curve
reaches the threshold. The curve (`eval_every` > 0, the default) is the
held-out reward of the policy snapshots every system saves each `eval_every`
steps (`run.snapshot_every`), scored afterwards on the held-out prompts with
`eval_samples` responses each, sampled as the generators sample: the same
unbiased measure for all three, where the training reward is not one (stream's
batches are pruned and, under APRIL, short responses finish first). With
`eval_every` 0 the curve is the moving average (`window` steps) of the
training reward. The threshold is one every system reaches: the common start
(the initial policy's held-out reward; for training rewards, the mean over
systems of their first full window) plus `fraction` of the way to the lowest
of the systems' best values (the lowest best itself if some system never
rose above the start). stream_vs_sync, stream_vs_nopruning and stream_vs_trl
are ratios of time_to_reward (higher: stream is faster). Both curves are in the JSON.

With `--seeds 0,1,2` the whole comparison runs once per seed and
`pool_seeds` compares the systems on their curves averaged over seeds (one
run rests on one training trajectory; the same config's seeds differ by up
to ~0.1 in held-out gain on the tiny world). Each seed's own result is
written beside the JSON as it completes.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from benchmarks.capacity import CapacityProbe, capacity_fraction, mean_response_tokens
from benchmarks.common import BenchSetupError, emit, with_free_ports, write_json
from stream_rl.config import Config
from stream_rl.metrics import read_metrics

SYSTEMS: tuple[str, ...] = ("sync", "stream", "stream_nopruning", "trl")


def moving_average(xs: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (fewer at the start)."""
    out = []
    for i in range(len(xs)):
        part = xs[max(0, i - window + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def reward_threshold(curves: dict[str, list[float]], fraction: float, window: int) -> tuple[float, float, float]:
    """(threshold, common start, lowest best) for the systems' moving
    averages. The start is each curve's first full window (the first steps
    alone are noisy, and biased to short responses under APRIL), averaged
    over systems; the threshold never exceeds the lowest best, so every
    system reaches it."""
    first = min(window, min(len(c) for c in curves.values())) - 1
    start = statistics.fmean(c[first] for c in curves.values())
    lowest_best = min(max(c[first:]) for c in curves.values())
    if lowest_best <= start:  # some system never rose above the common start
        return lowest_best, start, lowest_best
    return start + fraction * (lowest_best - start), start, lowest_best


def time_to(curve: list[float], walls: list[float], threshold: float, window: int) -> float | None:
    """First wall time the moving average reaches `threshold`, counting from
    its first full window."""
    first = min(window, len(curve)) - 1
    return next((w for m, w in zip(curve[first:], walls[first:]) if m >= threshold), None)


def system_result(records: list[dict], startup_s: float) -> dict:
    k = max(1, len(records) // 5)
    wall = records[-1]["wall_s"] if records else 0.0
    tokens = sum(r["tokens_trained"] for r in records)
    return {
        "steps": len(records), "wall_s": wall, "startup_s": startup_s,
        "final_reward": statistics.fmean(r["reward_policy_mean"] for r in records[-k:]) if records else math.nan,
        "first_reward": records[0]["reward_policy_mean"] if records else math.nan,
        "tokens_trained": tokens, "trained_tokens_per_s": tokens / wall if wall else 0.0,
        "step_s_median": statistics.median(r["step_s"] for r in records) if records else math.nan,
    }


def _run_ours(cfg: Config, run_dir: Path, steps: int) -> tuple[list[dict], dict]:
    from stream_rl.controller.launch import train

    summary = train(cfg, run_dir, steps)
    return read_metrics(run_dir / "metrics.jsonl"), summary


def heldout_reward(model_dir, cfg: Config, samples: int, limit: int | None = None) -> float:
    """The held-out reward of the policy in `model_dir`: `samples` responses per prompt."""
    from benchmarks.heldout import heldout_accuracy

    # 512 rows a generate() call: 40 s for 111 x 8 samples here, against
    # 136 s at 64 rows and 247 s at 1024.
    return heldout_accuracy(model_dir, cfg, limit=limit, samples=samples, seed=cfg.run.seed,
                            batch_size=512)["heldout_sampled_reward"]


def heldout_curve(cfg: Config, run_dir: Path, records: list[dict], every: int, samples: int,
                  start: float, limit: int | None = None) -> tuple[list[float], list[float]]:
    """(rewards, walls): the initial policy's held-out reward `start` at wall 0,
    then each snapshot's, at the wall time its step ended."""
    from stream_rl.learner.service import snapshot_path

    rewards, walls = [start], [0.0]
    for rec in records:
        if rec["step"] % every == 0:
            rewards.append(heldout_reward(snapshot_path(run_dir, rec["step"]), cfg, samples, limit))
            walls.append(rec["wall_s"])
    return rewards, walls


def speedup(systems: dict, a: str, b: str) -> float | None:
    """time_to_reward of `b` over that of `a` (higher: `a` is faster); None
    when either system did not run or never reached the threshold."""
    if a not in systems or b not in systems or not systems[a]["time_to_reward_s"] \
            or systems[b]["time_to_reward_s"] is None:
        return None
    return systems[b]["time_to_reward_s"] / systems[a]["time_to_reward_s"]


def ratios(systems: dict) -> dict:
    """The headline ratios, those the systems run allow (None otherwise)."""
    out = {"stream_vs_sync": speedup(systems, "stream", "sync"),
           "stream_vs_nopruning": speedup(systems, "stream", "stream_nopruning"),
           "stream_vs_trl": speedup(systems, "stream", "trl")}
    a, b = (systems.get(s, {}).get("generated_tokens_per_trained_sample") for s in ("stream", "stream_nopruning"))
    out["tokens_per_trained_sample_vs_nopruning"] = a / b if a is not None and b else None
    caps = [v["engine_capacity_tokens_per_s"] for v in systems.values() if v.get("engine_capacity_tokens_per_s")]
    out["engine_capacity_tokens_per_s"] = statistics.fmean(caps) if caps else None
    for s in ("stream", "sync"):
        out[f"{s}_capacity_fraction"] = systems.get(s, {}).get("capacity_fraction")
    return out


def issue_targets(systems: dict, ratio: dict, final_key: str) -> dict:
    """The issues' targets, those the systems run allow: #7's against sync
    and TRL (2x and 3x time to reward), #23's against no pruning (1.3x time
    to reward, at most 0.6x the generated tokens per trained sample). The
    final reward is compared on the measure the clock uses (`final_key`):
    stream's training reward is over pruned batches, not the policy's."""
    targets = {}
    if ratio.get("stream_vs_sync") is not None:
        targets["stream_vs_sync_at_least_2"] = ratio["stream_vs_sync"] >= 2.0
    if "sync" in systems and "stream" in systems:
        targets["stream_final_reward_within_0.02_of_sync"] = \
            systems["stream"][final_key] >= systems["sync"][final_key] - 0.02
    if ratio.get("stream_vs_nopruning") is not None:
        targets["stream_vs_nopruning_at_least_1.3"] = ratio["stream_vs_nopruning"] >= 1.3
    if ratio.get("tokens_per_trained_sample_vs_nopruning") is not None:
        targets["tokens_per_trained_sample_at_most_0.6x_nopruning"] = \
            ratio["tokens_per_trained_sample_vs_nopruning"] <= 0.6
    if ratio.get("stream_vs_trl") is not None:
        targets["stream_vs_trl_at_least_3"] = ratio["stream_vs_trl"] >= 3.0
    if ratio.get("stream_capacity_fraction") is not None:
        targets["stream_capacity_fraction_at_least_0.85"] = ratio["stream_capacity_fraction"] >= 0.85
    return targets


def bench_e2e(cfg: Config, steps: int, systems=SYSTEMS, workdir: str | None = None, window: int = 5,
              fraction: float = 0.9, heldout_limit: int | None = None, keep_dir: str | None = None,
              eval_every: int = 10, eval_samples: int = 4, capacity: bool = True) -> dict:
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        raise BenchSetupError(f"systems must be among {', '.join(SYSTEMS)}; got {list(systems)}")
    if steps < window:
        raise BenchSetupError(f"--steps ({steps}) must be at least the moving-average window ({window})")
    if cfg.mode != "stream":
        raise BenchSetupError("bench e2e compares the config's stream mode with sync and trl: give a config "
                              f"with mode: stream (got {cfg.mode!r})")
    from benchmarks.heldout import heldout_accuracy

    if eval_every < 0 or (eval_every and eval_samples < 1):
        raise BenchSetupError(f"--eval-every must be >= 0 and --eval-samples >= 1 (got {eval_every}, {eval_samples})")
    cfg = msgspec.structs.replace(cfg, run=msgspec.structs.replace(cfg.run, progress=False, checkpoint_every=0,
                                                                   snapshot_every=eval_every))
    t0 = time.time()
    out: dict[str, dict] = {}
    curves: dict[str, tuple[list[float], list[float]]] = {}
    rewards_of: dict[str, list[float]] = {}
    heldout: dict[str, tuple[list[float], list[float]]] = {}
    start_reward = None
    if eval_every:
        start_reward = heldout_reward(cfg.model.path, cfg, eval_samples, heldout_limit)
    # The raw engine, placed as the pipeline's, measured after each system (#24).
    probe = CapacityProbe(cfg) if capacity else None
    workload = cfg.generator.max_tokens
    with probe or contextlib.nullcontext(), tempfile.TemporaryDirectory(dir=workdir, prefix="bench-e2e-") as tmp:
        root = Path(keep_dir or tmp)
        for system in systems:
            run_dir = root / system
            ts = time.time()
            if system == "trl":
                from benchmarks.trl_peer import run_trl

                res = run_trl(cfg, run_dir, steps)
                records, startup_s = res["records"], res["startup_s"]
                extra = {"trl_version": res.get("trl_version")}
            else:
                scfg = with_free_ports(cfg)
                if system == "sync":
                    scfg = msgspec.structs.replace(scfg, mode="sync",
                                                   pruner=msgspec.structs.replace(scfg.pruner, mode="none"))
                elif system == "stream_nopruning":
                    scfg = msgspec.structs.replace(scfg, pruner=msgspec.structs.replace(scfg.pruner, mode="none"))
                records, summary = _run_ours(scfg, run_dir, steps)
                startup_s = summary["startup_s"]
                samples = sum(r.get("samples_trained", 0) for r in records)
                extra = {"generated_tokens": summary["tokens_generated"], "trained_samples": samples,
                         "generated_tokens_per_trained_sample": summary["tokens_generated"] / samples
                         if samples else math.nan}
            if len(records) != steps:
                raise RuntimeError(f"{system} logged {len(records)} of {steps} steps")
            res = system_result(records, startup_s)
            res.update(extra, run_s=time.time() - ts,
                       **heldout_accuracy(run_dir / "final_model", cfg, limit=heldout_limit))
            if probe is not None:
                # TRL's records carry no response lengths: the previous system's workload.
                workload = mean_response_tokens(records, workload)
                cap = probe.measure(workload)
                res.update(engine_capacity=cap, engine_capacity_tokens_per_s=cap["engine_capacity_tokens_per_s"],
                           **capacity_fraction(records, cap["engine_capacity_tokens_per_s"]))
            out[system] = res
            rewards = rewards_of[system] = [r["reward_policy_mean"] for r in records]
            curves[system] = (moving_average(rewards, window), [r["wall_s"] for r in records])
            if eval_every:
                te = time.time()
                heldout[system] = heldout_curve(cfg, run_dir, records, eval_every, eval_samples, start_reward,
                                                heldout_limit)
                res.update(final_heldout_reward=heldout[system][0][-1], heldout_curve_s=time.time() - te)
    threshold, start, lowest_best = reward_threshold({s: c[0] for s, c in curves.items()}, fraction, window)
    for system, (curve, walls) in curves.items():
        out[system]["time_to_train_reward_s"] = time_to(curve, walls, threshold, window)
        out[system]["best_moving_average"] = max(curve[min(window, len(curve)) - 1:])
        out[system]["time_to_reward_s"] = out[system]["time_to_train_reward_s"]
    train_threshold = {"reward": threshold, "common_start": start, "lowest_best": lowest_best,
                       "fraction": fraction, "window": window, "rose": lowest_best > start}
    if eval_every:  # the held-out curves decide
        threshold, start, lowest_best = reward_threshold({s: c[0] for s, c in heldout.items()}, fraction, 1)
        for system, (curve, walls) in heldout.items():
            out[system]["time_to_reward_s"] = time_to(curve, walls, threshold, 1)

    result = {
        "benchmark": "e2e", "systems": out,
        "measure": "heldout_sampled_reward" if eval_every else "training_reward_moving_average",
        "threshold": ({"reward": threshold, "common_start": start, "lowest_best": lowest_best,
                       "fraction": fraction, "eval_every": eval_every, "eval_samples": eval_samples,
                       "rose": lowest_best > start} if eval_every else train_threshold),
        "train_reward_threshold": train_threshold,
        # Per system and step: wall time and training reward, to redraw or re-threshold.
        "curves": {s: {"wall_s": [round(w, 2) for w in c[1]], "reward": [round(r, 4) for r in rewards_of[s]]}
                   for s, c in curves.items()},
        # Per system and snapshot (the initial policy first): wall time and held-out reward.
        "heldout_curves": {s: {"wall_s": [round(w, 2) for w in c[1]], "reward": [round(r, 4) for r in c[0]]}
                           for s, c in heldout.items()},
        **ratios(out),
    }
    result["final_reward_measure"] = "final_heldout_reward" if eval_every else "final_reward"
    result["targets"] = issue_targets(out, result, result["final_reward_measure"])
    g = cfg.generator
    result["setup"] = {
        "model": cfg.model.path, "steps": steps, "seed": cfg.run.seed, "group_size": g.group_size,
        "target_groups": g.target_groups, "samples_per_step": g.group_size * g.target_groups,
        "max_tokens": g.max_tokens, "lr": cfg.learner.lr, "stream_pruner": cfg.pruner.mode,
        "overprovision": g.overprovision, "learner_threads": cfg.learner.threads, "cpus": os.cpu_count(),
        "platform": platform.platform(), "wall_s": round(time.time() - t0, 1),
    }
    return result


# Per-system numbers averaged over seeds (those every run has). Not
# time_to_reward_s: each seed's is against its own threshold (see `per_seed`);
# the pooled one is read off the mean curve.
POOLED_KEYS = ("wall_s", "step_s_median", "final_reward", "final_heldout_reward",
               "heldout_accuracy", "trained_tokens_per_s", "generated_tokens", "trained_samples",
               "gen_tokens_per_s", "engine_capacity_tokens_per_s", "capacity_fraction")


def pool_seeds(runs: list[dict]) -> dict:
    """One `bench_e2e` result per seed -> the comparison over all of them.

    One run's time to reward rests on one training trajectory, and the same
    config's seeds differ by up to ~0.1 in held-out gain here, so the pooled
    numbers come from the mean curve: each system's reward curves (held-out
    snapshots, or training-reward moving averages), averaged over seeds point
    by point with their wall times, are thresholded by the same rule as one
    run's (`reward_threshold`, the runs' `fraction`). Per seed, its own
    ratios; per system, means of `POOLED_KEYS`."""
    if not runs:
        raise BenchSetupError("no runs to pool")
    measure = runs[0]["measure"]
    if any(r["measure"] != measure for r in runs):
        raise BenchSetupError("runs to pool must share their reward measure")
    held = measure == "heldout_sampled_reward"
    key = "heldout_curves" if held else "curves"
    window = 1 if held else runs[0]["threshold"]["window"]
    fraction = runs[0]["threshold"]["fraction"]
    systems = list(runs[0]["systems"])
    curves = {}
    for s in systems:
        rewards = [r[key][s]["reward"] for r in runs]
        walls = [r[key][s]["wall_s"] for r in runs]
        n = min(len(c) for c in rewards)
        mean_reward = [statistics.fmean(c[i] for c in rewards) for i in range(n)]
        curves[s] = ((mean_reward if held else moving_average(mean_reward, window)),
                     [statistics.fmean(w[i] for w in walls) for i in range(n)])
    threshold, start, lowest_best = reward_threshold({s: c[0] for s, c in curves.items()}, fraction, window)
    pooled = {}
    for s in systems:
        vals = {k: [r["systems"][s][k] for r in runs] for k in POOLED_KEYS
                if all(isinstance(r["systems"][s].get(k), (int, float)) for r in runs)}
        pooled[s] = {k: statistics.fmean(v) for k, v in vals.items()}
        pooled[s].update({f"{k}_min": min(v) for k, v in vals.items()})
        pooled[s].update({f"{k}_max": max(v) for k, v in vals.items()})
        pooled[s]["time_to_reward_s"] = time_to(*curves[s], threshold, window)
        if pooled[s].get("trained_samples"):  # a ratio of the pooled sums, not a mean of ratios
            pooled[s]["generated_tokens_per_trained_sample"] = \
                pooled[s]["generated_tokens"] / pooled[s]["trained_samples"]

    result = {
        "benchmark": "e2e", "seeds": [r["setup"]["seed"] for r in runs], "measure": measure, "systems": pooled,
        "threshold": {"reward": threshold, "common_start": start, "lowest_best": lowest_best, "fraction": fraction,
                      "window": window, "rose": lowest_best > start},
        "mean_curves": {s: {"wall_s": [round(w, 2) for w in c[1]], "reward": [round(x, 4) for x in c[0]]}
                        for s, c in curves.items()},
        **ratios(pooled),
        "per_seed": [{"seed": r["setup"]["seed"], **{k: r.get(k) for k in ratios({})},
                      "threshold": r["threshold"]["reward"],
                      **{f"{s}_{k}": r["systems"][s].get(k) for s in systems
                         for k in ("wall_s", "time_to_reward_s", runs[0]["final_reward_measure"])}}
                     for r in runs],
        "final_reward_measure": runs[0]["final_reward_measure"],
    }
    result["targets"] = issue_targets(pooled, result, result["final_reward_measure"])
    result["runs"] = runs
    return result


def main(cfg: Config, out_json: str | None, steps: int, systems: list[str], keep_dir: str | None = None,
         eval_every: int = 10, eval_samples: int = 4, seeds: list[int] | None = None,
         capacity: bool = True) -> dict:
    """One run at the config's seed, or one per seed in `seeds`, pooled (`pool_seeds`)."""
    if not seeds:
        return emit(bench_e2e(cfg, steps, systems, keep_dir=keep_dir, eval_every=eval_every,
                              eval_samples=eval_samples, capacity=capacity), out_json)
    if len(set(seeds)) != len(seeds):
        raise BenchSetupError(f"--seeds must differ from each other (got {seeds})")
    runs = []
    for seed in seeds:
        scfg = msgspec.structs.replace(cfg, run=msgspec.structs.replace(cfg.run, seed=seed))
        runs.append(bench_e2e(scfg, steps, systems, keep_dir=keep_dir and str(Path(keep_dir) / f"seed{seed}"),
                              eval_every=eval_every, eval_samples=eval_samples, capacity=capacity))
        if out_json:  # each seed's result as soon as it is in: a later seed's failure loses nothing
            path = Path(out_json)
            write_json(runs[-1], path.with_name(f"{path.stem}.seed{seed}{path.suffix}"))
    return emit(pool_seeds(runs), out_json)
