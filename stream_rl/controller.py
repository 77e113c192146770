"""The rollout controller: requests out, chunks in, pruner, rewards, buffer.

A rollout walks generator -> pruner -> buffer here: every chunk is appended
to its rollout, the pruner decides whether it keeps generating, and a finished
rollout is scored by the verifier and handed to the recycling buffer, which
releases groups once all members are finished.

Two schedules (`generator.mode`):
- `sync`: a step submits `target_groups` groups and waits for all of them,
  the synchronous GRPO baseline whose step waits for its slowest rollout;
- `april`: a step keeps `overprovision` x `target_groups` groups in flight,
  continuing partials before drawing new prompts, and ends as soon as
  `target_groups` groups are complete; every request still running is then
  aborted at once and its tokens wait in the buffer for the next step.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass, field

import msgspec

from stream_rl.buffer.recycling import RecyclingBuffer
from stream_rl.buffer.rollouts import Group, Rollout
from stream_rl.config import Config
from stream_rl.data import PromptSampler
from stream_rl.generator.client import GeneratorClient, GeneratorError
from stream_rl.protocol import RequestRejected, RolloutFinished, RolloutRequest, TokenChunk
from stream_rl.pruner.base import Pruner
from stream_rl.verifier import MathVerifier

log = logging.getLogger(__name__)

# Rejected requests in a row (none finishing between them) that end the job.
REJECTIONS_IN_A_ROW = 16


@dataclass
class RolloutStats:
    """One step's rollout numbers."""
    tokens_generated: int = 0
    rollouts_finished: int = 0
    truncated: int = 0  # finished by the length budget, not by EOS
    pruned_groups_dropped: int = 0  # fell below pruner.min_survivors (small_groups: drop)
    rejected: int = 0
    aborted: int = 0  # requests still running at the step's end, aborted
    seconds: float = 0.0
    # Requests in flight integrated over time (request-seconds): divided by
    # `seconds` it is the mean number of requests the engine was running.
    busy_request_s: float = 0.0
    response_lens: list[int] = field(default_factory=list)
    buffer: dict = field(default_factory=dict)  # buffer counters' change over the step
    pruner: dict = field(default_factory=dict)  # the pruner's metrics for the step

    @property
    def mean_in_flight(self) -> float:
        return self.busy_request_s / self.seconds if self.seconds else 0.0


def buffer_delta(before, after) -> dict:
    a, b = msgspec.structs.asdict(after), msgspec.structs.asdict(before)
    return {k: a[k] - b[k] for k in a}


def request_seed(run_seed: int, request_id: str) -> int:
    """A sampling seed that depends only on the run's seed and the request."""
    return zlib.crc32(f"{run_seed}:{request_id}".encode()) & 0x7FFFFFFF


class RolloutController:
    def __init__(self, cfg: Config, client: GeneratorClient, sampler: PromptSampler, tokenizer,
                 verifier: MathVerifier, pruner: Pruner, buffer: RecyclingBuffer | None = None):
        self.cfg = cfg
        self.client = client
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.verifier = verifier
        self.pruner = pruner
        b = cfg.buffer
        self.buffer = buffer or RecyclingBuffer(cfg.generator.group_size, b.max_groups, b.max_staleness,
                                                b.stale_policy, b.continuation_order)
        # Requests that stop at their rollout's decision point -> its length there.
        self.paused_at: dict[str, int] = {}
        # Rejections since a request last finished: past REJECTIONS_IN_A_ROW
        # the job cannot make progress and fails instead of drawing prompt
        # after prompt for a generator that refuses them all.
        self.rejected_in_a_row = 0

    # --- requests out ---------------------------------------------------------

    def _start(self, r: Rollout) -> None:
        g = self.cfg.generator
        rid = self.buffer.start(r)
        score_at = self.pruner.score_at(r)
        # Token-in continuation: the engine sees prompt + tokens so far and may
        # generate only what is left of the rollout's budget (and, if it is
        # still to be scored, their log-probs for the head's features).
        budget = r.tokens_left
        if score_at is not None and 0 < score_at + 1 - len(r.response_ids) < budget:
            # A rollout to be scored stops at its decision point (the step
            # that scores it samples token score_at + 1) and waits there for
            # the pruner: an abort sent after the score raced the engine,
            # which finished whole 300-token rollouts before their abort
            # arrived. Kept, it continues from there (prefix-cached).
            budget = score_at + 1 - len(r.response_ids)
            self.paused_at[rid] = score_at + 1
        self.client.submit(RolloutRequest(request_id=rid, group_id=r.group_id, prompt_ids=r.prompt_ids,
                                          response_ids=r.response_ids, max_tokens=budget,
                                          temperature=g.temperature, top_p=g.top_p,
                                          seed=request_seed(self.cfg.run.seed, rid) if g.seeded else None,
                                          score_at=score_at,
                                          response_logprobs=r.logprobs if score_at and r.response_ids else []))

    def _new_group(self) -> None:
        row = self.sampler.next()
        for r in self.buffer.new_group(row.prompt_ids, row.answer, self.cfg.generator.max_tokens):
            r.prompt_inclusion = row.inclusion
            self._start(r)

    def fill(self, open_limit: int) -> None:
        """Continue waiting partials, then draw prompts up to `open_limit` open groups."""
        if self.buffer.partials:
            partials, abort = self.buffer.take_partials(self.client.version)
            self.client.abort(abort)
            for r in partials:
                if r.tokens_left > 0:
                    self._start(r)
                else:  # restored at its budget: nothing left to generate
                    self.buffer.finish(r, "length", self._score(r))
        while self.buffer.num_open_groups < open_limit:
            self._new_group()

    # --- a step ---------------------------------------------------------------

    def collect(self, target_groups: int, timeout_s: float = 3600.0) -> tuple[list[Group], RolloutStats]:
        g = self.cfg.generator
        april = g.mode == "april"
        open_limit = math.ceil(g.overprovision * target_groups) if april else 0
        stats = RolloutStats()
        before = msgspec.structs.replace(self.buffer.stats)
        t0 = time.perf_counter()
        if april:
            self.fill(open_limit)
        else:
            for _ in range(max(0, target_groups - self.buffer.num_ready - self.buffer.num_open_groups)):
                self._new_group()
        # After each message: continue partials (rollouts kept at their
        # decision point too) and, under APRIL, refill.
        self._pump(lambda: self.buffer.num_ready >= target_groups, stats, timeout_s, "rollout step did not finish",
                   after=lambda: self.fill(open_limit))
        # The batch is ready: everything still generating becomes a partial
        # (its final tokens and abort notice arrive during the next step).
        running = list(self.buffer.running)
        self.client.abort(running)
        stats.aborted = len(running)
        stats.seconds = time.perf_counter() - t0
        stats.buffer = buffer_delta(before, self.buffer.stats)
        groups = self.buffer.take_ready(target_groups)
        stats.pruner = self.pruner.end_step(groups)
        return groups, stats

    def abort_stale(self, version: int) -> int:
        """Stop running rollouts whose oldest token is more than
        buffer.max_staleness versions behind `version` (stream mode, where
        requests outlive weight syncs): they return as partials, and taking
        them to continue restarts or drops them (buffer.stale_policy; "mask"
        lets them run and the learner masks their old tokens)."""
        bound = self.buffer.max_staleness  # None under "mask" (RecyclingBuffer)
        if bound is None:
            return 0
        stale = [rid for rid, r in self.buffer.running.items()
                 if r.versions and version - min(r.versions) > bound and rid not in self.buffer.pruning]
        self.client.abort(stale)
        return len(stale)

    def drain(self, timeout_s: float = 60.0) -> None:
        """Wait until every aborted request has reported its last tokens, so
        the buffer holds them all (before saving it or stopping)."""
        self._pump(lambda: not self.buffer.running, RolloutStats(), timeout_s, "aborted requests did not report")

    def _pump(self, done, stats: RolloutStats, timeout_s: float, what: str, after=None) -> None:
        """Receive and handle stream messages until `done()`; `after` runs
        after each message. Counts requests in flight over time in `stats`."""
        deadline = time.monotonic() + timeout_s
        last = time.perf_counter()
        while not done():
            if time.monotonic() > deadline:
                raise GeneratorError(f"{what} within {timeout_s:.0f} s ({len(self.buffer.running)} requests running)")
            msg = self.client.recv(timeout_ms=1000)
            now = time.perf_counter()
            stats.busy_request_s += len(self.buffer.running) * (now - last)
            last = now
            if msg is None:
                self.client.check_alive()
                continue
            self.handle(msg, stats)
            if after is not None:
                after()

    def _replace_group(self, group_id: str) -> None:
        """Drop an open group; a new prompt takes its place (april refills by
        itself)."""
        self.client.abort(self.buffer.drop_group(group_id))
        if self.cfg.generator.mode == "sync":
            self._new_group()

    # --- messages in ----------------------------------------------------------

    def _score(self, r: Rollout) -> float:
        return self.verifier.score(self.tokenizer.decode(r.response_ids, skip_special_tokens=True), r.answer)

    def handle(self, msg, stats: RolloutStats) -> None:
        if isinstance(msg, TokenChunk):
            r = self.buffer.on_chunk(msg)
            if r is None:
                return  # a late chunk of a dropped group
            stats.tokens_generated += len(msg.token_ids)
            members = self.buffer.groups[r.group_id]
            if not self.pruner.review(r, members):  # the pruner counts its decisions
                self.buffer.prune(msg.request_id)
                self.client.abort([msg.request_id])
                if self.pruner.group_too_small(members):
                    stats.pruned_groups_dropped += 1
                    self._replace_group(r.group_id)
        elif isinstance(msg, RolloutFinished):
            if msg.request_id in self.buffer.running:
                self.rejected_in_a_row = 0
            at = self.paused_at.pop(msg.request_id, None)
            r = self.buffer.running.get(msg.request_id)
            if at is not None and msg.finish_reason == "length" and r is not None and len(r.response_ids) == at \
                    and msg.request_id not in self.buffer.pruning:
                # Stopped at its decision point and kept: it continues (fill).
                self.buffer.on_finished(msg.request_id, "abort", paused=True)
                return
            reward = None
            if self.buffer.needs_reward(msg.request_id, msg.finish_reason):
                r = self.buffer.running[msg.request_id]
                reward = self._score(r)
                stats.rollouts_finished += 1
                stats.truncated += msg.finish_reason != "stop"
                stats.response_lens.append(len(r.response_ids))
            self.buffer.on_finished(msg.request_id, msg.finish_reason, reward)
        elif isinstance(msg, RequestRejected):
            group_id = self.buffer.group_of(msg.request_id)
            if group_id is None:
                return
            stats.rejected += 1
            self.rejected_in_a_row += 1
            limit = max(REJECTIONS_IN_A_ROW, 2 * self.cfg.generator.target_groups)
            if self.rejected_in_a_row >= limit:
                raise GeneratorError(f"the generator rejected {self.rejected_in_a_row} requests in a row and "
                                     f"finished none: this job cannot make progress. The last rejection, of "
                                     f"{msg.request_id}: {msg.error}")
            log.error("generator rejected %s: %s; dropping group %s and drawing a new prompt",
                      msg.request_id, msg.error, group_id)
            self._replace_group(group_id)
        else:
            log.warning("unexpected message during rollout: %s", type(msg).__name__)
