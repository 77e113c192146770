"""GeneratorPool over real ZMQ sockets: two stand-in generators (the sockets a
generator service binds) answer as the service would."""

from __future__ import annotations

import time

import pytest

from stream_rl.config import generator_addrs, load_config
from stream_rl.generator.client import GeneratorClient, GeneratorError
from stream_rl.generator.pool import GeneratorPool
from stream_rl.codec import Decoder
from stream_rl.protocol import (AbortRequests, AttentionWindowSet, SetAttentionWindow, GeneratorReady, RolloutFinished,
                                RolloutRequest, TokenChunk, ToGenerator, UpdateWeights, WeightsUpdated,
                                WeightsUpdateFailed)
from stream_rl.transport import ZmqChannel, free_ports
from tests.conftest import ROOT


class StandIn:
    """The two bound channels of generator `index`."""

    def __init__(self, cfg, index):
        req, stream = generator_addrs(cfg.generator, index)
        self.inbox = ZmqChannel(req, send=False, bind=True, decoder=Decoder(ToGenerator))
        self.outbox = ZmqChannel(stream, send=True, bind=True)

    def take(self, n, timeout_ms=2000):
        out = []
        while len(out) < n:
            msg = self.inbox.recv(timeout_ms)
            assert msg is not None, f"expected {n} messages, got {out}"
            out.append(msg)
        return out

    def close(self):
        self.inbox.close()
        self.outbox.close()


@pytest.fixture
def two(tmp_path):
    port = free_ports(1)[0]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "generator.count=2", f"generator.request_addr=tcp://127.0.0.1:{port}",
        f"generator.stream_addr=tcp://127.0.0.1:{port + 1}"])
    gens = [StandIn(cfg, i) for i in range(2)]
    pool = GeneratorPool([GeneratorClient(cfg, i) for i in range(2)])
    yield gens, pool
    for g in gens:
        g.close()
    for c in pool.clients:
        c.close()


def req(rid):
    return RolloutRequest(request_id=rid, group_id="g", prompt_ids=[1, 2], max_tokens=4)


def test_addresses_step_by_two_per_generator():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["generator.count=3"])
    assert generator_addrs(cfg.generator, 2) == ("tcp://127.0.0.1:5559", "tcp://127.0.0.1:5560")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["generator.count=2", "generator.hosts=[a, b]"])
    assert generator_addrs(cfg.generator, 0) == ("tcp://a:5555", "tcp://a:5556")
    assert generator_addrs(cfg.generator, 1) == ("tcp://b:5557", "tcp://b:5558")


def test_requests_balance_and_aborts_follow_their_generator(two):
    gens, pool = two
    for i in range(4):
        pool.submit(req(f"r{i}"))
    got = [[m.request_id for m in g.take(2)] for g in gens]
    assert sorted(got[0] + got[1]) == ["r0", "r1", "r2", "r3"] and pool.running == [2, 2]
    pool.abort([got[1][0], got[0][1], "unknown"])
    a0, a1 = gens[0].take(1)[0], gens[1].take(1)[0]
    assert isinstance(a0, AbortRequests) and a0.request_ids == [got[0][1]]
    assert a1.request_ids == [got[1][0]]
    # Streams of both are read as one; a finished request frees its slot.
    gens[1].outbox.send(TokenChunk(request_id=got[1][1], offset=0, token_ids=[5], logprobs=[-0.1], versions=[0]))
    gens[0].outbox.send(RolloutFinished(request_id=got[0][0], finish_reason="stop", num_tokens=1))
    seen = [pool.recv(2000), pool.recv(2000)]
    assert {type(m).__name__ for m in seen} == {"TokenChunk", "RolloutFinished"}
    assert pool.running == [1, 2] and pool.recv(50) is None
    pool.submit(req("r4"))  # the less loaded generator
    assert gens[0].take(1)[0].request_id == "r4"


def test_weight_update_completes_when_every_generator_serves_it(two):
    gens, pool = two
    pool.begin_update(1, "file:///w")
    assert all(isinstance(m, UpdateWeights) and m.version == 1 for g in gens for m in g.take(1))
    gens[0].outbox.send(WeightsUpdated(version=1, load_s=0.1))
    gens[1].outbox.send(TokenChunk(request_id="x", offset=0, token_ids=[1], logprobs=[], versions=[0]))
    assert isinstance(pool.recv(2000), TokenChunk)  # the weight reply is consumed, the chunk passes
    assert pool.pending == 1 and pool.version == 0
    gens[1].outbox.send(WeightsUpdated(version=1, load_s=0.1))
    assert pool.recv(300) is None
    assert pool.pending is None and pool.version == 1
    with pytest.raises(GeneratorError, match="not above"):
        pool.begin_update(1, "file:///w")
    # A failed load is reported, naming the generator.
    pool.begin_update(2, "file:///w2")
    gens[1].outbox.send(WeightsUpdateFailed(version=2, error="shape mismatch"))
    with pytest.raises(GeneratorError, match="generator 1 failed .* shape mismatch"):
        pool.recv(2000)


def test_attention_window_replies_are_recorded_and_consumed(two):
    gens, pool = two
    gens[0].outbox.send(AttentionWindowSet(window=32, layers=4))
    gens[1].outbox.send(AttentionWindowSet(window=0, layers=0, error="no window on this backend"))
    gens[1].outbox.send(TokenChunk(request_id="x", offset=0, token_ids=[1], logprobs=[], versions=[0]))
    got = [pool.recv(2000) for _ in range(3)]
    assert [type(m) for m in got if m is not None] == [TokenChunk]  # the replies stop in the pool
    assert pool.windows == {0: 32, 1: 0}
    # The client's own call waits for the reply and names a refusal.
    gens[1].outbox.send(AttentionWindowSet(window=0, layers=0, error="no window on this backend"))
    with pytest.raises(GeneratorError, match="attention window 16: no window"):
        pool.clients[1].set_attention_window(16, timeout_s=5)
    assert isinstance(gens[1].take(1)[0], SetAttentionWindow)


def test_a_timed_wait_blocks_instead_of_spinning(two):
    # A wait's last fraction of a millisecond once rounded down to poll(0):
    # the controller spun through it on the core it shares with the learner
    # (about 20 polls per 5 ms wait in a stream run).
    import time

    _, pool = two
    polls = []
    real = pool._poller.poll
    pool._poller.poll = lambda timeout=None: polls.append(timeout) or real(timeout)
    for _ in range(20):
        t0 = time.monotonic()
        assert pool.recv(timeout_ms=5) is None
        assert time.monotonic() - t0 >= 0.005
    assert len(polls) <= 40, f"{len(polls)} polls for 20 waits: {polls[:12]}"
    assert 0 not in polls


def test_a_generator_silent_with_requests_running_is_lost_and_its_requests_come_back_as_aborts(two):
    gens, pool = two
    pool.hang_timeout_s = 0.5
    pool.submit(req("a"))
    pool.submit(req("b"))
    (a,), (b,) = gens[0].take(1), gens[1].take(1)
    # An idle generator is never hung, however long it is quiet: only 0 runs a request.
    # Generator 1 streams on; generator 0 goes silent with its request running.
    seen, offset, deadline = [], 0, time.monotonic() + 10
    while time.monotonic() < deadline and not any(isinstance(m, RolloutFinished) for m in seen):
        gens[1].outbox.send(TokenChunk(request_id=b.request_id, offset=offset, token_ids=[5], logprobs=[-0.1],
                                       versions=[0]))
        offset += 1
        seen.append(pool.recv(100))
    ended = [m for m in seen if isinstance(m, RolloutFinished)]
    assert [(m.request_id, m.finish_reason) for m in ended] == [(a.request_id, "abort")]
    assert pool.recovered == {a.request_id} and pool.running == [0, 1] and pool.live == [1]
    assert pool.clients[0].hung and pool.stats()["generators_lost"] == 1
    pool.submit(req("c"))  # only the survivor takes requests now
    assert gens[1].take(1)[0].request_id == "c"
    # The last one lost, with no restart: the job cannot go on, and says why.
    pool.clients[1].exit_cause = lambda: "generator 1 process was killed by SIGKILL"
    with pytest.raises(GeneratorError, match="no generator is left .* killed by SIGKILL"):
        pool.check_alive()


class Dies(GeneratorClient):
    """A client whose process is gone once `dead` is set (what
    GeneratorProcess learns from its process)."""
    dead = False

    def exit_cause(self):
        return "generator process was killed by SIGKILL" if self.dead else None


def test_a_lost_generator_restarts_rejoins_with_the_weights_and_takes_the_waiting_requests(tmp_path):
    port = free_ports(1)[0]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"generator.request_addr=tcp://127.0.0.1:{port}", f"generator.stream_addr=tcp://127.0.0.1:{port + 1}"])
    gen = StandIn(cfg, 0)
    started = []

    def restart(i):
        started.append(i)
        return GeneratorClient(cfg, i)

    pool = GeneratorPool([Dies(cfg, 0)], restart=restart, max_restarts=1, backoff_s=0.2)
    try:
        pool.submit(req("a"))
        gen.take(1)
        gen.outbox.send(TokenChunk(request_id="a", offset=0, token_ids=[5, 6], logprobs=[-0.1, -0.2],
                                   versions=[0, 0]))
        time.sleep(0.2)
        pool.clients[0].dead = True
        gen.close()
        # What it streamed before it went, then its request's end.
        got = [pool.recv(2000), pool.recv(2000)]
        assert isinstance(got[0], TokenChunk) and got[0].token_ids == [5, 6]
        assert (got[1].request_id, got[1].finish_reason) == ("a", "abort")
        pool.submit(req("a2"))  # none serves: it waits
        assert pool.queued.keys() == {"a2"} and pool.live == []
        gen = StandIn(cfg, 0)
        assert pool.recv(1500) is None and started == [0]  # restarted after the backoff
        gen.outbox.send(GeneratorReady(generator_id="gen0", version=0, max_model_len=64))
        assert pool.recv(300) is None and pool.joining == [0]
        receivers = pool.receivers()
        assert receivers.generators == [0] and receivers.epoch == 2  # lost, then rejoining
        assert pool.begin_update(3, "file:///w3", receivers)
        (update,) = gen.take(1)
        assert isinstance(update, UpdateWeights) and update.version == 3
        assert pool.queued  # not before it serves the current weights
        gen.outbox.send(WeightsUpdated(version=3, load_s=0.1))
        assert pool.recv(300) is None
        assert pool.live == [0] and pool.pending is None and pool.version == 3
        assert gen.take(1)[0].request_id == "a2" and not pool.queued
        stats = pool.stats()
        assert stats["generators_lost"] == 1 and stats["generator_restarts"] == 1
        assert stats["rollouts_recovered"] == 1 and stats["no_generator_s"] > 0.2
    finally:
        gen.close()
        for c in pool.clients:
            c.close()


def test_restarts_that_all_fail_end_the_job_instead_of_waiting_forever(tmp_path):
    port = free_ports(1)[0]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"generator.request_addr=tcp://127.0.0.1:{port}", f"generator.stream_addr=tcp://127.0.0.1:{port + 1}"])
    tries = []

    def restart(i):
        tries.append(i)
        raise RuntimeError("its node has no room")

    dying = Dies(cfg, 0)
    pool = GeneratorPool([dying], restart=restart, max_restarts=2, backoff_s=0.05)
    try:
        dying.dead = True
        with pytest.raises(GeneratorError, match="could not be started again.*no room"):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pool.recv(200)
        assert tries == [0, 0]
    finally:
        for c in pool.clients:
            c.close()


def test_a_transfer_that_loses_a_receiver_is_abandoned_and_the_survivors_failure_is_no_error(two):
    gens, pool = two
    assert pool.begin_update(1, "torch-dist://v1", pool.receivers())
    for g in gens:
        g.take(1)
    pool.clients[1].exit_cause = lambda: "generator 1 process was killed by SIGKILL"
    pool.clients[1].kill = lambda: None
    pool.check_alive()  # lost mid-transfer: the version is abandoned, not waited for
    assert pool.pending is None and 1 in pool.abandoned and pool.live == [0]
    gens[0].outbox.send(WeightsUpdateFailed(version=1, error="Connection closed by peer"))
    assert pool.recv(300) is None  # expected: logged, not raised
    # Weights staged for the receivers before the loss cannot be delivered.
    stale = pool.receivers().__class__(epoch=0, generators=[0, 1])
    assert not pool.begin_update(2, "torch-dist://v2", stale) and pool.pending is None
    assert pool.begin_update(3, "torch-dist://v3", pool.receivers())
    assert gens[0].take(1)[0].version == 3


def test_a_batch_is_handed_out_in_order_and_its_finishes_free_their_slots(two):
    from stream_rl.protocol import TokenBatch
    gens, pool = two
    for i in range(4):
        pool.submit(req(f"r{i}"))
    got = [[m.request_id for m in g.take(2)] for g in gens]
    a, b = got[0]
    gens[0].outbox.send(TokenBatch(messages=[
        TokenChunk(request_id=a, offset=0, token_ids=[5], logprobs=[-0.1], versions=[0]),
        RolloutFinished(request_id=a, finish_reason="stop", num_tokens=1),
        RolloutFinished(request_id=b, finish_reason="abort", num_tokens=0)]))
    gens[1].outbox.send(TokenChunk(request_id=got[1][0], offset=0, token_ids=[6], logprobs=[-0.1], versions=[0]))
    deadline = time.monotonic() + 3
    seen = []
    while len(seen) < 4 and time.monotonic() < deadline:
        msg = pool.recv(200)
        if msg is not None:
            seen.append(msg)
    mine = [(type(m).__name__, m.request_id) for m in seen if m.request_id in (a, b)]
    assert mine == [("TokenChunk", a), ("RolloutFinished", a), ("RolloutFinished", b)]
    assert len(seen) == 4 and pool.running == [0, 2]
