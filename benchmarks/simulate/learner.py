"""A simulated learner behind the `LearnerClient` interface the job uses.

One update at a time, in the order sent: a `TrainBatch` of T trained tokens
takes `learner_fixed_s + learner_per_token_s * T` seconds, plus `stage_s`
when it stages weights (`sync_due`), and answers `StepDone` with the
stats `Job.record` reads (tokens_trained, samples_trained, the per-token
version lag histogram as the real learner's `version_lag/k`); `SyncWeights`
answers `WeightsStaged` after `stage_s`; `WeightsLoaded` frees a staged
copy (nothing to do here)."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

from stream_rl.learner.client import LearnerError, ReplyWaiter
from stream_rl.protocol import (CheckpointSaved, SaveCheckpoint, StepDone, SyncWeights, TrainBatch, WeightsLoaded,
                                WeightsStaged)

from benchmarks.simulate.events import EventLoop

LAG_BINS = ("0", "1", "2", "3", "4+")


class SimLearner(ReplyWaiter):
    def __init__(self, loop: EventLoop, cfg, cost, pool=None):
        self.loop, self.cfg, self.cost, self.pool = loop, cfg, cost, pool
        self.outbox: deque = deque()
        self.free_at = 0.0  # when the update in progress (and those queued) end
        self.version = 0  # the weights last staged: what an update trains from
        self.stray = 0
        self.replies = SimpleNamespace(rejected=0)
        self.hung = False
        self.busy_s = 0.0
        self.lag_tokens = {b: 0 for b in LAG_BINS}

    def _after(self, seconds: float, reply, update: bool = False) -> None:
        start = max(self.loop.now, self.free_at)
        self.free_at = start + seconds
        self.busy_s += seconds
        if update and self.pool is not None and self.cost.engine_slowdown_while_training:
            self.loop.at(start, lambda: self.pool.set_training(True))
            end = self.free_at
            # Ends unless the next update starts at that very moment.
            self.loop.at(end, lambda: self.pool.set_training(self.free_at > end))
        self.loop.at(self.free_at, lambda: self.outbox.append(reply))

    def send(self, msg) -> None:
        c = self.cost
        if isinstance(msg, TrainBatch):
            stats = self._stats(msg)
            seconds = c.learner_fixed_s + c.learner_per_token_s * stats["tokens_trained"]
            stats["train_s"] = seconds
            weights = None
            due = msg.sync_due and msg.sync_version is not None
            if due:
                weights = WeightsStaged(version=msg.sync_version, uri="sim://", receivers=msg.receivers)
                stats["stage_s"] = c.stage_s
                seconds += c.stage_s
            self._after(seconds, StepDone(step=msg.step, stats=stats, weights=weights), update=True)
            if due:
                self.version = msg.sync_version
        elif isinstance(msg, SyncWeights):
            self.version = msg.version
            self._after(c.stage_s, WeightsStaged(version=msg.version, uri="sim://", receivers=msg.receivers))
        elif isinstance(msg, SaveCheckpoint):
            self._after(0.0, CheckpointSaved(path=msg.path, step=msg.step))
        elif not isinstance(msg, WeightsLoaded):
            raise LearnerError(f"the simulated learner got an unexpected {type(msg).__name__}")

    def _stats(self, msg: TrainBatch) -> dict:
        drop = self.cfg.learner.drop_zero_variance_groups
        tokens = samples = 0
        lags = {b: 0 for b in LAG_BINS}
        for g in msg.groups:
            valid = [r for r in g.survivors if r.reward is not None and r.response_ids]
            if drop and valid and len({r.reward for r in valid}) == 1:
                continue
            for r in valid:
                samples += 1
                tokens += len(r.response_ids)
                for v in r.versions:
                    lag = self.version - v
                    lags[LAG_BINS[min(max(lag, 0), 4)]] += 1
        for b in LAG_BINS:
            self.lag_tokens[b] += lags[b]
        n = max(1, sum(lags.values()))
        return {"tokens_trained": tokens, "samples_trained": samples, "groups_dropped": 0, "samples_rejected": 0,
                **{f"version_lag/{b}": lags[b] / n for b in LAG_BINS},
                "stale_token_frac": 1.0 - lags["0"] / n}

    def recv(self, timeout_ms: int | None = None):
        if not self.outbox:
            self.loop.run_until(lambda: bool(self.outbox), None if timeout_ms is None else timeout_ms / 1000)
        return self.outbox.popleft() if self.outbox else None

    def now(self) -> float:
        return self.loop.now

    def hangs(self, what: str, waited_s: float, key: str | None = None) -> LearnerError:
        self.hung = True
        return LearnerError(f"simulated learner: timed out after {waited_s:.0f} s waiting for {what}")

    def skip(self, msg, waiting_for: str) -> None:
        self.stray += 1

    def check_alive(self) -> None:
        pass
