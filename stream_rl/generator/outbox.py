"""A generator's stream to the controller, coalesced.

vLLM hands one engine step's outputs to every running request at once, and
each request's task would send its chunk as a message of its own: at 64
engines of 128 requests that is tens of thousands of messages a second into
one controller, each read, polled for and decoded on its own. Here the
chunks and finishes the tasks produce in one turn of the event loop leave
as one `TokenBatch`; while the socket is busy (the controller behind, the
high-water mark reached) more gather and leave together, so a slow reader
gets fewer, larger messages instead of a growing queue.

Nothing is reordered, dropped or delayed beyond the turn: the flush runs as
soon as the tasks woken with it have run. A message of another kind
(weights, readiness, rejections) first sends what waits, then itself.
Backpressure holds: past `max_pending` waiting messages a sender waits for
the flush, as it waited for the socket before.
"""

from __future__ import annotations

import asyncio
import logging

from stream_rl.codec import ProtocolError
from stream_rl.protocol import RequestRejected, RolloutFinished, TokenChunk, batched

log = logging.getLogger(__name__)

MAX_PENDING = 512  # messages in one TokenBatch at most (~a few MiB with scores, under max_message_mb)


class Outbox:
    def __init__(self, channel, max_pending: int = MAX_PENDING):
        """`channel`: an AsyncZmqChannel (anything with `async send(msg)` and `close()`)."""
        self.channel, self.max_pending = channel, max_pending
        self.pending: list = []
        self._flusher: asyncio.Task | None = None
        self._room = asyncio.Event()
        self.sent_batches = 0  # messages that left holding more than one

    async def send(self, msg) -> None:
        if isinstance(msg, (TokenChunk, RolloutFinished)):
            while len(self.pending) >= self.max_pending:
                self._room.clear()
                await self._room.wait()
            self.pending.append(msg)
            if self._flusher is None:
                # Runs after the tasks already woken this turn: their chunks join.
                self._flusher = asyncio.get_running_loop().create_task(self._flush())
        else:
            await self.drain()
            await self.channel.send(msg)

    async def drain(self) -> None:
        """Until everything waiting has been sent."""
        while self._flusher is not None:
            await asyncio.shield(self._flusher)

    async def _flush(self) -> None:
        try:
            while self.pending:
                take, self.pending = self.pending[:self.max_pending], self.pending[self.max_pending:]
                self._room.set()
                await self._send(take)
        finally:
            self._flusher = None
            self._room.set()

    async def _send(self, take: list) -> None:
        try:
            await self.channel.send(batched(take))
            self.sent_batches += len(take) > 1
        except ProtocolError as err:  # over the channel's byte cap (generator.max_message_mb)
            if len(take) > 1:  # in halves, each under it
                await self._send(take[:len(take) // 2])
                await self._send(take[len(take) // 2:])
                return
            log.error("%s", err)
            await self.channel.send(RequestRejected(request_id=take[0].request_id, error=str(err)))

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        self.channel.close()
