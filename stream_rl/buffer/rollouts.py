"""A rollout as it is assembled from streamed chunks, and a complete group.

Chunks are appended to their rollout strictly in order: a chunk whose offset
does not continue the rollout exactly is an error (a token lost or
duplicated), never silently patched. A rollout may take several engine
requests (an aborted partial is continued later, token-in); each request has
its own id, `<rollout_id>.<attempt>`, so a late message from an aborted request
can never be mistaken for its continuation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:  # the learner's messages carry groups: protocol imports this module
    from stream_rl.protocol import TokenChunk

# How a rollout ended. "pruned": stopped by the pruner; it completes its group
# but is not trained on as a policy sample.
FINISH_REASONS = ("stop", "length", "pruned")


class BufferError(RuntimeError):
    pass


class Rollout(msgspec.Struct, kw_only=True):
    rollout_id: str
    group_id: str
    prompt_ids: list[int]
    answer: str
    max_tokens: int  # the whole budget; a continuation gets what is left of it
    response_ids: list[int] = []
    logprobs: list[float] | None = []  # rollout log-prob per token; None if not requested
    versions: list[int] = []  # policy version that sampled each token
    attempt: int = 0  # engine requests started for this rollout
    restarts: int = 0  # times its tokens were discarded as too stale
    finish_reason: str | None = None
    reward: float | None = None
    # The pruner's view (ARRoL): the quality head's logit and its input
    # features (float32 bytes) at L_detect tokens, the calibrated posterior
    # q, and the decision. keep_prob: the probability that it survived every
    # pruning draw it faced (its inclusion probability, for importance
    # correction; the product over restarts; 1.0 when no draw could remove
    # it). decision: None (not reached L_detect), "cold" (cold start),
    # "exempt" (the unpruned measurement slice), "kept", "spared" (its group
    # was at its minimum: no draw), "pruned", "unscored" (the score never
    # arrived).
    score: float | None = None
    features: bytes | None = None
    q: float | None = None
    keep_prob: float = 1.0
    decision: str | None = None
    # Probability its prompt survived prompt-level pruning (DPPO); 1.0 when
    # prompts are not pruned.
    prompt_inclusion: float = 1.0
    # The buffer session that started its latest request ("" unless restored
    # from a checkpoint): a resumed run's requests never share an id with
    # requests of the killed run that may still run in a surviving engine.
    session: str = ""

    @property
    def request_id(self) -> str:
        """The id of the current (latest) engine request for this rollout."""
        return f"{self.rollout_id}.{self.attempt}{self.session}"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens_left(self) -> int:
        return self.max_tokens - len(self.response_ids)

    def append(self, chunk: TokenChunk) -> None:
        if chunk.offset != len(self.response_ids):
            raise BufferError(f"chunk for {chunk.request_id} starts at token {chunk.offset} but rollout "
                              f"{self.rollout_id} has {len(self.response_ids)} tokens: a token was lost or duplicated")
        if len(chunk.versions) != len(chunk.token_ids) or (chunk.logprobs and len(chunk.logprobs) != len(chunk.token_ids)):
            raise BufferError(f"chunk for {chunk.request_id} has {len(chunk.token_ids)} tokens but "
                              f"{len(chunk.logprobs)} logprobs and {len(chunk.versions)} versions")
        if self.logprobs is not None and chunk.token_ids and not chunk.logprobs:
            self.logprobs = None  # generator configured without logprobs
        self.response_ids.extend(chunk.token_ids)
        if self.logprobs is not None:
            self.logprobs.extend(chunk.logprobs)
        self.versions.extend(chunk.versions)
        if chunk.score is not None and self.score is None:
            self.score, self.features = chunk.score.logit, chunk.score.features

    def restart(self) -> int:
        """Discard the generated tokens (they are too stale); returns how many."""
        n = len(self.response_ids)
        self.response_ids, self.versions = [], []
        self.logprobs = [] if self.logprobs is not None else None
        # The score and the pruning decision were about the discarded tokens;
        # keep_prob stays: the rollout reaches the batch only if it survived
        # the draws before the restart too, so its next draw multiplies it.
        self.score = self.features = self.q = self.decision = None
        self.restarts += 1
        return n


class Group(msgspec.Struct, kw_only=True):
    group_id: str
    rollouts: list[Rollout]

    @property
    def survivors(self) -> list[Rollout]:
        """Members not pruned: the policy samples of this group."""
        return [r for r in self.rollouts if r.finish_reason != "pruned"]

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.survivors]

    @property
    def num_tokens(self) -> int:
        return sum(len(r.response_ids) for r in self.rollouts)
