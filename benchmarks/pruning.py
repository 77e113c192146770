"""`stream-rl bench pruning`: ARRoL against random pruning at the same keep rate.

Trains twice from the same checkpoint with the same seed and steps, once per
`pruner.mode` (random, then arrol; `--modes` may add none), on one shared
generator, and reports per mode over the steps after cold start:

- rho_hat_mean, rho_var_mean: E[rho_hat] and E[rho_hat (1 - rho_hat)] over
  the groups (rho_hat: a group's fraction of positive kept rollouts);
- keep_rate: kept / drawn over every pruning draw (exempt rollouts are never
  drawn; "spared" ones count as kept);
- head_auc (arrol): AUC of the head's score against the final reward on the
  exempt slice, pooled over all steps after cold start;
- generated_tokens_per_step, and the final training reward (mean reward of
  the last 20% of steps).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import tempfile
import time
import typing
from pathlib import Path

import msgspec

from benchmarks.common import BenchSetupError, emit, with_free_learner_ports, with_free_ports
from stream_rl.config import Config, PrunerConfig
from stream_rl.metrics import read_metrics

# The pruner modes, as the config declares them.
MODES: tuple[str, ...] = typing.get_args(typing.get_type_hints(PrunerConfig)["mode"])


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else math.nan


def mode_result(records: list[dict], summary: dict, cold_start: int) -> dict:
    after = [r for r in records if r["step"] > cold_start]
    drawn = sum(r.get("prune/drawn", 0) for r in after)
    kept = sum(r.get("prune/drawn", 0) - r.get("prune/pruned", 0) for r in after)
    k = max(1, len(records) // 5)
    return {
        "steps_after_cold_start": len(after),
        "rho_hat_mean": _mean(r.get("prune/rho_hat_mean") for r in after),
        "rho_var_mean": _mean(r.get("prune/rho_var_mean") for r in after),
        "keep_rate": kept / drawn if drawn else math.nan,
        "drawn": drawn,
        "head_auc": summary.get("prune/head_auc", math.nan),
        "head_spearman": summary.get("prune/head_spearman", math.nan),
        "head_accuracy": summary.get("prune/head_accuracy", math.nan),
        "head_eval_n": summary.get("prune/head_eval_n", 0),
        "generated_tokens_per_step": _mean(r["tokens_generated"] for r in after),
        "kept_rollouts_per_step": _mean(r.get("prune/kept_rollouts") for r in after),
        "tokens_per_kept_rollout": _mean(r["tokens_per_kept_rollout"] for r in after),
        "prune_lag_tokens": _mean(r.get("prune/prune_lag_tokens") for r in after),
        # The policy's pass rate (survivors weighted by 1/keep_prob), and the
        # survivors' own, which pruning biases by design.
        "final_reward": _mean(r["reward_policy_mean"] for r in records[-k:]),
        "reward_first_20pct": _mean(r["reward_policy_mean"] for r in records[:k]),
        "final_kept_reward": _mean(r["reward_mean"] for r in records[-k:]),
        "step_s_median": statistics.median(r["step_s"] for r in after) if after else math.nan,
    }


def bench_pruning(cfg: Config, steps: int, modes: list[str], workdir: str | None = None) -> dict:
    from stream_rl.generator.client import GeneratorProcess
    from stream_rl.controller.launch import train

    p = cfg.pruner
    if not modes or any(m not in MODES for m in modes):
        raise BenchSetupError(f"--modes takes {', '.join(MODES)}; got {','.join(modes)!r}")
    if steps <= p.cold_start_steps:
        raise BenchSetupError(f"--steps ({steps}) must exceed pruner.cold_start_steps ({p.cold_start_steps})")
    cfg = msgspec.structs.replace(with_free_ports(cfg), run=msgspec.structs.replace(cfg.run, progress=False))
    t0 = time.time()
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        gen = GeneratorProcess(cfg, Path(tmp) / "generator")
        try:
            for mode in modes:
                mcfg = msgspec.structs.replace(with_free_learner_ports(cfg) if out else cfg,
                                               pruner=msgspec.structs.replace(p, mode=mode))
                run_dir = Path(tmp) / mode
                # Each run starts from the checkpoint: train() syncs its fresh learner's weights.
                summary = train(mcfg, run_dir, steps, generator=gen)
                out[mode] = mode_result(read_metrics(run_dir / "metrics.jsonl"), summary, p.cold_start_steps)
        finally:
            gen.stop()
    result = {"benchmark": "pruning", "modes": out}
    if "random" in out and "arrol" in out:
        r, a = out["random"], out["arrol"]
        result["targets"] = {
            "head_auc_at_least_0.75": a["head_auc"] >= 0.75,
            "arrol_rho_var_above_random": a["rho_var_mean"] > r["rho_var_mean"],
            "arrol_rho_hat_closer_to_rho": abs(a["rho_hat_mean"] - p.rho) < abs(r["rho_hat_mean"] - p.rho),
            "keep_rate_within_0.05_of_kappa": all(abs(out[m]["keep_rate"] - p.kappa) <= 0.05
                                                   for m in ("random", "arrol")),
        }
    result["setup"] = {
        "model": cfg.model.path, "steps": steps, "seed": cfg.run.seed, "kappa": p.kappa, "rho": p.rho, "lam": p.lam,
        "l_detect": p.l_detect, "cold_start_steps": p.cold_start_steps, "exempt_fraction": p.exempt_fraction,
        "min_survivors": p.min_survivors, "small_groups": p.small_groups, "target_groups": cfg.generator.target_groups,
        "group_size": cfg.generator.group_size, "mode": cfg.mode,
        "cpus": os.cpu_count(), "platform": platform.platform(), "wall_s": round(time.time() - t0, 1),
    }
    return result


def main(cfg: Config, out_json: str | None, steps: int, modes: list[str]) -> dict:
    return emit(bench_pruning(cfg, steps, modes), out_json)
