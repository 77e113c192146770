"""APRIL's recycling buffer: the bookkeeping of every open group and rollout.

A rollout is in exactly one place at a time:
- running: an engine request is generating it (`running`, by request id);
- partial: its request was aborted at a step's end; it waits in `partials`
  to be continued token-in before any new prompt is drawn;
- finished: it waits in its group until every member is finished;
- ready: its group is complete and waits in `ready` for the learner.

Partials carry every token's rollout log-prob and policy version, so the
learner can correct for the older policies that sampled them. A staleness
bound decides what happens to a rollout whose oldest token is too old:
`restart` discards its tokens and generates it again from the prompt (a
finished one too, when its complete group goes stale before the learner
takes it: the group reopens), `drop` discards its whole group. Restart
never removes a group, so it keeps the pruning correction exact: which
groups reach the learner does not depend on which members were pruned.
Memory is bounded by `max_groups` open groups: a new group is refused,
never an accepted rollout evicted.

The state saves to one msgpack file and restores exactly (resume).
"""

from __future__ import annotations

import os
import secrets
from collections import deque
from pathlib import Path
from typing import Callable, Literal

import msgspec

from stream_rl.buffer.rollouts import BufferError, append_chunk, restart
from stream_rl.protocol import FINISH_REASONS, Group, Rollout, TokenChunk

# Continuation order of partials: given the waiting partials (oldest first),
# return them in the order to continue them. Register more here.
ContinuationOrder = Callable[[list[Rollout]], list[Rollout]]
CONTINUATION_ORDERS: dict[str, ContinuationOrder] = {
    "fifo": lambda partials: partials,
    # Most tokens first: with equal budgets, the closest to done, whose
    # continuation adds the least staleness.
    "most_generated": lambda partials: sorted(partials, key=lambda r: -len(r.response_ids)),
}


class BufferStats(msgspec.Struct, kw_only=True):
    """Running totals (never reset); the controller reports per-step deltas."""
    groups_started: int = 0
    groups_completed: int = 0
    groups_dropped: int = 0
    partials_created: int = 0
    partials_continued: int = 0
    stale_restarted: int = 0
    stale_dropped_groups: int = 0
    tokens_discarded: int = 0  # generated, then thrown away (restart or drop)
    late_messages: int = 0  # messages for requests the buffer no longer tracks


class BufferState(msgspec.Struct, kw_only=True):
    """Everything needed to restore a buffer; what `save` writes."""
    format: int = 1
    groups: list[list[Rollout]]  # open groups, oldest first, members in order
    partials: list[str]  # rollout ids, queue order
    ready: list[Group]
    next_group: int
    stats: BufferStats


class RecyclingBuffer:
    def __init__(self, group_size: int, max_groups: int, max_staleness: int | None = None,
                 stale_policy: Literal["restart", "drop", "mask"] = "restart", order: str = "fifo", prefix: str = ""):
        if order not in CONTINUATION_ORDERS:
            raise BufferError(f"unknown continuation order {order!r}; known: {', '.join(CONTINUATION_ORDERS)}")
        self.group_size = group_size
        self.max_groups = max_groups
        # "mask": stale rollouts run on; the learner masks their old tokens.
        self.max_staleness = None if stale_policy == "mask" else max_staleness
        self.stale_policy = stale_policy
        self.order = CONTINUATION_ORDERS[order]
        # Group ids are f"{prefix}g{n}": buffers sharing one generator need
        # distinct prefixes, as request ids must be unique at the engine.
        self.prefix = prefix
        self.groups: dict[str, list[Rollout]] = {}  # open groups, insertion-ordered
        self.running: dict[str, Rollout] = {}  # by engine request id
        self.partials: deque[Rollout] = deque()
        self.pruning: set[str] = set()  # request ids whose abort means "pruned"
        self._paused: set[str] = set()  # partials that stopped at the pruner's decision point
        self._pause_at: dict[str, int] = {}  # request id -> the length where it stops for the pruner
        self.ready: list[Group] = []
        self.next_group = 0
        self.stats = BufferStats()
        self.session = ""  # request-id suffix; new at every restore (see Rollout.session)

    # --- new work ----------------------------------------------------------------

    def new_group(self, prompt_ids: list[int], answer: str, max_tokens: int) -> list[Rollout]:
        """Open a group of `group_size` fresh rollouts (not yet started)."""
        if not prompt_ids:
            raise BufferError("a group needs a non-empty prompt")
        if len(self.groups) >= self.max_groups:
            raise BufferError(f"buffer holds buffer.max_groups={self.max_groups} open groups; "
                              "refusing a new one rather than evicting accepted rollouts")
        gid = f"{self.prefix}g{self.next_group}"
        self.next_group += 1
        members = [Rollout(rollout_id=f"{gid}-{i}", group_id=gid, prompt_ids=list(prompt_ids), answer=answer,
                           max_tokens=max_tokens) for i in range(self.group_size)]
        self.groups[gid] = members
        self.stats.groups_started += 1
        return members

    def start(self, rollout: Rollout, pause_at: int | None = None) -> str:
        """Mark `rollout` as running under a new engine request id; returns it.
        `pause_at`: the request stops at this length for the pruner's
        decision (`end` then keeps it as a partial, unless pruned)."""
        members = self.groups.get(rollout.group_id)
        if members is None or not any(m is rollout for m in members):
            raise BufferError(f"rollout {rollout.rollout_id} belongs to unknown group {rollout.group_id!r}")
        if rollout.finished or rollout.request_id in self.running:
            raise BufferError(f"rollout {rollout.rollout_id} is already {'finished' if rollout.finished else 'running'}")
        if any(p is rollout for p in self.partials):
            raise BufferError(f"rollout {rollout.rollout_id} waits in the partial queue; take it with take_partials")
        if rollout.tokens_left <= 0:
            raise BufferError(f"rollout {rollout.rollout_id} has no token budget left")
        rollout.attempt += 1
        rollout.session = self.session
        self.running[rollout.request_id] = rollout
        if pause_at is not None:
            self._pause_at[rollout.request_id] = pause_at
        return rollout.request_id

    def take_partials(self, version: int, limit: int | None = None) -> tuple[list[Rollout], list[str]]:
        """Partials to continue now, in continuation order, with the staleness
        bound applied at `version`. Returns (partials to start, request ids of
        running members of groups dropped as stale, to abort)."""
        if not self.partials:
            return [], []
        waiting = self.order(list(self.partials))
        self.partials.clear()
        out, abort = [], []
        for r in waiting:
            if r.group_id not in self.groups:
                self._paused.discard(r.rollout_id)
                continue  # its group was dropped meanwhile
            if limit is not None and len(out) >= limit:
                self.partials.append(r)
                continue
            if self.max_staleness is not None and r.versions and version - min(r.versions) > self.max_staleness:
                if self.stale_policy == "restart":
                    self.stats.tokens_discarded += restart(r)
                    self.stats.stale_restarted += 1
                else:
                    self.stats.stale_dropped_groups += 1
                    abort += self.drop_group(r.group_id)
                    # Siblings taken before this one go with their group.
                    out = [o for o in out if o.group_id != r.group_id]
                    continue
            out.append(r)
        self.stats.partials_continued += sum(bool(r.response_ids) and r.rollout_id not in self._paused for r in out)
        self._paused -= {r.rollout_id for r in out}
        return out, abort

    # --- stream events -----------------------------------------------------------

    def on_chunk(self, chunk: TokenChunk) -> Rollout | None:
        r = self.running.get(chunk.request_id)
        if r is None:
            self.stats.late_messages += 1
            return None
        append_chunk(r, chunk)
        return r

    def on_finished(self, request_id: str, reason: str, reward: float | None = None,
                    paused: bool = False) -> Rollout | None:
        """An engine request ended. `abort` makes the rollout a partial (unless
        its budget is spent); otherwise it is finished with `reward`.
        `paused`: it stopped at the pruner's decision point and was kept; it
        continues as a partial but is no recycled step-end partial in the stats."""
        if reason != "abort" and reason not in FINISH_REASONS:
            raise BufferError(f"unknown finish reason {reason!r} for {request_id}")
        r = self.running.pop(request_id, None)
        if r is None:
            self.stats.late_messages += 1
            return None
        if request_id in self.pruning:
            self.pruning.discard(request_id)
            reason, reward = "pruned", None
        elif not self._ends(r, reason):
            self.partials.append(r)
            if paused:
                self._paused.add(r.rollout_id)
            else:
                self.stats.partials_created += 1
            return r
        self.finish(r, "length" if reason == "abort" else reason, reward)
        return r

    def end(self, request_id: str, reason: str, score: Callable[[Rollout], float]) -> tuple[Rollout | None, str]:
        """An engine request ended with `reason`. Returns its rollout and what
        became of it: "late" (not running: its group was dropped, or the
        notice repeats), "paused" (stopped at its decision point and kept: it
        continues), "partial" (aborted with budget left), "pruned", or
        "finished" (its reward is `score(rollout)`)."""
        if reason != "abort" and reason not in FINISH_REASONS:
            raise BufferError(f"unknown finish reason {reason!r} for {request_id}")
        at = self._pause_at.pop(request_id, None)
        r = self.running.get(request_id)
        if r is None:
            self.stats.late_messages += 1
            return None, "late"
        if request_id in self.pruning:
            self.on_finished(request_id, reason)
            return r, "pruned"
        if at is not None and reason == "length" and len(r.response_ids) == at:
            self.on_finished(request_id, "abort", paused=True)
            return r, "paused"
        if not self._ends(r, reason):
            self.on_finished(request_id, reason)
            return r, "partial"
        self.on_finished(request_id, reason, score(r))
        return r, "finished"

    def needs_reward(self, request_id: str, reason: str) -> bool:
        """Whether `on_finished(request_id, reason)` will finish a running
        rollout that is scored (not pruned, not kept as a partial)."""
        r = self.running.get(request_id)
        return r is not None and request_id not in self.pruning and self._ends(r, reason)

    @staticmethod
    def _ends(r: Rollout, reason: str) -> bool:
        # An aborted request ends its rollout only when the budget is spent.
        return reason != "abort" or r.tokens_left <= 0

    def finish(self, r: Rollout, reason: str, reward: float | None) -> None:
        """Record a rollout's end; its group moves to `ready` once complete.
        Also for a partial taken with no budget left (nothing to continue)."""
        if reason not in FINISH_REASONS:
            raise BufferError(f"unknown finish reason {reason!r} for {r.rollout_id}")
        members = self.groups.get(r.group_id)
        if members is None or not any(m is r for m in members):
            raise BufferError(f"rollout {r.rollout_id} belongs to unknown group {r.group_id!r}")
        r.finish_reason, r.reward = reason, reward
        if all(m.finished for m in members):
            del self.groups[r.group_id]
            self.ready.append(Group(group_id=r.group_id, rollouts=members))
            self.stats.groups_completed += 1

    def prune(self, request_id: str) -> None:
        """The pruner stopped this request: when its abort arrives the rollout
        is finished as "pruned" (it completes its group) instead of recycled."""
        if request_id not in self.running:
            raise BufferError(f"cannot prune {request_id!r}: it is not running")
        self.pruning.add(request_id)

    def drop_group(self, group_id: str) -> list[str]:
        """Discard an open group; returns request ids of its running members
        (the caller aborts them; their late messages are ignored)."""
        members = self.groups.pop(group_id, None)
        if members is None:
            raise BufferError(f"unknown group {group_id!r}")
        running = [rid for rid, r in self.running.items() if r.group_id == group_id]
        for rid in running:
            del self.running[rid]
            self.pruning.discard(rid)
            self._pause_at.pop(rid, None)
        self.partials = deque(r for r in self.partials if r.group_id != group_id)
        self.stats.groups_dropped += 1
        self.stats.tokens_discarded += sum(len(m.response_ids) for m in members)
        return running

    def group_of(self, request_id: str) -> str | None:
        r = self.running.get(request_id)
        return r.group_id if r else None

    def held_group_ids(self) -> set[str]:
        """Ids of the groups held here, complete or open."""
        return {g.group_id for g in self.ready} | set(self.groups)

    def members(self, group_id: str) -> list[Rollout]:
        """The rollouts of an open group."""
        return self.groups[group_id]

    def stale_running(self, version: int) -> list[str]:
        """Running requests whose oldest token is more than max_staleness
        versions behind `version` (none under "mask"), those being pruned
        aside: stopped, they come back as partials for `take_partials`."""
        if self.max_staleness is None:
            return []
        return [rid for rid, r in self.running.items()
                if r.versions and version - min(r.versions) > self.max_staleness and rid not in self.pruning]

    # --- output ------------------------------------------------------------------

    def expire_stale_ready(self, version: int, keep: set[str] | frozenset = frozenset()) -> int:
        """Apply the staleness bound to complete groups (stream mode, where a
        group's first members can finish many versions before its last),
        except the group ids in `keep`. "drop": a group holding a token more
        than max_staleness versions behind `version` is dropped. "restart":
        its stale survivors are generated again and the group reopens (its
        pruned members stay pruned: their tokens are not trained). Returns
        how many groups were dropped or reopened."""
        if self.max_staleness is None:
            return 0
        stale = lambda rs: any(r.versions and version - min(r.versions) > self.max_staleness for r in rs)  # noqa: E731
        fresh, expired = [], 0
        for g in self.ready:
            if g.group_id in keep:
                fresh.append(g)
            elif self.stale_policy == "drop" and stale(g.rollouts):
                self.stats.stale_dropped_groups += 1
                self.stats.tokens_discarded += g.num_tokens
                expired += 1
            elif self.stale_policy == "restart" and stale(g.survivors):
                for r in g.survivors:
                    if stale([r]):
                        self.stats.tokens_discarded += restart(r)
                        self.stats.stale_restarted += 1
                        r.finish_reason, r.reward = None, None
                        self.partials.append(r)
                self.groups[g.group_id] = g.rollouts
                expired += 1
            else:
                fresh.append(g)
        self.ready = fresh
        return expired

    def take_ready(self, n: int) -> list[Group]:
        taken, self.ready = self.ready[:n], self.ready[n:]
        return taken

    @property
    def num_ready(self) -> int:
        return len(self.ready)

    @property
    def num_open_groups(self) -> int:
        return len(self.groups)

    # --- persistence -------------------------------------------------------------

    def state(self) -> BufferState:
        """A snapshot. Running (and not yet started) rollouts are recorded as
        partials holding their tokens so far, after the queued ones: a restored
        buffer continues them (engine requests do not survive a restart)."""
        partials = [r.rollout_id for r in self.partials]
        queued = set(partials)
        partials += [r.rollout_id for members in self.groups.values() for r in members
                     if not r.finished and r.rollout_id not in queued]
        return msgspec.convert(msgspec.to_builtins(BufferState(
            groups=list(self.groups.values()), partials=partials, ready=self.ready,
            next_group=self.next_group, stats=self.stats)), BufferState)  # a deep copy

    def save(self, path: str | os.PathLike) -> None:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(msgspec.msgpack.encode(self.state()))
        os.replace(tmp, p)  # atomic: a crash never leaves half a buffer

    def restore(self, state: BufferState) -> None:
        if self.groups or self.running or self.partials or self.ready:
            raise BufferError("restore into a buffer that already holds rollouts")
        # Check everything before changing anything: a refused state leaves
        # the buffer empty and usable.
        for members in state.groups:
            if len(members) != self.group_size:
                raise BufferError(f"saved group {members[0].group_id if members else '?'} has {len(members)} "
                                  f"members, but group_size is {self.group_size}")
        by_id = {r.rollout_id: r for members in state.groups for r in members}
        unknown = [rid for rid in state.partials if rid not in by_id]
        if unknown:
            raise BufferError(f"saved partials refer to unknown rollouts: {unknown[:5]}")
        self.groups = {members[0].group_id: members for members in state.groups}
        self.partials = deque(by_id[rid] for rid in state.partials)
        self.ready = list(state.ready)
        self.next_group = state.next_group
        self.stats = state.stats
        self.session = f"~{secrets.token_hex(3)}"

    def load(self, path: str | os.PathLike) -> None:
        try:
            state = msgspec.msgpack.decode(Path(path).read_bytes(), type=BufferState)
        except (OSError, msgspec.DecodeError) as err:
            raise BufferError(f"cannot restore the buffer from {path}: {err}") from None
        self.restore(state)
