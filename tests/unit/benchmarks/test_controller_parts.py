"""`bench controller`'s pure parts (the ramp, the lengths) and its load
generator's wire behaviour against real sockets, in this process."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from benchmarks.controller import Ramp, p99, sustained
from benchmarks.load_generator import LoadGenerator, LoadSpec, response_length, rollout_of
from stream_rl.codec import Decoder
from stream_rl.protocol import (AbortRequests, FromGenerator, GeneratorReady, Hello, RolloutFinished, RolloutRequest,
                                TokenChunk, unbatched)
from stream_rl.transport import ZmqChannel, free_ports


def test_response_lengths_are_the_rollouts_own_lognormal_and_capped():
    lens = [response_length(f"g{i}-{j}", 120.0, 0.8, 320) for i in range(500) for j in range(8)]
    assert lens[:8] == [response_length(f"g0-{j}", 120.0, 0.8, 320) for j in range(8)]  # by id alone
    assert 1 <= min(lens) and max(lens) == 320
    assert 100 <= statistics.median(lens) <= 140
    assert rollout_of("g3-1.2") == "g3-1" and rollout_of("g3-1.2~ab") == "g3-1"


def _ramp_against(capacity: float, start: float, bisections: int = 2) -> tuple[Ramp, list[float]]:
    r, tried = Ramp(start, 4e6, bisections), []
    while (rate := r.next()) is not None:
        tried.append(rate)
        r.record(rate, rate <= capacity)
    return r, tried


def test_the_ramp_doubles_then_bisects_below_the_first_failure():
    r, tried = _ramp_against(300_000, 50_000)
    assert tried[:4] == [50_000, 100_000, 200_000, 400_000]
    assert len(tried) == 6 and 200_000 < tried[4] < 400_000
    assert r.best is not None and 200_000 <= r.best <= 300_000 and r.fail > 300_000


def test_the_ramp_halves_from_a_start_that_fails_and_stops_at_the_cap():
    r, tried = _ramp_against(30_000, 100_000, bisections=1)
    assert tried[:3] == [100_000, 50_000, 25_000] and r.best == pytest.approx(max(t for t in tried if t <= 30_000))
    r, tried = _ramp_against(1e9, 1e6)
    assert tried == [1e6, 2e6, 4e6] and r.best == 4e6


def test_a_trial_holds_only_with_the_rate_taken_nothing_lost_and_the_delay_bounded():
    assert sustained(1000, 960, 0, 0.05)
    assert not sustained(1000, 900, 0, 0.05)
    assert not sustained(1000, 1000, 1, 0.05)
    assert not sustained(1000, 1000, 0, 0.2) and not sustained(1000, 1000, 0, None)
    assert p99([]) is None and p99(list(range(1, 101))) == 99 and p99([3.0]) == 3.0


def _scenario(wire: str) -> tuple[list, LoadGenerator]:
    """Against a load generator in an event loop, from plain sockets: a
    Hello; a request scored at 32; a continuation of 40 tokens aborted midway."""
    req, stream = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    spec = LoadSpec(run="r1", addrs=[(req, stream)], first_index=0, hwm=1000, max_message_bytes=1 << 26,
                    max_model_len=512, vocab_size=100, chunk_tokens=16, max_tokens=320, concurrency=4,
                    feature_floats=64, wire=wire)
    out = ZmqChannel(req, send=True, bind=False, run="r1")
    inp = ZmqChannel(stream, send=False, bind=False, decoder=Decoder(FromGenerator, "r1"))
    got: list = []

    async def pump(gen, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await gen.advance(time.monotonic())
            await asyncio.sleep(0.001)
            while (m := inp.recv(0)) is not None:
                got.extend(unbatched(m))

    async def main():
        gen = LoadGenerator(spec)
        readers = [asyncio.create_task(gen._read(c)) for c in gen.conns]
        try:
            out.send(Hello())
            await pump(gen, 0.3)
            await gen.set_rate(4 * 400.0)  # 400 tokens/s per request
            out.send(RolloutRequest(request_id="g0-0.1", group_id="g0", prompt_ids=[1, 2], max_tokens=33,
                                    score_at=32))
            out.send(RolloutRequest(request_id="g0-1.2", group_id="g0", prompt_ids=[1, 2],
                                    response_ids=list(range(40)), response_logprobs=[-1.0] * 40, max_tokens=280))
            await pump(gen, 0.2)
            out.send(AbortRequests(request_ids=["g0-1.2", "unknown.1"]))
            await pump(gen, 0.2)
            return gen
        finally:
            for t in readers:
                t.cancel()
            gen.close()

    try:
        gen = asyncio.run(main())
    finally:
        out.close()
        inp.close()
    return got, gen


@pytest.mark.parametrize("wire", ["chunk", "batch"])
def test_the_load_generator_streams_in_order_scores_at_the_decision_point_and_aborts(wire):
    got, gen = _scenario(wire)
    assert isinstance(got[0], GeneratorReady) and got[0].max_model_len == 512
    # Scored: it stops at score_at + 1 tokens with "length", the score on its last chunk.
    scored = [m for m in got if getattr(m, "request_id", None) == "g0-0.1"]
    chunks = [m for m in scored if isinstance(m, TokenChunk)]
    assert [c.offset for c in chunks] == [0, 16, 32] and len(chunks[-1].token_ids) == 1
    assert chunks[-1].score is not None and chunks[-1].score.at_tokens == 32
    assert len(chunks[-1].score.features) == 4 * 64 and all(c.score is None for c in chunks[:-1])
    fin = scored[-1]
    assert isinstance(fin, RolloutFinished) and (fin.finish_reason, fin.num_tokens) == ("length", 33)
    # The continuation's offsets start past its 40 tokens; aborted, it says how many it streamed.
    cont = [m for m in got if getattr(m, "request_id", None) == "g0-1.2"]
    cchunks = [m for m in cont if isinstance(m, TokenChunk)]
    assert cchunks[0].offset == 40
    assert all(b.offset == a.offset + len(a.token_ids) for a, b in zip(cchunks, cchunks[1:]))
    n = sum(len(c.token_ids) for c in cchunks)
    assert isinstance(cont[-1], RolloutFinished) and cont[-1].finish_reason == "abort" and cont[-1].num_tokens == n
    assert 0 < n < 280
    assert gen.report()["sent_tokens"] == [33 + n]
