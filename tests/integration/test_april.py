"""APRIL against the real vLLM engine over real ZMQ sockets: over-provisioned
steps, abort at the step's end, token-in continuation across weight updates,
staleness, persistence, pause-and-resume, bad input."""

from __future__ import annotations

import uuid
from collections import defaultdict

import msgspec
import pytest

from stream_rl.buffer.recycling import RecyclingBuffer
from stream_rl.buffer.rollouts import BufferError
from stream_rl.controller.rollouts import RolloutController
from stream_rl.data import PromptSampler
from stream_rl.protocol import RolloutFinished, RolloutRequest, TokenChunk
from stream_rl.pruner import make_pruner
from stream_rl.verifier import make_verifier

from tests.conftest import cfg_with


def _cfg(cfg, **changes):
    """APRIL's recycling on its own (pruning has its own integration tests):
    tiny.yaml's ARRoL would stop every request at its decision point."""
    return cfg_with(cfg, **{"pruner__mode": "none", **changes})

pytestmark = pytest.mark.engine


class Recorder:
    """The generator client, with every request and chunk written down."""

    def __init__(self, client):
        self.client = client
        self.requests: dict[str, RolloutRequest] = {}
        self.chunks: dict[str, list[TokenChunk]] = defaultdict(list)
        self.ends: dict[str, RolloutFinished] = {}

    def submit(self, req):
        assert req.request_id not in self.requests, "a request id was reused"
        # A copy: the request holds the rollout's own (growing) token list.
        self.requests[req.request_id] = msgspec.structs.replace(req, response_ids=list(req.response_ids))
        self.client.submit(req)

    def recv(self, timeout_ms=None):
        msg = self.client.recv(timeout_ms)
        if isinstance(msg, TokenChunk):
            self.chunks[msg.request_id].append(msg)
        elif isinstance(msg, RolloutFinished):
            self.ends[msg.request_id] = msg
        return msg

    def __getattr__(self, name):  # abort, check_alive, version, update_weights
        return getattr(self.client, name)

    def streamed(self, rollout_id: str):
        """Tokens and versions of every request of a rollout, attempt by attempt."""
        ids, vers, lps = [], [], []
        attempts = sorted((int(r.rsplit(".", 1)[1]), r) for r in self.requests if r.rsplit(".", 1)[0] == rollout_id)
        for _, rid in attempts:
            for c in self.chunks[rid]:
                assert c.offset == len(ids), f"{rid}: chunk at {c.offset} after {len(ids)} tokens"
                ids += c.token_ids
                vers += c.versions
                lps += c.logprobs
        return ids, vers, lps, [rid for _, rid in attempts]


@pytest.fixture
def sync_to(generator, engine_cfg, tmp_path):
    """Send the model's own weights under a new version (weights unchanged,
    version bumped: what the tests check is the version bookkeeping)."""
    from stream_rl.learner.trainer import Learner
    from stream_rl.weights_sync.file import FileWeightSender

    weights = Learner(engine_cfg).weights_for_sync()
    sender = FileWeightSender(tmp_path / "weights")

    def sync() -> int:
        v = generator.version + 1
        generator.update_weights(v, sender.stage(weights, v))
        sender.release(v)
        return v
    return sync


def _controller(cfg, client, world, seed=0, buffer=None):
    tok, dataset = world
    return RolloutController(cfg, client, PromptSampler(dataset, True, seed), tok,
                             make_verifier(cfg.data), make_pruner(cfg), buffer=buffer)


def _steps_until_a_partial(ctl, target_groups, tries=5):
    """APRIL steps, each drained, until one leaves a partial that streamed
    tokens. Returns (groups, stats) of every step. Most steps do; on a loaded
    machine the controller can lag so far behind the engine that what it
    aborts at the step's end had all finished or not started yet (CI)."""
    groups, steps = [], []
    for _ in range(tries):
        got, stats = ctl.collect(target_groups, ctl.cfg.generator.overprovision)
        assert len(got) == target_groups
        # never more than overprovision x target in flight
        assert ctl.buffer.num_open_groups <= ctl.cfg.generator.overprovision * target_groups
        groups += got
        steps.append(stats)
        ctl.drain()
        if any(r.response_ids for r in ctl.buffer.partials):
            return groups, steps
    pytest.fail(f"no step of {tries} left a partial with tokens: {[s.aborted for s in steps]} aborted")


def test_april_steps_recycle_partials_without_losing_a_token(generator, engine_cfg, world, sync_to):
    cfg = _cfg(engine_cfg, generator__target_groups=4, generator__overprovision=2.0,
               generator__max_tokens=300)
    rec = Recorder(generator)
    ctl = _controller(cfg, rec, world, seed=11)
    v0 = sync_to()
    # Partials wait in the buffer (their aborts reported); the next steps
    # start by continuing them, after a weight update.
    delivered, steps = _steps_until_a_partial(ctl, 4)
    v1 = sync_to()
    # Steps after the update until a delivered rollout carries tokens of both
    # versions. Two steps usually suffice; with world v10's long ramblers a
    # continued partial's group can take longer to complete (CI, loaded).
    for _ in range(6):
        groups, stats = ctl.collect(4, 2.0)
        assert len(groups) == 4 and ctl.buffer.num_open_groups <= 8
        delivered += groups
        steps.append(stats)
        if len(steps) >= 3 and any(
                v0 in r.versions and v1 in r.versions for g in groups for r in g.rollouts):
            break
    for g in delivered:
        assert len(g.rollouts) == cfg.generator.group_size
    ctl.drain()
    assert sum(s.buffer["partials_continued"] for s in steps) > 0
    # Every delivered rollout is exactly the concatenation of what its
    # requests streamed: nothing lost, nothing duplicated, versions per token.
    mixed = 0
    for g in delivered:
        for r in g.rollouts:
            ids, vers, lps, rids = rec.streamed(r.rollout_id)
            assert r.response_ids == ids and r.versions == vers and r.logprobs == pytest.approx(lps)
            assert len(ids) <= cfg.generator.max_tokens and r.finished
            assert vers == sorted(vers) and min(vers) >= v0
            # Token-in continuation: each request restarts exactly where the
            # previous stopped, and may only spend what is left of the budget.
            done = 0
            for rid in rids:
                req = rec.requests[rid]
                assert req.prompt_ids == r.prompt_ids and req.response_ids == ids[:done]
                assert req.max_tokens == cfg.generator.max_tokens - done
                done += sum(len(c.token_ids) for c in rec.chunks[rid])
            mixed += len(set(vers)) > 1
    assert mixed > 0, "some continued rollout should carry tokens of two policy versions"
    # The partials left over hold exactly what was streamed too.
    for members in ctl.buffer.groups.values():
        for r in members:
            assert r.response_ids == rec.streamed(r.rollout_id)[0]


@pytest.mark.parametrize("policy", ["restart", "drop"])
def test_stale_partials_are_restarted_or_dropped(generator, engine_cfg, world, sync_to, policy):
    cfg = _cfg(engine_cfg, generator__overprovision=2.0, generator__target_groups=3,
               generator__max_tokens=300, buffer__max_staleness=0, buffer__stale_policy=policy)
    rec = Recorder(generator)
    ctl = _controller(cfg, rec, world, seed=23)
    _steps_until_a_partial(ctl, 3)
    stale = [r for r in ctl.buffer.partials if r.response_ids]
    v = sync_to()  # every partial is now one version behind: over the bound of 0
    groups, stats = ctl.collect(3, 2.0)
    ctl.drain()
    if policy == "restart":
        assert stats.buffer["stale_restarted"] >= len(stale) and stats.buffer["stale_dropped_groups"] == 0
        assert stats.buffer["tokens_discarded"] >= len(stale)
        for r in stale:  # regenerated from the prompt, on the new weights only
            assert r.restarts == 1 and set(r.versions) <= {v}
    else:
        assert stats.buffer["stale_dropped_groups"] >= 1 and stats.buffer["stale_restarted"] == 0
        assert all(r.group_id not in ctl.buffer.groups for r in stale)
        assert not {g.group_id for g in groups} & {r.group_id for r in stale}
    assert len(groups) == 3


def test_buffer_saved_and_restored_continues_its_partials(generator, engine_cfg, world, tmp_path):
    cfg = _cfg(engine_cfg, generator__overprovision=2.0, generator__target_groups=3,
               generator__max_tokens=300)
    rec = Recorder(generator)
    ctl = _controller(cfg, rec, world, seed=5)
    ctl.collect(3, 2.0)
    ctl.drain()
    path = tmp_path / "buffer.msgpack"
    ctl.buffer.save(path)
    saved = {r.rollout_id: list(r.response_ids) for members in ctl.buffer.groups.values() for r in members}
    partial_ids = [r.rollout_id for r in ctl.buffer.partials]
    assert partial_ids

    restored = RecyclingBuffer(cfg.generator.group_size, cfg.buffer.max_groups)
    restored.load(path)
    assert restored.state() == ctl.buffer.state()
    ctl2 = _controller(cfg, rec, world, seed=99, buffer=restored)
    delivered = []
    for _ in range(4):
        groups, _ = ctl2.collect(3, 2.0)
        delivered += groups
    ctl2.drain()
    continued = 0
    for g in delivered:
        for r in g.rollouts:
            if r.rollout_id in saved:
                assert r.response_ids[:len(saved[r.rollout_id])] == saved[r.rollout_id]
                continued += r.rollout_id in partial_ids
    assert continued > 0, "restored partials should be continued and delivered"


def test_weight_update_in_flight_pauses_and_resumes_every_request(generator, world, sync_to):
    tok, _ = world
    # 96 requests counting down from the 90s in steps of 1 (~300 tokens
    # each) keep the engine busy for seconds: most are still running when the
    # update arrives, however late the first chunk is seen here.
    ids = [f"keep-{uuid.uuid4().hex[:6]}-{i}" for i in range(96)]
    for i, r in enumerate(ids):
        generator.submit(RolloutRequest(request_id=r, group_id="k", prompt_ids=tok(f"9{i % 8 + 2}a=").input_ids,
                                        max_tokens=300))
    chunks, ends = defaultdict(list), {}
    updated = None
    while len(ends) < len(ids):
        msg = generator.recv(timeout_ms=120_000)
        assert msg is not None, "the generator stopped streaming"
        if isinstance(msg, TokenChunk) and msg.request_id in ids:
            chunks[msg.request_id].append(msg)
            if updated is None:  # at the first chunk: the engine is mid-generation
                before = generator.version
                updated = sync_to()  # recv() keeps the chunks that arrive meanwhile
        elif isinstance(msg, RolloutFinished) and msg.request_id in ids:
            ends[msg.request_id] = msg
    assert updated == before + 1
    saw_both = 0
    for r in ids:
        assert ends[r].finish_reason in ("stop", "length")
        offset, vers = 0, []
        for c in chunks[r]:
            assert c.offset == offset
            offset += len(c.token_ids)
            vers += c.versions
        assert offset == ends[r].num_tokens
        assert vers == sorted(vers) and set(vers) <= {before, updated}
        saw_both += set(vers) == {before, updated}
    assert saw_both > 0, "requests kept through the pause continue on the new version"


def test_a_step_every_request_of_which_is_rejected_fails_loudly(generator, engine_cfg, world):
    """A generator that rejects every request (here: every prompt too long)
    ends the job with the rejection's cause; it used to draw prompt after
    prompt, forever."""
    from stream_rl.data import PromptRow
    from stream_rl.generator.client import GeneratorError

    class TooLong:
        epoch = 1

        def next(self):
            return PromptRow(0, "x", "1", tuple([5] * engine_cfg.model.max_model_len))

    cfg = _cfg(engine_cfg, generator__target_groups=2, generator__max_tokens=64)
    tok, _ = world
    ctl = RolloutController(cfg, generator, TooLong(), tok, make_verifier(cfg.data), make_pruner(cfg))
    ctl.buffer.prefix = "all-rejected-"
    with pytest.raises(GeneratorError, match="rejected 16 requests in a row.*max_model_len"):
        ctl.collect(2, timeout_s=120)
    ctl.stop_running()


def test_bad_requests_in_a_step_drop_their_group_and_spare_the_rest(generator, engine_cfg, world):
    cfg = _cfg(engine_cfg, generator__target_groups=2, generator__max_tokens=64)
    ctl = _controller(cfg, generator, world, seed=3)
    too_long = [5] * cfg.model.max_model_len
    for r in ctl.buffer.new_group(too_long, "1", 64):
        ctl._start(r)
    groups, stats = ctl.collect(2)
    assert len(groups) == 2 and stats.rejected >= 1
    assert all(len(g.rollouts[0].prompt_ids) < cfg.model.max_model_len for g in groups)
    with pytest.raises(BufferError, match="unknown group 'nope'"):
        ctl.buffer.drop_group("nope")
    stray = msgspec.structs.replace(groups[0].rollouts[0], group_id="nope", finish_reason=None)
    with pytest.raises(BufferError, match="unknown group 'nope'"):
        ctl.buffer.start(stray)
    with pytest.raises(BufferError, match="non-empty prompt"):
        ctl.buffer.new_group([], "1", 64)
