"""The two ways a job's steps run (`mode`), over `controller/job.py`'s Job.

- `sync` and `april`: generate a step's groups (`RolloutController.collect`:
  to completion, or with APRIL's over-provisioning), train, sync, and only
  then generate again;
- `stream`: generation never stops. Groups are kept in flight
  (`generator.overprovision` x `target_groups`), a batch goes to the learner
  as soon as it is complete and the learner is free, the learner's weights
  reach the engines in flight (requests keep running, later tokens carry the
  new version), and rollouts more than `buffer.max_staleness` versions
  behind are restarted or dropped, or their old tokens masked by the
  learner (`buffer.stale_policy`). New prompts are drawn only while fewer
  than a batch of groups waits, so generation runs at most one batch ahead of
  the learner.
"""

from __future__ import annotations

import math

from stream_rl.controller.job import Job
from stream_rl.generator.pool import GeneratorPool
from stream_rl.learner.client import LearnerClient
from stream_rl.metrics import MetricsLogger
from stream_rl.protocol import StepDone, WeightsLoaded, WeightsStaged


class UpdateRelay:
    """Staged weights on their way to the generators (stream mode), one load
    at a time: weights staged while a load goes on wait for it, the newest
    replacing an older waiting one."""

    def __init__(self, pool: GeneratorPool, learner: LearnerClient):
        self.pool, self.learner = pool, learner
        self.loading: WeightsStaged | None = None  # being loaded by the generators
        self.waiting: WeightsStaged | None = None  # staged while that load goes on

    def add(self, staged: WeightsStaged) -> None:
        if self.loading is None:
            if self.pool.begin_update(staged.version, staged.uri, staged.receivers):
                self.loading = staged
            else:  # a receiver was lost since it was staged: never to be loaded
                self.learner.send(WeightsLoaded(version=staged.version))
        else:
            if self.waiting is not None:  # never to be loaded: its staged copy may go
                self.learner.send(WeightsLoaded(version=self.waiting.version))
            self.waiting = staged

    def poll(self) -> bool:
        """Whether the load just completed: every generator serves it, the
        learner may drop its staged copy, and the waiting weights start."""
        if self.loading is None or self.pool.pending is not None:
            return False
        self.learner.send(WeightsLoaded(version=self.loading.version))
        self.loading, waiting, self.waiting = None, self.waiting, None
        if waiting is not None:
            self.add(waiting)
        return True


def run_sync(job: Job, metrics: MetricsLogger) -> None:
    """Mode sync (and april, with APRIL's over-provisioning): collect, train, sync."""
    cfg, c = job.cfg, job.controller
    target = cfg.generator.target_groups
    overprovision = cfg.generator.overprovision if cfg.mode == "april" else None
    for step in range(job.first_step, job.steps + 1):
        ts = job.clock.now()
        groups, gstats = c.collect(target, overprovision)
        tt = job.clock.now()
        job.batch(step, groups)
        done = job.learner.wait_for(StepDone, cfg.learner.step_timeout_s, f"step {step}",
                                    match=lambda m, step=step: m.step == step, key="learner.step_timeout_s")
        tw = job.clock.now()
        job.score_prompts(groups, done)
        if done.weights is not None:  # abandoned if a receiver was lost: the next sync covers it
            job.staged_as(done.weights)
            job.pool.update_weights(done.weights.version, done.weights.uri, done.weights.receivers)
            job.learner.send(WeightsLoaded(version=done.weights.version))
        now = job.clock.now()
        metrics.log(job.record(step, groups, gstats, done, train_wait_s=tw - tt, sync_s=now - tw, step_s=now - ts))
        job.steer(done)
        job.maybe_checkpoint(step)


def run_stream(job: Job, metrics: MetricsLogger) -> None:
    """Mode stream: generation, pruning, learning and weight loads at once."""
    cfg, c = job.cfg, job.controller
    target = cfg.generator.target_groups
    open_limit = math.ceil(cfg.generator.overprovision * target)
    sent: dict[int, tuple] = {}  # step -> (groups, rollout stats, time sent)
    step_sent = step_done = job.first_step - 1
    relay = UpdateRelay(job.pool, job.learner)
    stats = c.begin_step()
    t_done = job.clock.now()
    while step_done < job.steps:
        job.learner_busy = bool(sent)
        # New prompts keep open_limit groups in flight, less what waits
        # beyond one batch for the learner: generation runs at most one
        # batch ahead of the updates.
        ahead = max(0, c.num_ready - target)
        c.fill(max(0, open_limit - ahead) if step_sent < job.steps else 0)
        c.pump(stats, timeout_ms=5)
        if relay.poll():  # a new version serves everywhere
            c.abort_stale(job.pool.version)
        reply = job.learner.recv(timeout_ms=0)
        if isinstance(reply, StepDone) and reply.step in sent:
            groups, gstats, t_sent = sent.pop(reply.step)
            step_done = reply.step
            job.score_prompts(groups, reply)
            if reply.weights is not None:
                job.staged_as(reply.weights)
                relay.add(reply.weights)
            done_t = job.clock.now()
            # A step is the time between two updates (generation overlaps them).
            metrics.log(job.record(reply.step, groups, gstats, reply, train_wait_s=done_t - t_sent,
                                   sync_s=0.0, step_s=done_t - t_done))
            job.steer(reply)
            t_done = done_t
            job.maybe_checkpoint(reply.step)
        elif reply is not None:
            job.learner.skip(reply, f"step {step_done + 1}")
        elif sent:
            waited = job.clock.now() - min(t for _, _, t in sent.values())
            if waited > cfg.learner.step_timeout_s:
                raise job.learner.hangs(f"step {min(sent)}", waited, "learner.step_timeout_s")
        if not sent and c.num_ready >= target and step_sent < job.steps:
            # Bounded staleness: the update trains on the weights last staged.
            c.expire_stale(job.staged, keep=job.restored)
        if not sent and c.num_ready >= target and step_sent < job.steps:
            step_sent += 1
            groups = c.take_batch(target, stats)
            sent[step_sent] = (groups, stats, job.clock.now())
            job.batch(step_sent, groups)
            stats = c.begin_step()
    # The last weights reach the generators before the job ends.
    while relay.loading is not None:
        c.pump(stats, timeout_ms=100, max_messages=1)
        relay.poll()
    # Stop what still runs: its tokens wait in the buffer (saved after).
    c.stop_running()
