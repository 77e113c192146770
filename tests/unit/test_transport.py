"""ZmqChannel's binding and its handling of a flood of bad messages."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
import zmq

from stream_rl.codec import Decoder
from stream_rl.protocol import FromGenerator, TokenChunk
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


def test_another_jobs_messages_are_dropped_and_counted():
    from stream_rl.protocol import FromLearner, LearnerFailed, StepDone
    from stream_rl.codec import Decoder

    addr = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    rx = ZmqChannel(addr, send=False, bind=True, decoder=Decoder(FromLearner, run="job-a"))
    ours = ZmqChannel(addr, send=True, bind=False, run="job-a")
    stale = ZmqChannel(addr, send=True, bind=False, run="job-b")  # a learner of an earlier job on this port
    bare = ZmqChannel(addr, send=True, bind=False)  # a forger who does not know the id
    try:
        stale.send(StepDone(step=1, stats={}))
        bare.send(LearnerFailed(error="forged"))
        ours.send(StepDone(step=2, stats={}))
        got = rx.recv(timeout_ms=2000)
        assert isinstance(got, StepDone) and got.step == 2 and got.run == "job-a"
        assert rx.recv(timeout_ms=200) is None and rx.rejected == 2
    finally:
        for c in (rx, ours, stale, bare):
            c.close()


def test_a_message_over_the_cap_is_refused_at_the_sender_naming_the_key_and_dropped_at_the_receiver():
    from stream_rl.protocol import StepDone
    from stream_rl.codec import ProtocolError
    from stream_rl.transport import Cap

    addr = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    cap = Cap(1 << 20, "generator.max_message_mb")
    rx = ZmqChannel(addr, send=False, bind=True, cap=cap)
    tx = ZmqChannel(addr, send=True, bind=False, cap=cap)
    raw = ZmqChannel(addr, send=True, bind=False)  # no cap of its own: only the receiver's holds
    try:
        with pytest.raises(ProtocolError, match=r"StepDone of 2\.0 MiB exceeds generator.max_message_mb \(1 MiB\)"):
            tx.send(StepDone(step=1, stats={"x": "y" * (2 << 20)}))
        raw.send(StepDone(step=1, stats={"x": "y" * (2 << 20)}))
        assert rx.recv(timeout_ms=500) is None  # dropped with its connection, never decoded
        tx.send(StepDone(step=2, stats={}))
        assert rx.recv(timeout_ms=2000).step == 2
    finally:
        for c in (rx, tx, raw):
            c.close()


def test_with_a_shared_secret_only_messages_sealed_with_it_are_taken(monkeypatch):
    from stream_rl.protocol import FromLearner, StepDone
    from stream_rl.codec import Decoder
    from stream_rl.transport import SECRET_ENV

    addr = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv(SECRET_ENV, "s3cret")
    rx = ZmqChannel(addr, send=False, bind=True, decoder=Decoder(FromLearner, run="job"))
    ours = ZmqChannel(addr, send=True, bind=False, run="job")
    monkeypatch.setenv(SECRET_ENV, "guess")
    wrong = ZmqChannel(addr, send=True, bind=False, run="job")  # knows the run id, not the secret
    monkeypatch.delenv(SECRET_ENV)
    bare = ZmqChannel(addr, send=True, bind=False, run="job")
    try:
        wrong.send(StepDone(step=1, stats={}))
        bare.send(StepDone(step=2, stats={}))
        ours.send(StepDone(step=3, stats={}))
        assert rx.recv(timeout_ms=2000).step == 3
        assert rx.recv(timeout_ms=200) is None and rx.rejected == 2
    finally:
        for c in (rx, ours, wrong, bare):
            c.close()
