"""Protocol messages on the wire: msgpack encoding, and strict decoding per
channel direction that refuses another job's messages and checks what
msgspec's types cannot state (`stream_rl/protocol.py` holds the types)."""

from __future__ import annotations

import msgspec

from stream_rl.protocol import Message, RolloutRequest, TokenBatch, TokenChunk, WorkerLogprobs, _Msg


class ProtocolError(ValueError):
    """A message could not be decoded or is not valid for this channel."""


_encoder = msgspec.msgpack.Encoder()


def encode(msg: _Msg) -> bytes:
    return _encoder.encode(msg)


class Decoder:
    """Strict decoder for one direction of a channel."""

    def __init__(self, kind=Message, run: str = ""):
        """`run`: accept only this job's messages (empty: any job's)."""
        self._dec = msgspec.msgpack.Decoder(kind)
        self.run = run

    def decode(self, data: bytes) -> Message:
        try:
            msg = self._dec.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise ProtocolError(f"rejected message ({len(data)} bytes): {err}") from None
        if self.run and msg.run != self.run:
            raise ProtocolError(f"rejected {type(msg).__name__} of another job (run {msg.run!r}; this job is "
                                f"{self.run!r})")
        _check(msg)
        return msg


def _check(msg) -> None:
    """Invariants msgspec's types cannot state."""
    if isinstance(msg, TokenBatch):
        if not msg.messages:
            raise ProtocolError("rejected an empty TokenBatch")
        for inner in msg.messages:
            if inner.run not in ("", msg.run):
                raise ProtocolError(f"rejected TokenBatch: it carries a {type(inner).__name__} of another job "
                                    f"(run {inner.run!r})")
            _check(inner)
    elif isinstance(msg, TokenChunk):
        n = len(msg.token_ids)
        if len(msg.versions) != n or (msg.logprobs and len(msg.logprobs) != n):
            raise ProtocolError(
                f"rejected TokenChunk for {msg.request_id}: {n} token_ids but {len(msg.logprobs)} "
                f"logprobs and {len(msg.versions)} versions")
        if msg.offset < 0:
            raise ProtocolError(f"rejected TokenChunk for {msg.request_id}: negative offset")
        if msg.score is not None and (msg.score.at_tokens < 1 or len(msg.score.features) % 4):
            raise ProtocolError(f"rejected TokenChunk for {msg.request_id}: score at {msg.score.at_tokens} tokens "
                                f"with {len(msg.score.features)} feature bytes (float32 expected)")
    elif isinstance(msg, WorkerLogprobs):
        if not len(msg.keys) == len(msg.index) == len(msg.logprobs):
            raise ProtocolError(f"rejected WorkerLogprobs: {len(msg.keys)} keys, {len(msg.index)} indices and "
                                f"{len(msg.logprobs)} logprobs")
    elif isinstance(msg, RolloutRequest):
        if msg.max_tokens < 1:
            raise ProtocolError(f"rejected RolloutRequest {msg.request_id}: max_tokens must be >= 1")
        if msg.score_at is not None and msg.score_at < max(1, len(msg.response_ids)):
            raise ProtocolError(f"rejected RolloutRequest {msg.request_id}: score_at={msg.score_at} is before the "
                                f"{len(msg.response_ids)} response tokens it continues (or below 1)")
        needed = msg.score_at is not None and msg.response_ids
        if (msg.response_logprobs or needed) and len(msg.response_logprobs) != len(msg.response_ids):
            raise ProtocolError(f"rejected RolloutRequest {msg.request_id}: response_logprobs has "
                                f"{len(msg.response_logprobs)} values for {len(msg.response_ids)} response_ids"
                                + (" (a continuation still to be scored needs all of them)" if needed else ""))
