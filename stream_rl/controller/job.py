"""The controller's side of a run: its rollouts, batches, weight syncs,
metrics and checkpoints (`controller/schedules.py` runs its steps)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from stream_rl.clock import REAL, Clock
from stream_rl.config import Config
from stream_rl.controller.export import RolloutExport
from stream_rl.controller.rollouts import RolloutController, RolloutStats
from stream_rl.controller.sparsity import SparsitySchedule
from stream_rl.data import DppoPromptSampler, PromptSampler
from stream_rl.generator.pool import GeneratorPool
from stream_rl.learner.checkpoint import commit_checkpoint, load_controller_state, save_controller_state, staging_path
from stream_rl.learner.client import LearnerClient
from stream_rl.metrics import mean, read_metrics
from stream_rl.preflight import CheckedJob
from stream_rl.protocol import (CheckpointSaved, Group, SaveCheckpoint, StepDone, SyncWeights, TrainBatch,
                                WeightsLoaded, WeightsStaged)
from stream_rl.pruner import make_pruner
from stream_rl.pruner.quality import inclusion_weighted_mean
from stream_rl.verifier import make_verifier

log = logging.getLogger(__name__)


class Job:
    """The controller's side of a run: rollouts, batches, syncs, metrics."""

    def __init__(self, cfg: Config, out: Path, pool: GeneratorPool, learner: LearnerClient, steps: int,
                 checked: CheckedJob, clock: Clock = REAL):
        self.clock = clock  # every time read by the job and its schedule (the simulator's is virtual)
        self.cfg, self.out, self.pool, self.learner, self.steps = cfg, out, pool, learner, steps
        tokenizer, dataset = checked.tokenizer, checked.dataset
        log.info("loaded %d prompts from %s (%d set aside as too long)", len(dataset.rows), dataset.source,
                 len(dataset.overlong))
        sampler = PromptSampler(dataset, cfg.data.shuffle, cfg.run.seed)
        if cfg.data.dppo_prompt_rate > 0:
            sampler = DppoPromptSampler(sampler, cfg.data.dppo_prompt_rate, cfg.run.seed)
        self.sampler = sampler
        self.controller = RolloutController(cfg, pool, sampler, tokenizer, make_verifier(cfg.data),
                                            make_pruner(cfg), clock=clock)
        self.staged = 0  # highest version the learner staged
        self.trained_on: dict[int, int] = {}  # step -> the version its update started from
        self.records: list[dict] = []
        self.first_step = 1
        self.restored: set[str] = set()  # groups a checkpoint handed over: trained, never dropped as stale
        self.learner_busy = False  # a batch is out (stream): a sync now would queue behind its update
        self.controller.on_idle = self.rejoin
        self.sparsity = SparsitySchedule(cfg.sparsity)  # the engines' attention window (docs/sparse-rollouts.md)
        self.wall_offset = 0.0  # wall time of the steps before a resume
        self.t0 = self.clock.wall()
        # Every trained batch as Parquet (run.export_rollouts), one file per step.
        self.export = RolloutExport(cfg.run.export_rollouts) if cfg.run.export_rollouts else None

    def restore(self, path: Path) -> int:
        """Continue from the job checkpoint at `path`: the pruner, the buffer,
        the prompt sampler, the step, and the metrics up to that step (later
        lines belong to the run that was killed). Returns the step."""
        state = load_controller_state(path, pruner=self.controller.pruner, buffer=self.controller.buffer,
                                      sampler=self.sampler)
        step = state["step"]
        self.staged = state["staged"]
        if "sparsity" in state:
            self.sparsity.load_state_dict(state["sparsity"])
        self.first_step = step + 1
        # Their tokens predate the resume; the versions the killed run loaded
        # after the checkpoint make them look staler than they are.
        self.restored = self.controller.held_groups()
        metrics = self.out / "metrics.jsonl"
        self.records = [r for r in read_metrics(metrics) if r["step"] <= step] if metrics.exists() else []
        metrics.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        self.wall_offset = self.records[-1]["wall_s"] if self.records else 0.0
        if self.export:  # the killed run's batches after the checkpoint are redone
            self.export.drop_after(step)
        return step

    # --- weights ---

    def next_version(self) -> int:
        """The version weights staged now take: newer than any asked for or served."""
        return max(self.staged, max(c.version for c in self.pool.clients)) + 1

    def staged_as(self, staged: WeightsStaged) -> None:
        """The learner staged weights (under the version it was given, or a
        later one of its own: `RolloutSource.update_weights`)."""
        self.staged = max(self.staged, staged.version)

    def sync_due(self, step: int) -> bool:
        return step % self.cfg.weights_sync.every_steps == 0 or step == self.steps

    def sync_now(self) -> None:
        """Stage the learner's current weights and load them on every
        generator serving or rejoining (at start; a rejoin with none serving)."""
        self.learner.send(SyncWeights(version=self.next_version(), receivers=self.pool.receivers()))
        staged = self.learner.wait_for(WeightsStaged, self.cfg.learner.startup_timeout_s, "staged weights")
        self.staged_as(staged)
        self.pool.update_weights(staged.version, staged.uri, staged.receivers)
        self.learner.send(WeightsLoaded(version=staged.version))

    def rejoin(self) -> None:
        """A restarted generator waits for weights while none serves (one
        generator, or all lost): stage them now if the learner is free;
        with others serving it rejoins at the next sync (`batch`)."""
        if self.pool.joining and not self.pool.live and not self.learner_busy:
            log.warning("generator(s) %s rejoin with none serving: syncing the weights now", self.pool.joining)
            self.sync_now()

    # --- records ---

    def record(self, step: int, groups, gstats: RolloutStats, done: StepDone, **timing) -> dict:
        kept = [r for g in groups for r in g.survivors if r.reward is not None]
        versions = [v for g in groups for r in g.survivors for v in r.versions]
        rec = {
            "step": step,
            "policy_version": self.pool.version,
            "reward_mean": mean(r for g in groups for r in g.rewards),
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
            "open_groups": self.controller.num_open,
            "ready_groups": self.controller.num_ready,
            "response_len_mean": mean(gstats.response_lens),
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
            # Replies skipped on the learner's socket so far (duplicates, strays, forgeries).
            "stray_learner_replies": self.learner.stray,
            # Messages that failed to decode on the controller's sockets so far
            # (the learner's replies, every generator's stream).
            "rejected_messages": self.learner.replies.rejected + sum(c.stream.rejected for c in self.pool.clients),
            # Generators lost and restarted so far; rollouts and tokens a loss
            # left running, continued on the others instead of regenerated.
            **self.pool.stats(),
            "tokens_recovered": gstats.tokens_recovered,
            "chunks_out_of_order": gstats.chunks_out_of_order,
            **timing,
            "wall_s": self.clock.wall() - self.t0,
            "sparsity/window": self.sparsity.window,  # the engines' attention window now (0: dense)
        }
        # The update's metrics (a learner of one's own names its own): none
        # replaces the job's.
        rec.update({k: v for k, v in done.stats.items() if k not in rec})
        rec["trained_tokens_per_s"] = rec.get("tokens_trained", 0) / rec["step_s"] if rec.get("step_s") else 0.0
        self.records.append(rec)
        return rec

    def batch(self, step: int, groups: list[Group]) -> None:
        self.trained_on[step] = self.staged
        # A generator waiting to rejoin gets the weights with this update.
        sync = self.sync_due(step) or bool(self.pool.joining)
        self.learner.send(TrainBatch(step=step, groups=groups, sync_version=self.next_version(), sync_due=sync,
                                     receivers=self.pool.receivers()))
        if self.export:  # while the learner trains on it
            self.export.write(step, groups)

    def steer(self, done: StepDone) -> None:
        """The sparsity schedule after an update: a new window goes to every engine."""
        window = self.sparsity.observe(done.stats)
        if window is not None:
            self.pool.set_window(window)

    def score_prompts(self, groups: list[Group], done: StepDone) -> None:
        """DPPO's prompt history: each trained group's mean |A|, as the
        learner computed it (0 for a group it left out)."""
        if isinstance(self.sampler, DppoPromptSampler):
            for g in groups:
                self.sampler.record(g.rollouts[0].prompt_ids, done.group_abs_advantage.get(g.group_id, 0.0))

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
                              state={"step": step, "staged": self.staged, "sampler": self.sampler.state_dict(),
                                     "sparsity": self.sparsity.state_dict()})
        return commit_checkpoint(nxt, path)

    def maybe_checkpoint(self, step: int) -> None:
        every = self.cfg.run.checkpoint_every
        if every and step % every == 0 and step < self.steps:
            self.checkpoint(step)


