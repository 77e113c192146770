"""Message channels: a small interface and its ZeroMQ implementation.

Channels are one-directional PUSH/PULL pairs. High-water marks bound the
queues and a full queue blocks the sender (backpressure), it never drops.
A received message that fails to decode is logged, counted and skipped, so a
foreign or corrupt sender cannot crash a service. With a shared secret
(`STREAM_RL_SECRET`), every message carries its HMAC and one without a
valid HMAC is rejected the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import random
import socket
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, NamedTuple

import zmq
import zmq.asyncio

from stream_rl.codec import Decoder, ProtocolError, encode  # noqa: F401 (encode: re-exported)
from stream_rl.protocol import Message

log = logging.getLogger(__name__)


class Channel(ABC):
    """Send or receive protocol messages; `recv` returns None on timeout."""

    rejected: int = 0  # messages dropped because they failed to decode

    @abstractmethod
    def send(self, msg) -> None: ...

    @abstractmethod
    def recv(self, timeout_ms: int | None = None) -> Message | None: ...

    @abstractmethod
    def close(self) -> None: ...


BIND_RETRY_S = 5.0


def _bind(sock: zmq.Socket, addr: str, retry_s: float = BIND_RETRY_S) -> None:
    """Bind, retrying "Address already in use" for up to `retry_s`: an
    address closed a moment ago (a benchmark's previous mode, a restarted
    role) is still held while the kernel and ZMQ's I/O thread let it go."""
    deadline = time.monotonic() + retry_s
    pause = 0.01
    while True:
        try:
            sock.bind(addr)
            return
        except zmq.ZMQError as err:
            if err.errno != zmq.EADDRINUSE or time.monotonic() + pause > deadline:
                raise zmq.ZMQError(err.errno, f"cannot bind {addr}: {err.strerror}") from None
            time.sleep(pause)
            pause = min(0.2, pause * 2)


def _socket(ctx: zmq.Context, kind: int, addr: str, bind: bool, hwm: int, max_bytes: int | None = None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.LINGER, 0)
    if max_bytes and kind == zmq.PULL:
        # A bigger message drops its sender's connection before it is read
        # into memory: with the high-water mark, a queue holds at most
        # hwm x max_bytes.
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    try:
        _bind(sock, addr) if bind else sock.connect(addr)
    except BaseException:
        sock.close(0)
        raise
    return sock


REJECT_LOG_EVERY_S = 1.0


class ThrottledLog:
    """Log a recurring line at most once per `every_s`, saying how many
    were left out since: a flood must not become a flood of log lines."""

    def __init__(self, logger: logging.Logger = log, every_s: float = REJECT_LOG_EVERY_S):
        self.logger, self.every_s = logger, every_s
        self._logged_at = -math.inf
        self._left_out = 0

    def __call__(self, level: int, fmt: str, *args) -> None:
        now = time.monotonic()
        if now - self._logged_at < self.every_s:
            self._left_out += 1
            return
        more = f" (and {self._left_out} more since the last such line)" if self._left_out else ""
        self.logger.log(level, fmt + "%s", *args, more)
        self._logged_at, self._left_out = now, 0


SECRET_ENV = "STREAM_RL_SECRET"
TAG_BYTES = 32


def secret() -> bytes | None:
    """The job's shared secret: `STREAM_RL_SECRET` in every role's
    environment (never in the config, which is written to OUT), or None."""
    value = os.environ.get(SECRET_ENV)
    return value.encode() if value else None


def seal(data: bytes, key: bytes | None) -> bytes:
    """`data` with its HMAC-SHA256 in front under `key`; as it is without one."""
    return hmac.new(key, data, hashlib.sha256).digest() + data if key else data


def unseal(data: bytes, key: bytes | None) -> bytes:
    """The message `seal` wrapped; ProtocolError if its HMAC does not match."""
    if not key:
        return data
    if len(data) < TAG_BYTES or not hmac.compare_digest(
            data[:TAG_BYTES], hmac.new(key, data[TAG_BYTES:], hashlib.sha256).digest()):
        raise ProtocolError(f"rejected a message ({len(data)} bytes) that fails authentication ({SECRET_ENV})")
    return data[TAG_BYTES:]


class Cap(NamedTuple):
    """The largest message a channel's receiver takes, and the config key that sets it."""
    max_bytes: int
    key: str


def caps(cfg) -> tuple[Cap, Cap]:
    """A job's two caps: every message between roles, and the learner's batches."""
    return (Cap(cfg.generator.max_message_mb << 20, "generator.max_message_mb"),
            Cap(cfg.learner.max_batch_mb << 20, "learner.max_batch_mb"))


class _Decoding:
    def __init__(self, decoder: Decoder | None, run: str = "", cap: Cap | None = None):
        self._decoder = decoder or Decoder()
        self.run = run  # stamped on every message sent
        self.cap = cap
        self._key = secret()  # every message sealed and checked with it
        self.rejected = 0
        self._reject_log = ThrottledLog()
        # Called with a rejected message's bytes and the reason (after the log
        # line), e.g. to tell its sender; it must not raise.
        self.on_reject: Callable[[bytes, str], None] | None = None

    def _encode(self, msg) -> bytes:
        if self.run:
            msg.run = self.run
        data = seal(encode(msg), self._key)
        if self.cap is not None and len(data) > self.cap.max_bytes:
            # The receiver would drop it with the connection: say so here.
            raise ProtocolError(f"a {type(msg).__name__} of {len(data) / 2**20:.1f} MiB exceeds {self.cap.key} "
                                f"({self.cap.max_bytes / 2**20:.0f} MiB): raise it in the config")
        return data

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self._reject_log(logging.ERROR, "rejected a message: %s", reason)

    def _decode(self, frames: list[bytes]) -> Message | None:
        if len(frames) != 1:
            self._reject(f"multipart message with {len(frames)} frames")
            return None
        try:
            return self._decoder.decode(unseal(frames[0], self._key))
        except ProtocolError as err:
            self._reject(str(err))
            if self.on_reject is not None:
                self.on_reject(frames[0], str(err))
            return None


def ms_until(deadline: float) -> int:
    """Whole milliseconds from now to a `time.monotonic()` deadline, rounded
    up: rounded down, a wait's last fraction became poll(0) calls, and a
    waiting loop spun through it (on the core the learner shares)."""
    return max(0, math.ceil((deadline - time.monotonic()) * 1000))


class ZmqChannel(_Decoding, Channel):
    """Blocking ZMQ channel for threads and plain loops."""

    def __init__(self, addr: str, *, send: bool, bind: bool, hwm: int = 10000,
                 decoder: Decoder | None = None, ctx: zmq.Context | None = None, run: str = "",
                 cap: Cap | None = None):
        super().__init__(decoder, run, cap)
        self._sock = _socket(ctx or zmq.Context.instance(), zmq.PUSH if send else zmq.PULL, addr, bind, hwm,
                             cap and cap.max_bytes)

    @property
    def sock(self) -> zmq.Socket:
        """The socket, to poll several channels at once."""
        return self._sock

    def send(self, msg) -> None:
        self._sock.send(self._encode(msg), copy=False)

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        # A rejected message is skipped; the wait goes on for a valid one
        # within the same deadline.
        if timeout_ms == 0:
            return self.recv_nowait()
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            if deadline is not None:
                if not self._sock.poll(ms_until(deadline)):
                    return None
            msg = self._decode(self._sock.recv_multipart(copy=True))
            if msg is not None:
                return msg

    def recv_nowait(self) -> Message | None:
        """The next valid message already queued, else None. No poll first:
        a controller reading many streams found that poll before every read
        to be a tenth of its CPU (`bench controller`)."""
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return None
            msg = self._decode(frames)
            if msg is not None:
                return msg

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (tests of malformed input use this)."""
        self._sock.send(data)

    def close(self, linger_ms: int = 0) -> None:
        """Close; `linger_ms` > 0 first gives queued messages that long to leave."""
        self._sock.close(linger_ms)


class AsyncZmqChannel(_Decoding):
    """asyncio twin of ZmqChannel for the generator's event loop."""

    def __init__(self, addr: str, *, send: bool, bind: bool, hwm: int = 10000,
                 decoder: Decoder | None = None, ctx: zmq.asyncio.Context | None = None, run: str = "",
                 cap: Cap | None = None):
        super().__init__(decoder, run, cap)
        self._sock = _socket(ctx or zmq.asyncio.Context.instance(), zmq.PUSH if send else zmq.PULL,
                             addr, bind, hwm, cap and cap.max_bytes)

    async def send(self, msg) -> None:
        await self._sock.send(self._encode(msg), copy=False)

    async def recv(self) -> Message:
        while True:
            msg = self._decode(await self._sock.recv_multipart(copy=True))
            if msg is not None:
                return msg

    def close(self) -> None:
        self._sock.close(0)


def _port_band() -> range:
    """Ports to pick from: below the kernel's ephemeral range when there is
    room (else above it). The caller's processes bind a picked port seconds
    later, and an ephemeral port can meanwhile go to any outgoing connection
    (an engine's, say): a generator once failed with "Address already in use"."""
    path = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low, high = (int(x) for x in path.read_text().split()) if path.exists() else (32768, 60999)
    if low - 1024 >= 4096:
        return range(max(1024, low - 16384), low)
    if 65535 - high >= 4096:
        return range(high + 1, 65536)
    return range(1024, 65536)


def free_ports(n: int, consecutive: bool = False) -> list[int]:
    """`n` loopback ports that are free now (consecutive: p, p+1, ..., for
    several generators' ports at base + 2i), outside the ephemeral range."""
    band, rng = _port_band(), random.Random()
    for _ in range(200):
        if consecutive:
            base = rng.randrange(band.start, band.stop - n)
            ports = list(range(base, base + n))
        else:
            ports = rng.sample(band, n)
        socks = []
        try:
            for p in ports:
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", p))
            return ports
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError(f"no {n} free loopback ports in {band.start}..{band.stop - 1}")
