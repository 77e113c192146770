"""The rollout controller: requests out, chunks in, pruner, rewards, buffer.

A rollout walks generator -> pruner -> buffer here: every chunk is appended
to its rollout, the pruner decides whether it keeps generating, and a finished
rollout is scored by the verifier and handed to the recycling buffer, which
releases groups once all members are finished. The job (`controller/job.py`)
talks to it through a step's methods (`begin_step`, `pump`, `fill`,
`take_batch`, `collect`), not through the buffer.

`collect` is a synchronous step, in one of two ways:
- exactly `target_groups` groups, each waited for to completion (the sync
  GRPO baseline, whose step waits for its slowest rollout);
- with `overprovision` (APRIL): `overprovision` x `target_groups` groups in
  flight, partials continued before new prompts are drawn; the step ends
  as soon as `target_groups` groups are complete, and every request still
  running is aborted at once, its tokens waiting in the buffer for the next.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import msgspec

from stream_rl.buffer.recycling import RecyclingBuffer
from stream_rl.buffer.rollouts import BufferError
from stream_rl.clock import REAL, Clock
from stream_rl.config import Config
from stream_rl.data import PromptSampler
from stream_rl.generator.client import GeneratorClient, GeneratorError
from stream_rl.protocol import Group, RequestRejected, Rollout, RolloutFinished, RolloutRequest, TokenChunk
from stream_rl.pruner.base import Pruner
from stream_rl.transport import ThrottledLog
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
    tokens_recovered: int = 0  # streamed by a generator that was lost, kept to continue elsewhere
    chunks_out_of_order: int = 0  # a chunk lost (a second reader on a stream?) or repeated
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
                 verifier: MathVerifier, pruner: Pruner, buffer: RecyclingBuffer | None = None,
                 clock: Clock = REAL):
        self.cfg = cfg
        self.clock = clock  # every time read here (the simulator's is virtual)
        self.client = client
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.verifier = verifier
        self.pruner = pruner
        b = cfg.buffer
        self.buffer = buffer or RecyclingBuffer(cfg.generator.group_size, b.max_groups, b.max_staleness,
                                                b.stale_policy, b.continuation_order)
        self._last = self.clock.now()  # when requests in flight were last counted
        # Rejections since a request last finished: past REJECTIONS_IN_A_ROW
        # the job cannot make progress and fails instead of drawing prompt
        # after prompt for a generator that refuses them all.
        self.rejected_in_a_row = 0
        self._refill = False  # set by each collect: whether a dropped group is replaced at once
        # Called when a wait for the generators times out: the job's chance to
        # act while nothing streams (a generator rejoining with none serving).
        self.on_idle: Callable[[], None] = lambda: None
        # Requests whose stream skipped or repeated a chunk: stopped, their
        # rollouts continue from the tokens before it.
        self.out_of_order: set[str] = set()
        self._order_log = ThrottledLog(log)
        self._step = (self.clock.now(), msgspec.structs.replace(self.buffer.stats))

    # --- requests out ---------------------------------------------------------

    def _start(self, r: Rollout) -> None:
        g = self.cfg.generator
        score_at = self.pruner.score_at(r)
        # Token-in continuation: the engine sees prompt + tokens so far and may
        # generate only what is left of the rollout's budget (and, if it is
        # still to be scored, their log-probs for the head's features).
        budget, pause_at = r.tokens_left, None
        if score_at is not None and 0 < score_at + 1 - len(r.response_ids) < budget:
            # A rollout to be scored stops at its decision point (the step
            # that scores it samples token score_at + 1) and waits there for
            # the pruner: an abort sent after the score raced the engine,
            # which finished whole 300-token rollouts before their abort
            # arrived. Kept, it continues from there (prefix-cached).
            budget = score_at + 1 - len(r.response_ids)
            pause_at = score_at + 1
        rid = self.buffer.start(r, pause_at)
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

    def begin_step(self) -> RolloutStats:
        """A new step's numbers, counted from now."""
        self._step = (self.clock.now(), msgspec.structs.replace(self.buffer.stats))
        return RolloutStats()

    def pump(self, stats: RolloutStats, timeout_ms: int, max_messages: int = 64) -> int:
        """Wait up to `timeout_ms` for the generators' messages and handle
        what arrived, up to `max_messages`; counts requests in flight over
        the wait. Returns how many were handled."""
        msg = self.client.recv(timeout_ms=timeout_ms)
        now = self.clock.now()
        stats.busy_request_s += len(self.buffer.running) * (now - self._last)
        self._last = now
        if msg is None:
            self.client.check_alive()
            self.on_idle()
            return 0
        handled = 0
        while msg is not None:
            self.handle(msg, stats)
            handled += 1
            msg = self.client.recv(timeout_ms=0) if handled < max_messages else None
        return handled

    def take_batch(self, n: int, stats: RolloutStats) -> list[Group]:
        """The first `n` complete groups, ending the step `stats` counts."""
        groups = self.buffer.take_ready(n)
        t0, before = self._step
        stats.seconds = self.clock.now() - t0
        stats.buffer = buffer_delta(before, self.buffer.stats)
        stats.pruner = self.pruner.end_step(groups)
        return groups

    def collect(self, target_groups: int, overprovision: float | None = None,
                timeout_s: float = 3600.0) -> tuple[list[Group], RolloutStats]:
        """A synchronous step: `target_groups` complete groups, generated to
        completion, or with `overprovision` as APRIL (module docstring)."""
        self._refill = overprovision is None  # a dropped group is replaced here, not by fill
        open_limit = math.ceil(overprovision * target_groups) if overprovision else 0
        stats = self.begin_step()
        if overprovision:
            self.fill(open_limit)
        else:
            for _ in range(max(0, target_groups - self.buffer.num_ready - self.buffer.num_open_groups)):
                self._new_group()
        deadline = self.clock.now() + timeout_s
        while self.buffer.num_ready < target_groups:
            if self.clock.now() > deadline:
                raise GeneratorError(f"rollout step did not finish within {timeout_s:.0f} s "
                                     f"({len(self.buffer.running)} requests running)")
            # After each message: continue partials (rollouts kept at their
            # decision point too) and, under APRIL, refill.
            if self.pump(stats, 1000, max_messages=1):
                self.fill(open_limit)
        # The batch is ready: everything still generating becomes a partial
        # (its final tokens and abort notice arrive during the next step).
        stats.aborted = self.stop_running()
        return self.take_batch(target_groups, stats), stats

    def stop_running(self) -> int:
        """Abort every running request (its tokens come back as a partial)."""
        running = list(self.buffer.running)
        self.client.abort(running)
        return len(running)

    def abort_stale(self, version: int) -> int:
        """Stop running rollouts whose oldest token is more than
        buffer.max_staleness versions behind `version` (stream mode, where
        requests outlive weight syncs): they return as partials, and taking
        them to continue restarts or drops them (buffer.stale_policy; "mask"
        lets them run and the learner masks their old tokens)."""
        stale = self.buffer.stale_running(version)
        self.client.abort(stale)
        return len(stale)

    def expire_stale(self, version: int, keep: set[str]) -> int:
        """Apply the staleness bound to complete groups (except `keep`)."""
        return self.buffer.expire_stale_ready(version, keep)

    @property
    def num_ready(self) -> int:
        return self.buffer.num_ready

    @property
    def num_open(self) -> int:
        return self.buffer.num_open_groups

    def held_groups(self) -> set[str]:
        """Ids of the groups the buffer holds, complete or open."""
        return self.buffer.held_group_ids()

    def drain(self, timeout_s: float = 60.0) -> None:
        """Wait until every aborted request has reported its last tokens, so
        the buffer holds them all (before saving it or stopping)."""
        stats, deadline = RolloutStats(), self.clock.now() + timeout_s
        while self.buffer.running:
            if self.clock.now() > deadline:
                raise GeneratorError(f"aborted requests did not report within {timeout_s:.0f} s "
                                     f"({len(self.buffer.running)} requests running)")
            self.pump(stats, 1000, max_messages=1)

    def _replace_group(self, group_id: str) -> None:
        """Drop an open group; a new prompt takes its place (`fill` refills
        by itself under APRIL and in stream mode)."""
        self.client.abort(self.buffer.drop_group(group_id))
        if self._refill:
            self._new_group()

    # --- messages in ----------------------------------------------------------

    def _score(self, r: Rollout) -> float:
        return self.verifier.score(self.tokenizer.decode(r.response_ids, skip_special_tokens=True), r.answer)

    def handle(self, msg, stats: RolloutStats) -> None:
        if isinstance(msg, TokenChunk):
            if msg.request_id in self.out_of_order:
                return  # being stopped: what came after the gap is not its
            try:
                r = self.buffer.on_chunk(msg)
            except BufferError as err:
                stats.chunks_out_of_order += 1
                self._order_log(logging.ERROR, "%s; it is stopped and continues from the tokens before", err)
                self.out_of_order.add(msg.request_id)
                self.client.abort([msg.request_id])
                return
            if r is None:
                return  # a late chunk of a dropped group
            stats.tokens_generated += len(msg.token_ids)
            members = self.buffer.members(r.group_id)
            if not self.pruner.review(r, members):  # the pruner counts its decisions
                self.buffer.prune(msg.request_id)
                self.client.abort([msg.request_id])
                if self.pruner.group_too_small(members):
                    stats.pruned_groups_dropped += 1
                    self._replace_group(r.group_id)
        elif isinstance(msg, RolloutFinished):
            # A request whose stream had a gap ends as aborted: its rollout is
            # kept to the gap and continues, it is not scored incomplete.
            reason = "abort" if msg.request_id in self.out_of_order else msg.finish_reason
            self.out_of_order.discard(msg.request_id)
            r, outcome = self.buffer.end(msg.request_id, reason, self._score)
            if msg.request_id in self.client.recovered:
                self.client.recovered.discard(msg.request_id)
                stats.tokens_recovered += len(r.response_ids) if r is not None else 0
            if outcome != "late":
                self.rejected_in_a_row = 0
            if outcome == "finished":
                stats.rollouts_finished += 1
                stats.truncated += msg.finish_reason != "stop"
                stats.response_lens.append(len(r.response_ids))
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
