"""Assembling a rollout (`protocol.Rollout`) from its streamed chunks.

Chunks are appended to their rollout strictly in order: a chunk whose offset
does not continue the rollout exactly is an error (a token lost or
duplicated), never silently patched. A rollout may take several engine
requests (an aborted partial is continued later, token-in); each request has
its own id, `<rollout_id>.<attempt>`, so a late message from an aborted request
can never be mistaken for its continuation.
"""

from __future__ import annotations

from stream_rl.protocol import Rollout, TokenChunk


class BufferError(RuntimeError):
    pass


def append_chunk(rollout: Rollout, chunk: TokenChunk) -> None:
    """Append a streamed chunk to its rollout, strictly in order."""
    if chunk.offset != len(rollout.response_ids):
        raise BufferError(f"chunk for {chunk.request_id} starts at token {chunk.offset} but rollout "
                          f"{rollout.rollout_id} has {len(rollout.response_ids)} tokens: a token was lost or duplicated")
    if len(chunk.versions) != len(chunk.token_ids) or (chunk.logprobs and len(chunk.logprobs) != len(chunk.token_ids)):
        raise BufferError(f"chunk for {chunk.request_id} has {len(chunk.token_ids)} tokens but "
                          f"{len(chunk.logprobs)} logprobs and {len(chunk.versions)} versions")
    if rollout.logprobs is not None and chunk.token_ids and not chunk.logprobs:
        rollout.logprobs = None  # generator configured without logprobs
    rollout.response_ids.extend(chunk.token_ids)
    if rollout.logprobs is not None:
        rollout.logprobs.extend(chunk.logprobs)
    rollout.versions.extend(chunk.versions)
    if chunk.score is not None and rollout.score is None:
        rollout.score, rollout.features = chunk.score.logit, chunk.score.features


def restart(rollout: Rollout) -> int:
    """Discard the generated tokens (they are too stale); returns how many."""
    n = len(rollout.response_ids)
    rollout.response_ids, rollout.versions = [], []
    rollout.logprobs = [] if rollout.logprobs is not None else None
    # The score and the pruning decision were about the discarded tokens;
    # keep_prob stays: the rollout reaches the batch only if it survived
    # the draws before the restart too, so its next draw multiplies it.
    rollout.score = rollout.features = rollout.q = rollout.decision = None
    rollout.restarts += 1
    return n
