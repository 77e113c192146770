"""One simulated job: the real `Job` and `run_sync`/`run_stream` on the
virtual clock, against `SimPool` and `SimLearner`; its numbers."""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from stream_rl.config import Config
from stream_rl.controller.job import Job
from stream_rl.controller.schedules import run_stream, run_sync
from stream_rl.preflight import CheckedJob
from stream_rl.verifier import make_verifier

from benchmarks.simulate.costs import CostModel
from benchmarks.simulate.engine import SimPool
from benchmarks.simulate.events import EventLoop
from benchmarks.simulate.learner import LAG_BINS, SimLearner
from benchmarks.simulate.workload import SimTokenizer, Workload, answer_texts


class Records:
    """The `MetricsLogger` interface, in memory."""

    def __init__(self):
        self.records: list[dict] = []

    def log(self, record: dict) -> None:
        self.records.append(record)


def sim_config(cfg: Config, mode: str | None = None, engines: int | None = None, **generator) -> Config:
    g = msgspec.structs.replace(cfg.generator, count=engines or cfg.generator.count, **generator)
    return msgspec.structs.replace(cfg, mode=mode or cfg.mode, generator=g,
                                   run=msgspec.structs.replace(cfg.run, checkpoint_every=0, snapshot_every=0,
                                                               progress=False, export_rollouts=None))


def simulate(cfg: Config, cost: CostModel, workload: Workload, steps: int, quantum: int = 1,
             keep_records: bool = False) -> dict:
    """Run `steps` steps of `cfg.mode` on `cfg.generator.count` simulated engines."""
    loop = EventLoop()
    right, wrong, ref = answer_texts(make_verifier(cfg.data))
    pool = SimPool(loop, cfg, cost, workload, cfg.generator.count, quantum)
    learner = SimLearner(loop, cfg, cost, pool)
    checked = CheckedJob(tokenizer=SimTokenizer(right, wrong), dataset=workload.dataset(ref), model_config=None)
    out = Records()
    t_real = time.perf_counter()
    quiet = logging.getLogger("stream_rl")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="stream-rl-sim-") as tmp:
            job = Job(cfg, Path(tmp), pool, learner, steps, checked, clock=loop.clock)
            if cfg.pruner.mode == "arrol":  # as `run_controller`: the learner's weights (and head) first
                job.sync_now()
            t0 = job.t0 = loop.clock.wall()
            for c in pool.clients:
                c.busy_s = c.paused_s = c.seq_s = 0.0
                c.tokens = 0
            learner.busy_s = 0.0
            learner.lag_tokens = {b: 0 for b in LAG_BINS}
            messages0 = pool.messages
            (run_stream if cfg.mode == "stream" else run_sync)(job, out)
            t1 = loop.now
    finally:
        quiet.setLevel(level)
    return summarize(out.records, pool, learner, t0, t1, pool.messages - messages0, time.perf_counter() - t_real,
                     loop.events, keep_records)


def summarize(recs: list[dict], pool: SimPool, learner: SimLearner, t0: float, t1: float, messages: int,
              real_s: float, events: int, keep_records: bool) -> dict:
    wall = recs[-1]["wall_s"] if recs else 0.0
    tokens = sum(r["tokens_generated"] for r in recs)
    lag_total = max(1, sum(learner.lag_tokens.values()))
    gen_s = sum(r["gen_s"] for r in recs)
    out = {
        "steps": len(recs), "wall_s": wall,
        "step_s_mean": statistics.fmean(r["step_s"] for r in recs) if recs else 0.0,
        "step_s_median": statistics.median(r["step_s"] for r in recs) if recs else 0.0,
        "gen_tokens_per_s": tokens / wall if wall else 0.0,
        # Generated tokens over the time the rollout phase took (sync, april: the collect; stream: all).
        "rollout_tokens_per_s": tokens / gen_s if gen_s else 0.0,
        "trained_tokens_per_s": sum(r["tokens_trained"] for r in recs) / wall if wall else 0.0,
        "tokens_generated": tokens,
        "reward_mean": statistics.fmean(r["reward_mean"] for r in recs) if recs else 0.0,
        # Idle or paused for a weight load, over the run: what stream removes.
        "engine_bubble_fraction": pool.bubble_fraction(t0, t1),
        # Busy is not full: a sync step's tail decodes a few sequences at a time.
        "engine_mean_batch": pool.mean_batch(t0, t1),
        "learner_busy_fraction": learner.busy_s / max(1e-12, t1 - t0),
        # Token-weighted: how many versions behind the weights it trained
        # from each trained token was sampled.
        "staleness": {b: learner.lag_tokens[b] / lag_total for b in LAG_BINS},
        "version_lag_max": max((r["version_lag_max"] for r in recs), default=0),
        "controller_tokens_per_s": tokens / (t1 - t0) if t1 > t0 else 0.0,
        "controller_messages_per_s": messages / (t1 - t0) if t1 > t0 else 0.0,
        "walls": [round(r["wall_s"], 3) for r in recs],
        "simulator_real_s": round(real_s, 2), "events": events,
    }
    if keep_records:
        out["records"] = recs
    return out
