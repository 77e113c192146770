"""The service's ledger of worker-reported log-probs: tokens may arrive
before their log-probs, positions are kept per engine request, and a lost
report fails the request instead of streaming a wrong value."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rl.generator.logprob_ledger import LogprobLedger, LogprobsLost
from stream_rl.codec import Decoder, ProtocolError, encode
from stream_rl.protocol import FromWorker, WorkerLogprobs


def report(key: str, first: int, values: list[float]) -> WorkerLogprobs:
    return WorkerLogprobs(keys=[key] * len(values), index=list(range(first, first + len(values))), logprobs=values)


async def test_values_reported_before_they_are_asked_for():
    ledger = LogprobLedger()
    key = ledger.open("r0")
    ledger.add(report(key, 0, [-0.1, -0.2, -0.3]))
    assert await ledger.get(key, 0, 2) == [-0.1, -0.2]
    assert await ledger.get(key, 2, 3) == [-0.3]


async def test_a_token_that_arrives_first_waits_for_its_logprob():
    ledger = LogprobLedger()
    key = ledger.open("r0")
    ledger.add(report(key, 0, [-1.0]))
    task = asyncio.create_task(ledger.get(key, 0, 3))
    await asyncio.sleep(0)
    assert not task.done()
    ledger.add(report(key, 1, [-2.0]))
    await asyncio.sleep(0)
    assert not task.done()
    ledger.add(report(key, 2, [-3.0]))
    assert await asyncio.wait_for(task, 1.0) == [-1.0, -2.0, -3.0]


async def test_a_continuation_under_the_same_request_id_gets_a_fresh_ledger():
    ledger = LogprobLedger()
    first = ledger.open("r0")
    ledger.add(report(first, 0, [-1.0, -2.0]))
    ledger.close(first)
    second = ledger.open("r0")
    assert second != first
    ledger.add(report(first, 2, [-9.0]))  # a late report of the first: dropped
    ledger.add(report(second, 0, [-0.5]))
    assert await ledger.get(second, 0, 1) == [-0.5]


async def test_interleaved_requests_keep_their_own_positions():
    ledger = LogprobLedger()
    a, b = ledger.open("a"), ledger.open("b")
    ledger.add(WorkerLogprobs(keys=[a, b, a, b], index=[0, 0, 1, 1], logprobs=[-1.0, -10.0, -2.0, -20.0]))
    assert await ledger.get(a, 0, 2) == [-1.0, -2.0]
    assert await ledger.get(b, 1, 2) == [-20.0]


async def test_a_lost_report_fails_the_request_with_the_positions():
    ledger = LogprobLedger()
    key = ledger.open("r0")
    ledger.add(report(key, 0, [-1.0]))
    ledger.add(report(key, 3, [-4.0]))  # positions 1 and 2 never came
    assert await ledger.get(key, 0, 1) == [-1.0]
    with pytest.raises(LogprobsLost, match="positions 1-3"):
        await ledger.get(key, 1, 4)


async def test_a_report_that_never_comes_times_out():
    ledger = LogprobLedger(timeout_s=0.05)
    key = ledger.open("r0")
    with pytest.raises(LogprobsLost, match="0 of the 2 tokens"):
        await ledger.get(key, 0, 2)


async def test_closing_cancels_a_waiting_request():
    ledger = LogprobLedger()
    key = ledger.open("r0")
    task = asyncio.create_task(ledger.get(key, 0, 1))
    await asyncio.sleep(0)
    ledger.close(key)
    with pytest.raises(asyncio.CancelledError):
        await task


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(max_value=0.0, allow_nan=False), min_size=1, max_size=40), st.data())
def test_any_split_of_reports_and_reads_gives_the_values_in_order(values, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(values)), max_size=5)))
    reads = sorted(data.draw(st.lists(st.integers(0, len(values)), max_size=5)))

    async def run():
        ledger = LogprobLedger(timeout_s=1.0)
        key = ledger.open("r")

        async def feed():
            for lo, hi in zip([0] + cuts, cuts + [len(values)]):
                await asyncio.sleep(0)
                ledger.add(report(key, lo, values[lo:hi]))

        feeder = asyncio.create_task(feed())
        got = []
        for lo, hi in zip([0] + reads, reads + [len(values)]):
            got += await ledger.get(key, lo, hi)
        await feeder
        return got

    assert asyncio.run(run()) == values


def test_worker_logprobs_wire_check():
    dec = Decoder(FromWorker)
    msg = report("r#1", 4, [-0.25, -1.5])
    assert dec.decode(encode(msg)) == msg
    bad = WorkerLogprobs(keys=["r#1"], index=[0, 1], logprobs=[-0.1, -0.2])
    with pytest.raises(ProtocolError, match="1 keys, 2 indices and 2 logprobs"):
        dec.decode(encode(bad))
    assert not math.isnan(dec.decode(encode(msg)).logprobs[0])
