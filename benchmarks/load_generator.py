"""Load generators for `bench controller`: processes that stand in for
generator services on the wire.

One process serves several generator connections. Each connection binds the
real addresses of its generator index (`generator_addrs`), answers `Hello`
with `GeneratorReady`, takes `RolloutRequest`s (continuations included) and
`AbortRequests`, and streams `TokenChunk`s (with a `QualityScore` where a
request asks for one) and `RolloutFinished` in the real wire format, through
the service's own channel (`AsyncZmqChannel` on uvloop: run id, HMAC, caps).
`wire`: "chunk" sends every chunk and finish as a message of its own (the
service before issue 27); "batch" sends through the service's `Outbox`, so
one engine step's chunks and finishes leave as one `TokenBatch`.

The engine is simulated at chunk granularity: a connection runs at most
`concurrency` requests (the rest wait, as in vLLM's queue) and takes
`rate / concurrency` engine steps a second, every running request advancing
one token per step; so a connection given at least `concurrency` requests
offers `rate` tokens a second. The parent sets both together (the bench keeps
a request's speed, rate / concurrency, fixed and runs more requests for more
tokens, as a busier engine does). At each step the chunks it completes leave
together, as vLLM hands a step's outputs out together; connections step at
phases of their own. A rollout's whole response length is drawn from its
rollout id (`response_length`): the same rollout ends at the same length
whichever request continues it. A request that is to be scored stops at
score_at + 1 tokens with "length" and its score on the chunk holding token
score_at + 1, as the real service does.

Every chunk's send time (`time.monotonic`, system-wide on Linux) is
recorded with its request id and offset while recording is on, and every
connection counts the tokens it sent; the parent asks for both over a pipe.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import time
import zlib
from collections import deque
from dataclasses import dataclass, field

import msgspec
import zmq.asyncio

from stream_rl.codec import Decoder
from stream_rl.protocol import (AbortRequests, GeneratorReady, Hello, QualityScore, RequestRejected, RolloutFinished,
                                RolloutRequest, Shutdown, TokenChunk, ToGenerator)
from stream_rl.transport import AsyncZmqChannel, Cap

WIRES = ("chunk", "batch")


class LoadSpec(msgspec.Struct, kw_only=True):
    """What a load-generator process needs (picklable, no Config)."""
    run: str
    addrs: list[tuple[str, str]]  # (request_addr, stream_addr) per connection it serves
    first_index: int  # generator index of addrs[0]
    hwm: int
    max_message_bytes: int
    max_model_len: int
    vocab_size: int
    chunk_tokens: int
    max_tokens: int  # the rollout budget (generator.max_tokens): lengths are capped here
    concurrency: int  # requests running at once per connection, until the parent sets another
    median_tokens: float = 120.0  # lognormal response length: median
    sigma: float = 0.8  # ... and its log-space spread
    feature_floats: int = 4096  # QualityScore.features: one float32 hidden state (a 4096-wide model)
    seed: int = 0
    wire: str = "chunk"


def response_length(rollout_id: str, median: float, sigma: float, cap: int) -> int:
    """A rollout's whole response length, drawn from its id alone: lognormal
    (median, sigma), at least 1, at most `cap`."""
    h = zlib.crc32(rollout_id.encode())
    # Two independent uniforms from the hash: Box-Muller.
    u1 = ((h & 0xFFFF) + 0.5) / 65536.0
    u2 = (((h >> 16) & 0xFFFF) + 0.5) / 65536.0
    z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    return max(1, min(cap, int(round(median * math.exp(sigma * z)))))


def rollout_of(request_id: str) -> str:
    """The rollout id of a request id (`Rollout.request_id`: rollout.attempt[session])."""
    return request_id.rpartition(".")[0] or request_id


@dataclass(eq=False)
class _Req:
    rid: str
    offset0: int  # len(response_ids): the first token's index in the response
    stop: int  # response index where this request ends
    reason: str  # its finish reason there
    score_pos: int | None  # index of the token whose step scores it (score_at), if in range
    start: int = 0  # step after which it generates (its first token comes at step start + 1)
    emitted: int = 0  # response index of the next token to send
    done: bool = False


@dataclass
class _Conn:
    index: int
    inbox: AsyncZmqChannel
    out: object  # AsyncZmqChannel, or an Outbox around one
    step: float = 0.0  # engine steps so far (its integer part: steps taken)
    heap: list = field(default_factory=list)  # (step its next chunk completes, seq, _Req)
    running: dict = field(default_factory=dict)  # request id -> _Req (generating)
    waiting: deque = field(default_factory=deque)  # admitted when a slot frees
    queued: dict = field(default_factory=dict)  # request id -> _Req (waiting)
    sent_tokens: int = 0
    sent_messages: int = 0
    rejected: int = 0


class LoadGenerator:
    """The connections of one process and their simulated engines (run inside an event loop)."""

    def __init__(self, spec: LoadSpec):
        if spec.wire not in WIRES:
            raise ValueError(f"wire must be one of {WIRES} (got {spec.wire!r})")
        self.spec = spec
        self.ctx = zmq.asyncio.Context()
        cap = Cap(spec.max_message_bytes, "generator.max_message_mb")
        if spec.wire == "batch":
            from stream_rl.generator.outbox import Outbox  # here: the chunk wire runs on trees without it
        self.rng = random.Random(spec.seed)
        self.conns = []
        for k, (req_addr, stream_addr) in enumerate(spec.addrs):
            stream = AsyncZmqChannel(stream_addr, send=True, bind=True, hwm=spec.hwm, ctx=self.ctx, run=spec.run,
                                     cap=cap)
            self.conns.append(_Conn(
                index=spec.first_index + k,
                inbox=AsyncZmqChannel(req_addr, send=False, bind=True, hwm=spec.hwm, ctx=self.ctx, cap=cap,
                                      decoder=Decoder(ToGenerator, spec.run)),
                out=Outbox(stream) if spec.wire == "batch" else stream,
                step=self.rng.random()))  # engines do not step in lockstep
        self.rate = 0.0  # offered tokens/s per connection
        self.concurrency = spec.concurrency
        self._seq = itertools.count()
        self.recording = False
        self.log: list[tuple[str, int, int, float]] = []  # (request id, offset, tokens, send time) per chunk
        # Random token ids and log-probs, sliced for every chunk (cheap, and
        # the controller cannot tell them from sampled ones).
        n = 8192
        self._ids = [self.rng.randrange(spec.vocab_size) for _ in range(n + spec.chunk_tokens)]
        self._lps = [-self.rng.expovariate(1.0) for _ in range(n + spec.chunk_tokens)]
        self._versions = [[0] * k for k in range(spec.chunk_tokens + 1)]
        self._features = [self.rng.randbytes(4 * spec.feature_floats) for _ in range(4)]
        self._last = time.monotonic()

    # --- requests in ---------------------------------------------------------

    async def on_message(self, c: _Conn, msg) -> None:
        s = self.spec
        if isinstance(msg, RolloutRequest):
            n_in = len(msg.prompt_ids) + len(msg.response_ids)
            if n_in >= s.max_model_len or msg.request_id in c.running or msg.request_id in c.queued:
                c.rejected += 1
                await c.out.send(RequestRejected(request_id=msg.request_id, error="rejected by the load generator"))
                return
            offset0 = len(msg.response_ids)
            length = max(offset0 + 1, response_length(rollout_of(msg.request_id), s.median_tokens, s.sigma,
                                                      s.max_tokens))
            end = offset0 + min(msg.max_tokens, s.max_model_len - n_in)
            if length <= end:
                stop, reason = length, ("length" if length >= s.max_tokens else "stop")
            else:
                stop, reason = end, "length"
            score_pos = msg.score_at if msg.score_at is not None and offset0 <= msg.score_at < stop else None
            r = _Req(msg.request_id, offset0, stop, reason, score_pos, emitted=offset0)
            if len(c.running) < self.concurrency:
                self._admit(c, r)
            else:
                c.waiting.append(r)
                c.queued[r.rid] = r
        elif isinstance(msg, AbortRequests):
            for rid in msg.request_ids:
                r = c.running.pop(rid, None)
                if r is not None:
                    r.done = True
                    # What it generated since its last chunk goes out first.
                    generated = min(r.stop, r.offset0 + max(0, int(c.step) - r.start))
                    while r.emitted < generated:
                        await self._send_chunk(c, r, min(generated, r.emitted + s.chunk_tokens))
                    await self._finish(c, r, "abort")
                    continue
                r = c.queued.pop(rid, None)
                if r is not None:  # never started
                    r.done = True
                    await self._finish(c, r, "abort")
        elif isinstance(msg, Hello):
            await c.out.send(GeneratorReady(generator_id=f"load{c.index}", version=0, max_model_len=s.max_model_len))
        elif isinstance(msg, Shutdown):
            raise SystemExit(0)

    def _admit(self, c: _Conn, r: _Req) -> None:
        # It joins the engine's next step; a slot freed by a finish is taken
        # at once. The first requests, admitted together, are taken as
        # already running for up to a chunk's steps, as in an engine at its
        # steady state: their first chunks complete spread over the first
        # chunk's steps, at the offered rate from the start (slots keep
        # their phase after).
        r.start = math.ceil(c.step)
        if c.step < self.spec.chunk_tokens:
            r.start -= self.rng.randrange(self.spec.chunk_tokens)
        c.running[r.rid] = r
        self._push(c, r)

    def _push(self, c: _Conn, r: _Req) -> None:
        end = min(r.stop, r.emitted + self.spec.chunk_tokens)
        heapq.heappush(c.heap, (r.start + (end - r.offset0), next(self._seq), r))

    # --- the stream out --------------------------------------------------------

    async def _send_chunk(self, c: _Conn, r: _Req, end: int) -> None:
        n, offset = end - r.emitted, r.emitted
        k = self.rng.randrange(8192)
        score = None
        if r.score_pos is not None and offset <= r.score_pos < end:
            score = QualityScore(at_tokens=r.score_pos, logit=self.rng.gauss(0.0, 1.5),
                                 features=self._features[k & 3])
        # State first: a send that waits (backpressure) lets other tasks run.
        r.emitted = end
        c.sent_tokens += n
        c.sent_messages += 1
        if self.recording:
            self.log.append((r.rid, offset, n, time.monotonic()))
        await c.out.send(TokenChunk(request_id=r.rid, offset=offset, token_ids=self._ids[k:k + n],
                                    logprobs=self._lps[k:k + n], versions=self._versions[n], score=score))

    def _fill(self, c: _Conn) -> None:
        """Waiting requests take the free slots."""
        while c.waiting and len(c.running) < self.concurrency:
            w = c.waiting.popleft()
            if c.queued.pop(w.rid, None) is not None:
                self._admit(c, w)

    async def _finish(self, c: _Conn, r: _Req, reason: str) -> None:
        c.sent_messages += 1
        self._fill(c)
        await c.out.send(RolloutFinished(request_id=r.rid, finish_reason=reason, num_tokens=r.emitted - r.offset0))

    async def advance(self, now: float) -> None:
        """Step every connection's engine to `now`; each step's chunks leave together."""
        steps = (now - self._last) * self.rate / self.concurrency
        self._last = now
        for c in self.conns:
            c.step += steps
            heap, step = c.heap, math.floor(c.step)
            while heap and heap[0][0] <= step:
                _, _, r = heapq.heappop(heap)
                if r.done:
                    continue
                await self._send_chunk(c, r, min(r.stop, r.emitted + self.spec.chunk_tokens))
                if r.emitted >= r.stop:
                    r.done = True
                    del c.running[r.rid]
                    await self._finish(c, r, r.reason)
                else:
                    self._push(c, r)

    def _until_next_step(self) -> float:
        """Seconds to the next step of any connection with work due (capped)."""
        if self.rate <= 0:
            return 0.02
        per_step = self.concurrency / self.rate
        busy = [c for c in self.conns if c.heap]
        if not busy:
            return 0.02
        frac = min(math.floor(c.step) + 1 - c.step for c in busy)
        return min(0.02, max(0.0002, frac * per_step))

    async def set_rate(self, tokens_per_s: float, concurrency: int | None = None) -> None:
        """Offer `tokens_per_s` per connection from now, over `concurrency`
        slots (unchanged if None; running requests beyond it finish first)."""
        await self.advance(time.monotonic())
        self.rate = tokens_per_s
        if concurrency is not None:
            self.concurrency = max(1, concurrency)
            for c in self.conns:
                self._fill(c)

    def report(self) -> dict:
        log, self.log = self.log, []
        return {"sent_tokens": [c.sent_tokens for c in self.conns],
                "sent_messages": [c.sent_messages for c in self.conns],
                "rejected": sum(c.rejected for c in self.conns),
                "running": sum(len(c.running) for c in self.conns),
                "waiting": sum(len(c.queued) for c in self.conns),
                "cpu_s": time.process_time(), "log": log}

    # --- the loop ----------------------------------------------------------------

    async def _read(self, c: _Conn) -> None:
        while True:
            await self.on_message(c, await c.inbox.recv())

    async def serve(self, control) -> None:
        """Serve until told to stop over `control` (a multiprocessing Connection):
        ("rate", tokens/s per connection[, slots]), ("record", bool), ("report",), ("stop",)."""
        readers = [asyncio.create_task(self._read(c)) for c in self.conns]
        control.send(("ready", len(self.conns)))
        try:
            while True:
                # Polled, not watched by the loop: a watched pipe is made
                # non-blocking, and a large report then fails to go out.
                while control.poll():
                    cmd = control.recv()
                    if cmd[0] == "rate":
                        await self.set_rate(*cmd[1:])
                    elif cmd[0] == "record":
                        self.recording = cmd[1]
                    elif cmd[0] == "report":
                        control.send(self.report())
                    elif cmd[0] == "stop":
                        return
                await self.advance(time.monotonic())
                await asyncio.sleep(self._until_next_step())
        finally:
            for t in readers:
                t.cancel()

    def close(self) -> None:
        for c in self.conns:
            c.inbox.close()
            c.out.close()
        self.ctx.term()


def run(spec: LoadSpec, control) -> None:
    """A load-generator process's body (multiprocessing target)."""
    import signal

    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it

    async def main() -> None:
        try:
            gen = LoadGenerator(spec)
        except Exception as err:
            control.send(("error", f"{type(err).__name__}: {err}"))
            return
        try:
            await gen.serve(control)
        finally:
            gen.close()

    uvloop.run(main())
