"""`stream-rl train` and `stream-rl controller`: the job, step after step.

The controller (this process) owns the generators' streams, the pruner and
the recycling buffer; complete groups go to the learner process as
`TrainBatch`es, and the weights it stages go to the generators as
`UpdateWeights`. Two schedules (`mode`):

- `sync`, the synchronous GRPO baseline: generate `target_groups` groups to
  completion, train, sync, and only then generate again;
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

import json
import logging
import math
import statistics
import time
from pathlib import Path

import msgspec

from stream_rl.config import Config
from stream_rl.controller import RolloutController, RolloutStats, buffer_delta
from stream_rl.data import DppoPromptSampler, PromptSampler
from stream_rl.generator.client import GeneratorClient, GeneratorProcess
from stream_rl.generator.pool import GeneratorPool
from stream_rl.learner.checkpoint import (commit_checkpoint, find_checkpoint, load_controller_state,
                                          save_controller_state, staging_path)
from stream_rl.learner.client import LearnerClient, LearnerError, LearnerProcess
from stream_rl.learner.samples import samples_from_groups
from stream_rl.metrics import MetricsLogger, read_metrics
from stream_rl.protocol import (CheckpointSaved, Hello, LearnerReady, SaveCheckpoint, Shutdown, StepDone, SyncWeights,
                                TrainBatch, WeightsLoaded, WeightsStaged)
from stream_rl.placement import allowed_cores, for_job, pin
from stream_rl.preflight import CheckedJob, check_job
from stream_rl.pruner.base import make_pruner
from stream_rl.pruner.quality import inclusion_weighted_mean
from stream_rl.verifier import make_verifier

log = logging.getLogger(__name__)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def summarize(records: list[dict]) -> dict:
    """Reward of the first and last 20% of steps, and run totals."""
    n = len(records)
    k = max(1, n // 5)
    first = _mean(r["reward_policy_mean"] for r in records[:k])
    last = _mean(r["reward_policy_mean"] for r in records[-k:])
    return {
        "steps": n,
        "policy_version": records[-1]["policy_version"] if records else 0,
        "reward_first_20pct": first,
        "reward_last_20pct": last,
        "reward_rise": last - first,
        "tokens_generated": sum(r["tokens_generated"] for r in records),
        "tokens_trained": sum(r["tokens_trained"] for r in records),
        "wall_s": records[-1]["wall_s"] if records else 0.0,
        # The run's mean generation rate: every generated token over the training wall time.
        "gen_tokens_per_s": (sum(r["tokens_generated"] for r in records) / records[-1]["wall_s"]
                             if records and records[-1]["wall_s"] else 0.0),
    }


# --- starting the roles ----------------------------------------------------------------

def train(cfg: Config, out_dir: str | Path | None = None, max_steps: int | None = None,
          generator: GeneratorClient | list[GeneratorClient] | None = None, resume: bool = False) -> dict:
    """Every role on this host: the learner and `generator.count` generator
    processes, and the controller here. `generator` reuses running
    generator(s) instead (tests share one engine); they may serve other
    weights than cfg.model.path's, so the learner's are synced first.
    `resume` continues from the newest complete checkpoint in OUT."""
    t_start = time.time()
    checked = check_job(cfg)  # before anything starts: errors in seconds, not after the engines load
    out = Path(out_dir or cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = find_checkpoint(out / "checkpoint") if resume else None
    owned = generator is None
    # Engines started here get cores of their own (generator.engine_cpus).
    placement = for_job(cfg) if owned else None
    own_cores = allowed_cores()
    if placement is not None:
        log.info("cores: engine(s) %s; front end(s), controller and learner %s", placement.engines, placement.rest)
    learner = LearnerProcess(cfg, out, resume=ckpt, cpus=placement and placement.rest)  # starts while the engines load
    gens: list[GeneratorClient] = []
    try:
        if owned:
            gens = [GeneratorProcess(cfg, out, index=i, wait=False, placement=placement)
                    for i in range(cfg.generator.count)]
            if placement is not None:
                pin(placement.rest)
            for g in gens:
                g.wait_ready(cfg.generator.startup_timeout_s)
        else:
            gens = list(generator) if isinstance(generator, list) else [generator]
        ready = learner.wait_ready(cfg.learner.startup_timeout_s)
        return run_controller(cfg, out, GeneratorPool(gens), learner, ready, max_steps, t_start,
                              fresh_generators=owned, resume_from=ckpt, checked=checked)
    finally:
        learner.stop()
        if owned:
            for g in gens:
                g.stop()
        if placement is not None:
            pin(own_cores)


def controller(cfg: Config, out_dir: str | Path | None = None, max_steps: int | None = None,
               resume: bool = False) -> dict:
    """`stream-rl controller`: the generators and the learner run elsewhere
    (their addresses are in the config); connect, run the job, and tell every
    role to exit when it ends (the learner saves its final model first)."""
    t_start = time.time()
    checked = check_job(cfg)
    out = Path(out_dir or cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = find_checkpoint(out / "checkpoint") if resume else None
    learner = LearnerClient(cfg)
    gens = [GeneratorClient(cfg, i) for i in range(cfg.generator.count)]
    try:
        for g in gens:
            # A generator that is already up (this job resumed) answers with
            # the version it serves; a starting one says so when ready.
            g.requests.send(Hello())
            g.wait_ready(cfg.generator.startup_timeout_s)
        ready = learner.wait_for(LearnerReady, cfg.learner.startup_timeout_s, "the learner to start")
        return run_controller(cfg, out, GeneratorPool(gens), learner, ready, max_steps, t_start,
                              fresh_generators=all(g.version == 0 for g in gens), resume_from=ckpt, checked=checked)
    finally:
        # Queued messages get a moment to leave before the sockets close.
        learner.send(Shutdown())
        learner.batches.close(linger_ms=5000)
        learner.close()
        for g in gens:
            g.requests.send(Shutdown())
            g.requests.close(linger_ms=5000)
            g.close()


# --- the controller ------------------------------------------------------------------

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
            self.loading = staged
            self.pool.begin_update(staged.version, staged.uri)
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


class Job:
    """The controller's side of a run: rollouts, batches, syncs, metrics."""

    def __init__(self, cfg: Config, out: Path, pool: GeneratorPool, learner: LearnerClient, steps: int,
                 checked: CheckedJob):
        self.cfg, self.out, self.pool, self.learner, self.steps = cfg, out, pool, learner, steps
        tokenizer, dataset = checked.tokenizer, checked.dataset
        log.info("loaded %d prompts from %s (%d set aside as too long)", len(dataset.rows), dataset.source,
                 len(dataset.overlong))
        sampler = PromptSampler(dataset, cfg.data.shuffle, cfg.run.seed)
        if cfg.data.dppo_prompt_rate > 0:
            sampler = DppoPromptSampler(sampler, cfg.data.dppo_prompt_rate, cfg.run.seed)
        self.sampler = sampler
        # The sync baseline collects each step's groups to completion.
        rcfg = cfg if cfg.mode == "stream" else msgspec.structs.replace(
            cfg, generator=msgspec.structs.replace(cfg.generator, mode="sync"))
        self.controller = RolloutController(rcfg, pool, sampler, tokenizer, make_verifier(cfg.data),
                                            make_pruner(cfg))
        self.staged = 0  # highest version the learner was asked to stage
        self.trained_on: dict[int, int] = {}  # step -> the version its update started from
        self.records: list[dict] = []
        self.first_step = 1
        self.restored: set[str] = set()  # groups a checkpoint handed over: trained, never dropped as stale
        self.wall_offset = 0.0  # wall time of the steps before a resume
        self.t0 = time.time()

    def restore(self, path: Path) -> int:
        """Continue from the job checkpoint at `path`: the pruner, the buffer,
        the prompt sampler, the step, and the metrics up to that step (later
        lines belong to the run that was killed). Returns the step."""
        state = load_controller_state(path, pruner=self.controller.pruner, buffer=self.controller.buffer,
                                      sampler=self.sampler)
        step = state["step"]
        self.staged = state["staged"]
        self.first_step = step + 1
        # Their tokens predate the resume; the versions the killed run loaded
        # after the checkpoint make them look staler than they are.
        buf = self.controller.buffer
        self.restored = {g.group_id for g in buf.ready} | set(buf.groups)
        metrics = self.out / "metrics.jsonl"
        self.records = [r for r in read_metrics(metrics) if r["step"] <= step] if metrics.exists() else []
        metrics.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.wall_offset = self.records[-1]["wall_s"] if self.records else 0.0
        return step

    # --- weights ---

    def next_version(self) -> int:
        self.staged = max(self.staged, max(c.version for c in self.pool.clients)) + 1
        return self.staged

    def sync_due(self, step: int) -> bool:
        return step % self.cfg.weights_sync.every_steps == 0 or step == self.steps

    def sync_now(self) -> None:
        """Stage the learner's current weights and load them everywhere (start)."""
        self.learner.send(SyncWeights(version=self.next_version()))
        staged = self.learner.wait_for(WeightsStaged, self.cfg.learner.startup_timeout_s, "staged weights")
        self.pool.update_weights(staged.version, staged.uri)
        self.learner.send(WeightsLoaded(version=staged.version))

    # --- records ---

    def record(self, step: int, groups, gstats: RolloutStats, done: StepDone, **timing) -> dict:
        kept = [r for g in groups for r in g.survivors if r.reward is not None]
        versions = [v for g in groups for r in g.survivors for v in r.versions]
        rec = {
            "step": step,
            "policy_version": self.pool.version,
            "reward_mean": _mean(r for g in groups for r in g.rewards),
            # The policy's, not the survivors': pruning may bias the kept set.
            "reward_policy_mean": inclusion_weighted_mean([r.reward for r in kept], [r.keep_prob for r in kept]),
            "groups": len(groups),
            "group_ids": [g.group_id for g in groups],  # the ledger: each trained once, even across resumes
            "zero_variance_groups": sum(len(set(g.rewards)) == 1 for g in groups),
            "dppo_prompts_skipped": getattr(self.sampler, "skipped", 0),
            "tokens_generated": gstats.tokens_generated,
            "tokens_in_batch": sum(g.num_tokens for g in groups),
            "gen_tokens_per_s": gstats.tokens_generated / gstats.seconds if gstats.seconds else 0.0,
            "requests_in_flight_mean": gstats.mean_in_flight,
            "aborted_at_step_end": gstats.aborted,
            "partials_continued": gstats.buffer.get("partials_continued", 0),
            "stale_restarted": gstats.buffer.get("stale_restarted", 0),
            "stale_dropped_groups": gstats.buffer.get("stale_dropped_groups", 0),
            "tokens_discarded": gstats.buffer.get("tokens_discarded", 0),
            "open_groups": self.controller.buffer.num_open_groups,
            "ready_groups": self.controller.buffer.num_ready,
            "response_len_mean": _mean(gstats.response_lens),
            "truncated_frac": gstats.truncated / max(1, gstats.rollouts_finished),
            "rejected_requests": gstats.rejected,
            "pruned_groups_dropped": gstats.pruned_groups_dropped,
            "tokens_per_kept_rollout": gstats.tokens_generated / max(1, sum(len(g.survivors) for g in groups)),
            **{f"prune/{k}": v for k, v in gstats.pruner.items()},
            # Versions the batch lags the weights it updates.
            "version_lag_max": self.trained_on[step] - min(versions) if versions else 0,
            "gen_s": gstats.seconds,
            # The latest weight load, slowest generator: its time from the
            # request to serving, and how long generation stood still for it.
            "weights_load_s": max((u.load_s for u in self.pool.last_update.values()), default=0.0),
            "weights_pause_s": max((u.pause_s for u in self.pool.last_update.values()), default=0.0),
            **timing,
            "wall_s": time.time() - self.t0,
            **done.stats,
        }
        rec["trained_tokens_per_s"] = rec["tokens_trained"] / rec["step_s"] if rec.get("step_s") else 0.0
        self.records.append(rec)
        return rec

    def batch(self, step: int, groups) -> None:
        if isinstance(self.sampler, DppoPromptSampler):
            # History score: the group's mean |A| (0 for a zero-variance group left out).
            lc = self.cfg.learner
            adv: dict[str, list[float]] = {}
            for s in samples_from_groups(groups, lc.adv_eps, lc.drop_zero_variance_groups, lc.mask_truncated,
                                         correction=lc.pruning_correction, scale=self.cfg.adv_std).samples:
                adv.setdefault(s.group_id, []).append(abs(s.advantage))
            for g in groups:
                a = adv.get(g.group_id, [0.0])
                self.sampler.record(g.rollouts[0].prompt_ids, sum(a) / len(a))
        self.trained_on[step] = self.staged
        self.learner.send(TrainBatch(step=step, groups=groups,
                                     sync_version=self.next_version() if self.sync_due(step) else None))

    # --- the two schedules ---

    def run_sync(self, metrics: MetricsLogger) -> None:
        target = self.cfg.generator.target_groups
        for step in range(self.first_step, self.steps + 1):
            ts = time.perf_counter()
            groups, gstats = self.controller.collect(target)
            tt = time.perf_counter()
            self.batch(step, groups)
            done = self.learner.wait_for(StepDone, 3600.0, f"step {step}")
            tw = time.perf_counter()
            if done.weights is not None:
                self.pool.update_weights(done.weights.version, done.weights.uri)
                self.learner.send(WeightsLoaded(version=done.weights.version))
            now = time.perf_counter()
            metrics.log(self.record(step, groups, gstats, done, train_wait_s=tw - tt, sync_s=now - tw,
                                    step_s=now - ts))
            self.maybe_checkpoint(step)

    def run_stream(self, metrics: MetricsLogger) -> None:
        cfg, c, buf = self.cfg, self.controller, self.controller.buffer
        target = cfg.generator.target_groups
        open_limit = math.ceil(cfg.generator.overprovision * target)
        sent: dict[int, tuple] = {}  # step -> (groups, rollout stats, time sent)
        step_sent = step_done = self.first_step - 1
        relay = UpdateRelay(self.pool, self.learner)
        stats, before, t_mark = RolloutStats(), msgspec.structs.replace(buf.stats), time.perf_counter()
        last = t_done = t_mark
        while step_done < self.steps:
            # New prompts keep open_limit groups in flight, less what waits
            # beyond one batch for the learner: generation runs at most one
            # batch ahead of the updates.
            ahead = max(0, buf.num_ready - target)
            c.fill(max(0, open_limit - ahead) if step_sent < self.steps else 0)
            msg = self.pool.recv(timeout_ms=5)
            now = time.perf_counter()
            stats.busy_request_s += len(buf.running) * (now - last)
            last = now
            if msg is None:
                self.pool.check_alive()
            handled = 0
            while msg is not None:  # and what else has arrived, before the bookkeeping below
                c.handle(msg, stats)
                handled += 1
                msg = self.pool.recv(timeout_ms=0) if handled < 64 else None
            if relay.poll():  # a new version serves everywhere
                c.abort_stale(self.pool.version)
            reply = self.learner.recv(timeout_ms=0)
            if isinstance(reply, StepDone):
                groups, gstats, t_sent = sent.pop(reply.step)
                step_done = reply.step
                if reply.weights is not None:
                    relay.add(reply.weights)
                done_t = time.perf_counter()
                # A step is the time between two updates (generation overlaps them).
                metrics.log(self.record(reply.step, groups, gstats, reply, train_wait_s=done_t - t_sent,
                                        sync_s=0.0, step_s=done_t - t_done))
                t_done = done_t
                self.maybe_checkpoint(reply.step)
            elif reply is not None:
                log.warning("unexpected message from the learner: %s", type(reply).__name__)
            if not sent and buf.num_ready >= target and step_sent < self.steps:
                # Bounded staleness: the update trains on the weights last staged.
                buf.expire_stale_ready(self.staged, keep=self.restored)
            if not sent and buf.num_ready >= target and step_sent < self.steps:
                groups = buf.take_ready(target)
                step_sent += 1
                stats.seconds = time.perf_counter() - t_mark
                stats.buffer = buffer_delta(before, buf.stats)
                stats.pruner = c.pruner.end_step(groups)
                sent[step_sent] = (groups, stats, time.perf_counter())
                self.batch(step_sent, groups)
                stats, before, t_mark = RolloutStats(), msgspec.structs.replace(buf.stats), time.perf_counter()
        # The last weights reach the generators before the job ends.
        while relay.loading is not None:
            msg = self.pool.recv(timeout_ms=100)
            if msg is None:
                self.pool.check_alive()
            else:
                c.handle(msg, stats)
            relay.poll()
        # Stop what still runs: its tokens wait in the buffer (saved below).
        c.client.abort(list(buf.running))

    # --- checkpoints ---

    def checkpoint(self, step: int) -> Path:
        """Learner, head, optimizer (the learner process writes them), pruner,
        buffer with its partials, sampler and step, assembled beside the last
        checkpoint and swapped in whole. Taken between an update and the next
        batch, so the learner's state and the buffer agree on `step`."""
        path = self.out / "checkpoint"
        nxt = staging_path(path)
        self.learner.send(SaveCheckpoint(path=str(nxt), step=step, version=self.staged))
        self.learner.wait_for(CheckpointSaved, 600.0, f"the checkpoint of step {step}")
        save_controller_state(nxt, pruner=self.controller.pruner, buffer=self.controller.buffer,
                              state={"step": step, "staged": self.staged, "sampler": self.sampler.state_dict()})
        return commit_checkpoint(nxt, path)

    def maybe_checkpoint(self, step: int) -> None:
        every = self.cfg.run.checkpoint_every
        if every and step % every == 0 and step < self.steps:
            self.checkpoint(step)


def run_controller(cfg: Config, out: Path, pool: GeneratorPool, learner: LearnerClient, ready: LearnerReady,
                   max_steps: int | None, t_start: float, fresh_generators: bool, checked: CheckedJob,
                   resume_from: Path | None = None) -> dict:
    (out / "config.json").write_bytes(msgspec.json.format(msgspec.json.encode(cfg)))
    steps = max_steps or cfg.run.max_steps
    job = Job(cfg, out, pool, learner, steps, checked)
    if resume_from is None:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    else:
        step = job.restore(resume_from)
        if ready.step != step:
            raise LearnerError(f"the learner resumed at step {ready.step}, the controller's checkpoint "
                               f"{resume_from} is step {step}: start both from the same checkpoint")
        log.info("resuming after step %d from %s", step, resume_from)
    if ready.needs_sync or not fresh_generators:
        # The generators serve the model path's weights (or others): start
        # from the learner's, with its quality head.
        job.sync_now()
    log.info("%s job ready after %.1f s (%d generator(s), %d learner rank(s))", cfg.mode,
             time.time() - t_start, len(pool.clients), ready.ranks)
    metrics = MetricsLogger(out, steps, cfg.run.progress)
    job.t0 = time.time() - job.wall_offset
    try:
        (job.run_stream if cfg.mode == "stream" else job.run_sync)(metrics)
        # Partials left in the buffer are kept, with their last tokens, for a
        # later run to continue (resume).
        job.controller.drain()
        job.controller.buffer.save(out / "buffer.msgpack")
        job.checkpoint(job.records[-1]["step"] if job.records else job.first_step - 1)
    finally:
        metrics.close()
    records = job.records
    summary = summarize(records)
    summary["mode"] = cfg.mode
    summary["requests_per_generator"] = list(pool.submitted)
    summary["generator_versions"] = [c.version for c in pool.clients]  # at the end: the last sync included
    summary["startup_s"] = job.t0 - t_start
    summary["step_s_median"] = statistics.median(r["step_s"] for r in records) if records else 0.0
    summary.update({f"prune/{k}": v for k, v in job.controller.pruner.summary().items()})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
