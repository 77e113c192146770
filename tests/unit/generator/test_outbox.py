"""The generator's coalescing outbox: one engine step's chunks leave as one
TokenBatch, in order, under backpressure and the byte cap; and the
controller's client hands them out one by one."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rl.config import load_config
from stream_rl.generator.client import GeneratorClient
from stream_rl.generator.outbox import Outbox
from stream_rl.codec import ProtocolError, encode
from stream_rl.protocol import GeneratorReady, RequestRejected, RolloutFinished, TokenBatch, TokenChunk, unbatched
from stream_rl.transport import AsyncZmqChannel, free_ports
from tests.conftest import ROOT


class Recording:
    """An async channel that records what is sent; `gate` cleared: sends wait (a full socket)."""

    def __init__(self, max_bytes=None):
        self.sent, self.gate, self.max_bytes = [], asyncio.Event(), max_bytes
        self.gate.set()

    async def send(self, msg):
        if self.max_bytes is not None and len(encode(msg)) > self.max_bytes:
            raise ProtocolError(f"a {type(msg).__name__} exceeds the cap")
        await self.gate.wait()
        self.sent.append(msg)

    def close(self):
        pass


def chunk(rid, offset=0, n=2):
    return TokenChunk(request_id=rid, offset=offset, token_ids=list(range(n)), logprobs=[-0.5] * n, versions=[0] * n)


def flat(sent):
    return [m for msg in sent for m in unbatched(msg)]


def test_one_turns_chunks_leave_as_one_batch_and_a_lone_one_alone():
    async def main():
        out = Outbox(Recording())
        # Tasks woken together (one engine step's outputs) each send theirs.
        await asyncio.gather(*(out.send(chunk(f"r{i}")) for i in range(5)))
        await out.drain()
        await out.send(chunk("r9"))
        await out.drain()
        return out.channel.sent

    sent = asyncio.run(main())
    assert isinstance(sent[0], TokenBatch) and [m.request_id for m in sent[0].messages] == [f"r{i}" for i in range(5)]
    assert isinstance(sent[1], TokenChunk) and len(sent) == 2


def test_another_kind_of_message_goes_after_what_waits():
    async def main():
        out = Outbox(Recording())
        await out.send(chunk("a"))
        await out.send(RolloutFinished(request_id="a", finish_reason="stop", num_tokens=2))
        await out.send(GeneratorReady(generator_id="g", version=1, max_model_len=8))
        return out.channel.sent

    sent = asyncio.run(main())
    assert [type(m).__name__ for m in flat(sent)] == ["TokenChunk", "RolloutFinished", "GeneratorReady"]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=40), st.integers(1, 6))
def test_under_backpressure_nothing_is_lost_or_reordered_and_senders_wait(sizes, max_pending):
    """Each task streams its chunks while the socket is blocked for a while:
    every chunk arrives, each request's in offset order, and no batch holds
    more than max_pending."""
    async def stream(out, rid, n):
        for k in range(n):
            await out.send(chunk(rid, offset=2 * k))

    async def main():
        out = Outbox(Recording(), max_pending=max_pending)
        out.channel.gate.clear()
        tasks = [asyncio.create_task(stream(out, f"r{i}", n)) for i, n in enumerate(sizes)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(out.pending) <= max_pending  # the senders wait
        out.channel.gate.set()
        await asyncio.gather(*tasks)
        await out.drain()
        return out.channel.sent

    sent = asyncio.run(main())
    assert all(len(unbatched(m)) <= max_pending for m in sent)
    got = flat(sent)
    assert len(got) == sum(sizes)
    for i, n in enumerate(sizes):
        assert [m.offset for m in got if m.request_id == f"r{i}"] == [2 * k for k in range(n)]


def test_a_batch_over_the_byte_cap_goes_in_parts_and_a_chunk_over_it_is_rejected():
    async def main():
        out = Outbox(Recording(max_bytes=len(encode(chunk("r0", n=40))) * 2 + 64))
        await asyncio.gather(*(out.send(chunk(f"r{i}", n=40)) for i in range(8)))
        await out.drain()
        await out.send(chunk("huge", n=400))
        await out.drain()
        return out.channel.sent

    sent = asyncio.run(main())
    got = flat(sent)
    assert [m.request_id for m in got[:8]] == [f"r{i}" for i in range(8)] and len(sent) > 2
    assert isinstance(got[-1], RequestRejected) and got[-1].request_id == "huge" and "cap" in got[-1].error


def test_the_client_hands_a_batch_out_message_by_message_over_real_sockets():
    port = free_ports(1)[0]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"generator.request_addr=tcp://127.0.0.1:{port}",
                                                       f"generator.stream_addr=tcp://127.0.0.1:{port + 1}"])
    client = GeneratorClient(cfg)

    async def main():
        out = Outbox(AsyncZmqChannel(f"tcp://127.0.0.1:{port + 1}", send=True, bind=True, run=cfg.run.id))
        await asyncio.sleep(0.2)  # the client's connection
        await asyncio.gather(*(out.send(chunk(f"r{i}")) for i in range(3)))
        await out.send(RolloutFinished(request_id="r0", finish_reason="stop", num_tokens=2))
        await out.drain()
        await asyncio.sleep(0.2)
        out.close()
        return out.sent_batches

    try:
        assert asyncio.run(main()) == 1
        got = [client.recv(1000) for _ in range(4)]
        assert [type(m).__name__ for m in got] == ["TokenChunk"] * 3 + ["RolloutFinished"]
        assert [m.request_id for m in got] == ["r0", "r1", "r2", "r0"] and client.recv(50) is None
    finally:
        client.close()


@pytest.mark.parametrize("n", [1, 3])
def test_take_reads_without_waiting(n):
    port = free_ports(1)[0]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"generator.request_addr=tcp://127.0.0.1:{port}",
                                                       f"generator.stream_addr=tcp://127.0.0.1:{port + 1}"])
    client = GeneratorClient(cfg)
    assert client.take() == []

    async def main():
        out = Outbox(AsyncZmqChannel(f"tcp://127.0.0.1:{port + 1}", send=True, bind=True, run=cfg.run.id))
        await asyncio.sleep(0.2)
        await asyncio.gather(*(out.send(chunk(f"r{i}")) for i in range(n)))
        await out.drain()
        await asyncio.sleep(0.2)
        out.close()

    try:
        asyncio.run(main())
        assert [m.request_id for m in client.take()] == [f"r{i}" for i in range(n)]
    finally:
        client.close()
