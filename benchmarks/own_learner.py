"""`stream-rl bench own-learner`: the built-in learner and
`examples/own_learner.py` (a plain torch loop on `RolloutSource`) on the
same job config, in interleaved pairs, each a real `stream-rl train`.

It reports what the API costs per batch, `source_s` (decoding the batch,
advantages, checking the weights, the reply; not the quality head, not
staging), against the update itself, `learner_s` (batch handed out to
weights back), in the same run; and both systems' reward curves.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from benchmarks.common import BenchSetupError, emit, with_free_ports

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_learner.py"
SYSTEMS = ("builtin", "own")


def _command(system: str, config: Path, out: Path, steps: int) -> list[str]:
    if system == "builtin":
        return [sys.executable, "-m", "stream_rl", "train", "--config", str(config), "--out", str(out),
                "--max-steps", str(steps)]
    return [sys.executable, str(EXAMPLE), "--config", str(config), "--out", str(out), "--steps", str(steps)]


def _median(records: list[dict], key: str) -> float:
    vals = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else float("nan")


def run_one(cfg, system: str, steps: int, root: Path) -> dict:
    """One job of `system`; its per-step curve and medians."""
    cfg = with_free_ports(cfg)
    out = root / f"{system}-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    config = out / "bench_config.json"
    config.write_bytes(msgspec.json.encode(cfg))
    t0 = time.perf_counter()
    proc = subprocess.run(_command(system, config, out, steps), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    later = records[1:] or records  # the first step carries compilation and the first sync
    res = {"system": system, "wall_s": time.perf_counter() - t0, "startup_s": summary.get("startup_s"),
           "reward_mean": [r["reward_mean"] for r in records]}
    for key in ("step_s", "learner_s", "source_s", "head_s", "stage_s", "gen_tokens_per_s"):
        res[f"{key}_median"] = _median(later, key)
    res["source_over_learner"] = statistics.median(r["source_s"] / r["learner_s"] for r in later if r["learner_s"])
    return res


def main(cfg, out_json: str | None, steps: int, pairs: int = 1, keep: str | None = None) -> dict:
    if pairs < 1:
        raise BenchSetupError(f"--pairs must be >= 1 (got {pairs})")
    if cfg.mode != "stream":
        raise BenchSetupError(f"own-learner compares stream jobs (the config's mode is {cfg.mode})")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(keep) if keep else Path(tmp)
        for pair in range(pairs):
            order = SYSTEMS if pair % 2 == 0 else SYSTEMS[::-1]  # interleaved: drift hits both
            for system in order:
                runs.append({"pair": pair, **run_one(cfg, system, steps, root)})
    by = {s: [r for r in runs if r["system"] == s] for s in SYSTEMS}
    window = max(1, steps // 8)

    def mean_of(rs, part):
        return statistics.mean(statistics.mean(r["reward_mean"][part]) for r in rs)

    result = {
        "bench": "own-learner", "steps": steps, "pairs": pairs, "runs": runs,
        # What the API adds per batch, as a share of the update it serves.
        "source_over_learner": {s: statistics.median(r["source_over_learner"] for r in by[s]) for s in SYSTEMS},
        "own_over_builtin": {k: statistics.median(o[f"{k}_median"] / b[f"{k}_median"]
                                                  for o, b in zip(by["own"], by["builtin"]))
                             for k in ("step_s", "learner_s", "gen_tokens_per_s")},
        "reward_first": {s: mean_of(by[s], slice(0, window)) for s in SYSTEMS},
        "reward_last": {s: mean_of(by[s], slice(-window, None)) for s in SYSTEMS},
    }
    return emit(result, out_json)
