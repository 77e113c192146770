"""Rollouts and the buffer that assembles them into complete groups.

Chunks are appended to their rollout strictly in order: a chunk whose offset
does not continue the rollout exactly is an error (a token lost or
duplicated), never silently patched. Finished rollouts wait here until every
member of their group is finished; then the group is ready for the learner.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from stream_rl.protocol import TokenChunk


class BufferError(RuntimeError):
    pass


@dataclass
class Rollout:
    request_id: str
    group_id: str
    prompt_ids: list[int]
    answer: str
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # rollout log-prob per token
    versions: list[int] = field(default_factory=list)  # policy version per token
    finish_reason: str | None = None
    reward: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, chunk: TokenChunk) -> None:
        if chunk.offset != len(self.response_ids):
            raise BufferError(f"chunk for {self.request_id} starts at token {chunk.offset} but the rollout has "
                              f"{len(self.response_ids)} tokens: a token was lost or duplicated")
        if self.logprobs is not None and chunk.token_ids and not chunk.logprobs:
            self.logprobs = None  # generator configured without logprobs
        self.response_ids.extend(chunk.token_ids)
        if self.logprobs is not None:
            self.logprobs.extend(chunk.logprobs)
        self.versions.extend(chunk.versions)


@dataclass
class Group:
    group_id: str
    rollouts: list[Rollout]

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.rollouts]


class GroupBuffer:
    """Holds rollouts by request id and releases groups once all finished."""

    def __init__(self, group_size: int, max_groups: int):
        self.group_size = group_size
        self.max_groups = max_groups
        self.rollouts: dict[str, Rollout] = {}
        self._groups: OrderedDict[str, list[Rollout]] = OrderedDict()
        self._ready: list[Group] = []

    def add(self, rollout: Rollout) -> None:
        if rollout.request_id in self.rollouts:
            raise BufferError(f"duplicate request_id {rollout.request_id}")
        members = self._groups.get(rollout.group_id)
        if members is None:
            if len(self._groups) >= self.max_groups:
                raise BufferError(f"buffer holds buffer.max_groups={self.max_groups} open groups; "
                                  "refusing a new one rather than evicting accepted data")
            members = self._groups[rollout.group_id] = []
        if len(members) >= self.group_size:
            raise BufferError(f"group {rollout.group_id} already has {self.group_size} members")
        members.append(rollout)
        self.rollouts[rollout.request_id] = rollout

    def get(self, request_id: str) -> Rollout:
        try:
            return self.rollouts[request_id]
        except KeyError:
            raise BufferError(f"unknown request_id {request_id!r}") from None

    def finish(self, request_id: str, reason: str, reward: float) -> Group | None:
        """Mark a rollout finished; returns its group if that completed it."""
        r = self.get(request_id)
        r.finish_reason, r.reward = reason, reward
        members = self._groups[r.group_id]
        if len(members) == self.group_size and all(m.finished for m in members):
            del self._groups[r.group_id]
            for m in members:
                del self.rollouts[m.request_id]
            group = Group(r.group_id, members)
            self._ready.append(group)
            return group
        return None

    def drop_group(self, group_id: str) -> list[str]:
        """Remove an open group (e.g. a member was rejected); returns its request ids."""
        members = self._groups.pop(group_id, [])
        for m in members:
            del self.rollouts[m.request_id]
        return [m.request_id for m in members]

    def take_ready(self, n: int) -> list[Group]:
        taken, self._ready = self._ready[:n], self._ready[n:]
        return taken

    @property
    def num_ready(self) -> int:
        return len(self._ready)

    @property
    def num_open_groups(self) -> int:
        return len(self._groups)
