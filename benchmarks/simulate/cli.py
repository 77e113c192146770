"""`stream-rl simulate`: the entry the command line calls (stream_rl/cli.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from stream_rl.config import Config

from benchmarks.simulate.costs import CostModel, fit_from_run, h100_7b
from benchmarks.simulate.run import sim_config, simulate
from benchmarks.simulate.studies import fit_slowdown, project, reproduce, validate
from benchmarks.simulate.workload import Workload


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def main(cfg: Config, out_json: str | None, mode: str | None, engines: int | None, steps: int,
         validate_run: str | None = None, reproduce_: bool = False, project_: bool = False,
         costs: str | None = None, engines_list: list[int] | None = None,
         contention_from: str | None = None, drift: bool = False) -> dict:
    if validate_run:
        slowdown = fit_slowdown(cfg, contention_from, drift=drift) if contention_from else 0.0
        result = validate(cfg, validate_run, slowdown=slowdown, slowdown_source=contention_from, drift=drift)
    elif reproduce_:
        result = reproduce(cfg)
    elif project_:
        result = project(cfg, engines_list or (8, 64, 256))
    else:
        cost = h100_7b() if costs == "h100" else fit_from_run(costs, max_tokens=cfg.generator.max_tokens) if costs else CostModel()
        result = {"simulate": "run", "cost_model": cost.to_dict(), "modes": {}}
        for m in (mode or cfg.mode).split(","):
            c = sim_config(cfg, m.strip(), engines)
            r = simulate(c, cost, Workload(seed=cfg.run.seed), steps)
            r.pop("walls")
            result["modes"][m.strip()] = r
    result = _clean(result)
    text = json.dumps(result, indent=2)
    print(text)
    if out_json:
        Path(out_json).write_text(text + "\n")
    return result
