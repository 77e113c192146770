"""Wire protocol (strict msgpack decoding) and the ZMQ channels built on it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import msgspec
import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rl.codec import Decoder, ProtocolError, encode
from stream_rl.protocol import (AbortRequests, AttentionWindowSet, FromGenerator, GeneratorReady, RequestRejected,
                                RolloutFinished, RolloutRequest, SetAttentionWindow, Shutdown, TokenBatch, TokenChunk,
                                ToGenerator, UpdateWeights, WeightsUpdated, WeightsUpdateFailed)
from stream_rl.transport import AsyncZmqChannel, ZmqChannel, free_ports

ALL_MESSAGES = [
    RolloutRequest(request_id="r0", group_id="g0", prompt_ids=[1, 2, 3], max_tokens=16),
    RolloutRequest(request_id="r1", group_id="g0", prompt_ids=[4], max_tokens=1, response_ids=[5, 6],
                   temperature=0.7, top_p=0.9, seed=123),
    AbortRequests(request_ids=["r0", "r1"]),
    UpdateWeights(version=3, uri="/tmp/weights-3.safetensors"),
    Shutdown(),
    GeneratorReady(generator_id="gen-0", version=0, max_model_len=512),
    TokenChunk(request_id="r0", offset=0, token_ids=[7, 8], logprobs=[-0.5, -1.25], versions=[0, 1]),
    TokenChunk(request_id="r0", offset=2, token_ids=[9], logprobs=[], versions=[1]),  # no logprobs
    RolloutFinished(request_id="r0", finish_reason="stop", num_tokens=3),
    RolloutFinished(request_id="r1", finish_reason="length", num_tokens=0),
    RolloutFinished(request_id="r2", finish_reason="abort", num_tokens=5),
    RequestRejected(request_id="r3", error="prompt too long"),
    WeightsUpdated(version=3, load_s=0.25),
    WeightsUpdateFailed(version=4, error="file missing"),
    TokenBatch(messages=[TokenChunk(request_id="r0", offset=0, token_ids=[7], logprobs=[-0.5], versions=[0]),
                         RolloutFinished(request_id="r0", finish_reason="stop", num_tokens=1),
                         TokenChunk(request_id="r1", offset=4, token_ids=[1, 2], logprobs=[], versions=[2, 2])]),
    SetAttentionWindow(window=64),
    SetAttentionWindow(window=0),
    AttentionWindowSet(window=64, layers=2),
    AttentionWindowSet(window=0, layers=0, error="no window on this backend"),
]


def raw(**fields) -> bytes:
    """A msgpack map as a foreign or faulty sender might write it."""
    return msgspec.msgpack.encode(fields)


def chunk_fields(**over):
    base = dict(type="TokenChunk", request_id="r", offset=0, token_ids=[1, 2], logprobs=[-0.1, -0.2],
                versions=[0, 0])
    base.update(over)
    return base


def rejected(data: bytes, decoder: Decoder | None = None) -> str:
    with pytest.raises(ProtocolError) as info:
        (decoder or Decoder()).decode(data)
    return str(info.value)


# --- round trips -------------------------------------------------------------------

@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    out = Decoder().decode(encode(msg))
    assert type(out) is type(msg)
    assert out == msg


@pytest.mark.parametrize("msg", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_direction_decoders_accept_their_own_and_refuse_the_other(msg):
    to_gen, from_gen = Decoder(ToGenerator), Decoder(FromGenerator)
    data = encode(msg)
    mine, other = (to_gen, from_gen) if isinstance(msg, ToGenerator.__args__) else (from_gen, to_gen)
    assert mine.decode(data) == msg
    with pytest.raises(ProtocolError):
        other.decode(data)


ints = st.integers(min_value=-(2 ** 63), max_value=2 ** 63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def token_chunks(draw):
    n = draw(st.integers(0, 40))
    with_logprobs = draw(st.booleans())
    return TokenChunk(
        request_id=draw(st.text(max_size=30)),
        offset=draw(st.integers(0, 2 ** 40)),
        token_ids=draw(st.lists(ints, min_size=n, max_size=n)),
        logprobs=draw(st.lists(finite, min_size=n, max_size=n)) if with_logprobs else [],
        versions=draw(st.lists(st.integers(0, 2 ** 31), min_size=n, max_size=n)),
    )


@settings(max_examples=100, deadline=None)
@given(token_chunks())
def test_token_chunk_round_trip_property(msg):
    assert Decoder(FromGenerator).decode(encode(msg)) == msg


@settings(max_examples=100, deadline=None)
@given(
    request_id=st.text(max_size=30),
    group_id=st.text(max_size=30),
    prompt_ids=st.lists(ints, max_size=50),
    response_ids=st.lists(ints, max_size=50),
    max_tokens=st.integers(1, 2 ** 31),
    temperature=finite,
    top_p=finite,
    seed=st.none() | ints,
)
def test_rollout_request_round_trip_property(request_id, group_id, prompt_ids, response_ids, max_tokens,
                                             temperature, top_p, seed):
    msg = RolloutRequest(request_id=request_id, group_id=group_id, prompt_ids=prompt_ids,
                         response_ids=response_ids, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, seed=seed)
    assert Decoder(ToGenerator).decode(encode(msg)) == msg


# --- malformed input ---------------------------------------------------------------

def test_garbage_bytes():
    msg = rejected(b"\xc1\xc1 not msgpack at all")
    assert "rejected message" in msg and "malformed" in msg


def test_empty_bytes():
    assert "truncated" in rejected(b"")


@pytest.mark.parametrize("cut", [1, 5, 20])
def test_truncated_message(cut):
    data = encode(ALL_MESSAGES[6])
    assert "truncated" in rejected(data[:-cut])


def test_foreign_type_tag():
    assert "Foo" in rejected(raw(type="Foo", x=1))


def test_map_without_type_tag():
    rejected(raw(request_id="r", offset=0))


def test_non_map_payload():
    rejected(msgspec.msgpack.encode([1, 2, 3]))


def test_unknown_extra_field():
    msg = rejected(raw(**chunk_fields(extra=1)))
    assert "extra" in msg


@pytest.mark.parametrize("field,value", [
    ("offset", "0"),
    ("token_ids", ["a"]),
    ("token_ids", 5),
    ("logprobs", ["x", "y"]),
    ("versions", [0.5, 1.5]),
    ("request_id", 17),
])
def test_wrong_field_types_name_the_field(field, value):
    assert field in rejected(raw(**chunk_fields(**{field: value})))


def test_missing_required_field():
    fields = chunk_fields()
    del fields["versions"]
    assert "versions" in rejected(raw(**fields))


def test_bad_finish_reason():
    msg = rejected(raw(type="RolloutFinished", request_id="r", finish_reason="boom", num_tokens=1))
    assert "finish_reason" in msg


def test_token_chunk_logprob_length_mismatch():
    msg = rejected(raw(**chunk_fields(logprobs=[-0.1])))
    assert "TokenChunk" in msg and "r" in msg and "logprobs" in msg


def test_token_chunk_version_length_mismatch():
    msg = rejected(raw(**chunk_fields(versions=[0, 0, 0])))
    assert "versions" in msg and "2 token_ids" in msg


def test_token_chunk_empty_logprobs_allowed():
    msg = Decoder().decode(raw(**chunk_fields(logprobs=[])))
    assert msg.logprobs == [] and msg.token_ids == [1, 2]


def test_token_chunk_negative_offset():
    assert "negative offset" in rejected(raw(**chunk_fields(offset=-1)))


@pytest.mark.parametrize("max_tokens", [0, -5])
def test_rollout_request_needs_positive_max_tokens(max_tokens):
    data = encode(RolloutRequest(request_id="q7", group_id="g", prompt_ids=[1], max_tokens=max_tokens))
    msg = rejected(data)
    assert "q7" in msg and "max_tokens" in msg


def test_to_generator_decoder_rejects_token_chunk():
    msg = rejected(encode(ALL_MESSAGES[6]), Decoder(ToGenerator))
    assert "TokenChunk" in msg


def test_from_generator_decoder_rejects_rollout_request():
    msg = rejected(encode(ALL_MESSAGES[0]), Decoder(FromGenerator))
    assert "RolloutRequest" in msg


# --- ZMQ channels --------------------------------------------------------------------

def free_addr() -> str:
    return f"tcp://127.0.0.1:{free_ports(1)[0]}"


@pytest.mark.parametrize("consecutive", [False, True])
def test_free_ports_are_free_distinct_and_outside_the_ephemeral_range(consecutive):
    low, high = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    ports = free_ports(6, consecutive=consecutive)
    assert len(set(ports)) == 6 and not any(low <= p <= high for p in ports)
    if consecutive:
        assert ports == list(range(ports[0], ports[0] + 6))
    socks = [socket.socket() for _ in ports]
    try:
        for sk, p in zip(socks, ports):
            sk.bind(("127.0.0.1", p))
    finally:
        for sk in socks:
            sk.close()


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


@pytest.fixture
def pair(ctx):
    """(sender, receiver) connected over tcp on 127.0.0.1."""
    addr = free_addr()
    rx = ZmqChannel(addr, send=False, bind=True, decoder=Decoder(FromGenerator), ctx=ctx)
    tx = ZmqChannel(addr, send=True, bind=False, ctx=ctx)
    yield tx, rx
    tx.close()
    rx.close()


def chunk(i: int) -> TokenChunk:
    return TokenChunk(request_id="r", offset=i, token_ids=[i], logprobs=[-1.0], versions=[0])


def test_channel_delivers_a_message(pair):
    tx, rx = pair
    tx.send(chunk(0))
    assert rx.recv(timeout_ms=5000) == chunk(0)
    assert rx.rejected == 0


def test_garbage_is_skipped_and_counted(pair):
    tx, rx = pair
    tx.send_raw(b"\xc1garbage")
    tx.send_raw(raw(type="Foo"))
    tx.send(ALL_MESSAGES[0])  # valid msgpack, wrong direction for this receiver
    tx.send(chunk(1))
    assert rx.recv(timeout_ms=5000) == chunk(1)
    assert rx.rejected == 3


def test_multipart_message_is_rejected(pair):
    tx, rx = pair
    tx._sock.send_multipart([encode(chunk(0)), b"extra"])
    tx.send(chunk(2))
    assert rx.recv(timeout_ms=5000) == chunk(2)
    assert rx.rejected == 1


def test_recv_times_out_with_none(pair):
    _, rx = pair
    t0 = time.monotonic()
    assert rx.recv(timeout_ms=100) is None
    assert time.monotonic() - t0 >= 0.09


def test_recv_after_only_garbage_times_out(pair):
    tx, rx = pair
    tx.send_raw(b"\xc1")
    assert rx.recv(timeout_ms=300) is None
    assert rx.rejected == 1


def test_recv_timeout_holds_under_garbage_stream(pair):
    tx, rx = pair
    stop = threading.Event()

    def spam():
        end = time.monotonic() + 1.5
        while time.monotonic() < end and not stop.is_set():
            tx.send_raw(b"\xc1")
            time.sleep(0.02)

    th = threading.Thread(target=spam)
    th.start()
    try:
        t0 = time.monotonic()
        assert rx.recv(timeout_ms=200) is None
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        th.join()
    assert elapsed < 1.0, f"recv(timeout_ms=200) took {elapsed:.2f} s"


def test_backpressure_blocks_sender_and_loses_nothing(ctx):
    addr = free_addr()
    n = 2000
    rx = ZmqChannel(addr, send=False, bind=True, hwm=10, ctx=ctx)
    tx = ZmqChannel(addr, send=True, bind=False, hwm=10, ctx=ctx)
    # ~50 KB per message, so 2000 of them (100 MB) cannot all sit in kernel
    # socket buffers: the sender must block until the receiver drains.
    big_id = "x" * 50_000
    sent = 0

    def send_all():
        nonlocal sent
        for i in range(n):
            tx.send(TokenChunk(request_id=big_id, offset=i, token_ids=[i], logprobs=[], versions=[0]))
            sent += 1

    sender = threading.Thread(target=send_all)
    got: list[int] = []

    def drain():
        while len(got) < n:
            msg = rx.recv(timeout_ms=10000)
            if msg is None:
                return
            assert msg.token_ids == [msg.offset]
            got.append(msg.offset)

    try:
        sender.start()
        time.sleep(0.3)
        assert sent < n, "sender never blocked: the high-water mark did not apply"
        receiver = threading.Thread(target=drain)
        receiver.start()
        receiver.join(timeout=30)
        sender.join(timeout=30)
        assert not receiver.is_alive() and not sender.is_alive()
        assert got == list(range(n))
        assert rx.rejected == 0
    finally:
        tx.close()
        rx.close()


async def test_async_channel_round_trip_and_skips_garbage():
    addr = free_addr()
    actx = zmq.asyncio.Context()
    sctx = zmq.Context()
    rx = AsyncZmqChannel(addr, send=False, bind=True, decoder=Decoder(ToGenerator), ctx=actx)
    tx = AsyncZmqChannel(addr, send=True, bind=False, ctx=actx)
    raw_tx = ZmqChannel(addr, send=True, bind=False, ctx=sctx)
    try:
        raw_tx.send_raw(b"\xc1garbage")
        raw_tx.send(Shutdown())
        assert await asyncio.wait_for(rx.recv(), timeout=5) == Shutdown()
        assert rx.rejected == 1
        sent = [ALL_MESSAGES[0], AbortRequests(request_ids=["a"]), UpdateWeights(version=1, uri="u"), Shutdown()]
        for m in sent:
            await tx.send(m)
        got = [await asyncio.wait_for(rx.recv(), timeout=5) for _ in sent]
        assert got == sent
    finally:
        raw_tx.close()
        tx.close()
        rx.close()
        sctx.term()
        actx.term()


def test_continuation_to_be_scored_needs_every_response_logprob():
    def req(**kw):
        return encode(RolloutRequest(request_id="c", group_id="g", prompt_ids=[1], max_tokens=4,
                                     response_ids=[2, 3], **kw))
    assert "response_logprobs has 1 values for 2 response_ids" in rejected(req(score_at=8, response_logprobs=[-1.0]))
    assert "still to be scored" in rejected(req(score_at=8))
    assert "response_logprobs has 3 values" in rejected(req(response_logprobs=[-1.0, -2.0, -3.0]))
    ok = Decoder().decode(req(score_at=8, response_logprobs=[-1.0, -2.0]))
    assert ok.response_logprobs == [-1.0, -2.0]
    assert Decoder().decode(req()).response_logprobs == []  # no score wanted: none needed


def test_a_channel_waits_out_a_timeout_under_one_millisecond():
    # Rounded down to whole milliseconds, the wait was poll(0) and returned at once.
    port = free_ports(1)[0]
    inbox = ZmqChannel(f"tcp://127.0.0.1:{port}", send=False, bind=True)
    try:
        t0 = time.monotonic()
        assert inbox.recv(timeout_ms=1) is None
        assert time.monotonic() - t0 >= 0.001
    finally:
        inbox.close()


# --- TokenBatch: one engine step's chunks and finishes ------------------------------

@settings(max_examples=50, deadline=None)
@given(st.lists(token_chunks(), min_size=1, max_size=8))
def test_token_batch_round_trips_in_order(chunks):
    batch = TokenBatch(messages=chunks, run="job")
    out = Decoder(FromGenerator, "job").decode(encode(batch))
    assert out.messages == chunks


def test_token_batch_is_checked_message_by_message():
    bad = dict(type="TokenBatch", messages=[chunk_fields(), chunk_fields(versions=[0])])
    assert "2 token_ids but 2 logprobs and 1 versions" in rejected(raw(**bad))
    assert "empty TokenBatch" in rejected(raw(type="TokenBatch", messages=[]))
    # Only chunks and finishes travel in a batch.
    ready = dict(type="GeneratorReady", generator_id="g", version=0, max_model_len=8)
    rejected(raw(type="TokenBatch", messages=[ready]))


def test_a_batched_message_of_another_job_is_rejected():
    batch = dict(type="TokenBatch", run="job", messages=[chunk_fields(run="other")])
    assert "another job" in rejected(raw(**batch), Decoder(FromGenerator, "job"))
    batch["messages"] = [chunk_fields(run="job"), chunk_fields()]
    assert len(Decoder(FromGenerator, "job").decode(raw(**batch)).messages) == 2


def test_a_negative_attention_window_is_refused_naming_the_field():
    with pytest.raises(ProtocolError, match="window"):
        Decoder(ToGenerator).decode(raw(type="SetAttentionWindow", window=-1))
