"""ZmqChannel's binding and its handling of a flood of bad messages."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
import zmq

from stream_rl.protocol import Decoder, FromGenerator, TokenChunk
from stream_rl.transport import BIND_RETRY_S, ZmqChannel, free_ports


def test_a_bind_waits_for_an_address_that_is_let_go_soon():
    port = free_ports(1)[0]
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen(1)
    threading.Timer(0.5, holder.close).start()
    t0 = time.monotonic()
    ch = ZmqChannel(f"tcp://127.0.0.1:{port}", send=False, bind=True)
    try:
        assert 0.4 < time.monotonic() - t0 < BIND_RETRY_S
    finally:
        ch.close()


def test_a_bind_to_an_address_held_for_good_fails_naming_it(monkeypatch):
    monkeypatch.setattr("stream_rl.transport.BIND_RETRY_S", 0.3)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    addr = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
    try:
        with pytest.raises(zmq.ZMQError, match=f"cannot bind {addr}"):
            ZmqChannel(addr, send=False, bind=True)
    finally:
        holder.close()


def test_a_flood_of_bad_messages_is_counted_in_full_and_logged_a_line_a_second(caplog):
    addr = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    rx = ZmqChannel(addr, send=False, bind=True, decoder=Decoder(FromGenerator))
    tx = ZmqChannel(addr, send=True, bind=False)
    try:
        good = TokenChunk(request_id="r", offset=0, token_ids=[1], logprobs=[-1.0], versions=[0])
        with caplog.at_level(logging.ERROR, logger="stream_rl.transport"):
            t0 = time.monotonic()
            for _ in range(2000):
                tx.send_raw(b"\xc1 junk")
            tx.send(good)
            assert rx.recv(timeout_ms=10_000) == good
            seconds = time.monotonic() - t0
        lines = [r.getMessage() for r in caplog.records if "rejected a message" in r.getMessage()]
        assert rx.rejected == 2000
        assert 1 <= len(lines) <= seconds / 1.0 + 1
    finally:
        tx.close()
        rx.close()
