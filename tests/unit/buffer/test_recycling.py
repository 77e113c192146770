"""Rollout assembly from chunks and APRIL's recycling buffer.

Unit tests for `Rollout` and `RecyclingBuffer`, then a property test that
drives the buffer with a scripted generator (random chunking, step-end aborts,
continuations, version bumps, prunes, dropped groups, save/restore) and checks
the buffer's invariants after every event.
"""

from __future__ import annotations

import itertools
import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rl.buffer.recycling import BufferState, BufferStats, RecyclingBuffer
from stream_rl.buffer.rollouts import BufferError, append_chunk, restart
from stream_rl.protocol import FINISH_REASONS, Group, Rollout, TokenChunk

PROMPT = [1, 2, 3]
_tokens = itertools.count(1000)  # unique token ids: a duplicated token is visible


# --- helpers --------------------------------------------------------------------------------

def chunk(rid: str, offset: int, ids: list[int], version: int = 0, logprobs: bool = True) -> TokenChunk:
    return TokenChunk(request_id=rid, offset=offset, token_ids=list(ids),
                      logprobs=[-0.001 * t for t in ids] if logprobs else [], versions=[version] * len(ids))


def rollout(max_tokens: int = 16) -> Rollout:
    return Rollout(rollout_id="g0-0", group_id="g0", prompt_ids=list(PROMPT), answer="7", max_tokens=max_tokens)


def make_buffer(group_size: int = 2, max_groups: int = 4, **kw) -> RecyclingBuffer:
    return RecyclingBuffer(group_size=group_size, max_groups=max_groups, **kw)


def open_group(buf: RecyclingBuffer, max_tokens: int = 8) -> tuple[list[Rollout], list[str]]:
    """Open a group and start every member; returns (members, request ids)."""
    members = buf.new_group(PROMPT, "7", max_tokens)
    return members, [buf.start(r) for r in members]


def gen(buf: RecyclingBuffer, rid: str, n: int, version: int = 0) -> list[int]:
    """The engine streams `n` new tokens for request `rid` (at the right offset)."""
    ids = [next(_tokens) for _ in range(n)]
    assert buf.on_chunk(chunk(rid, len(buf.running[rid].response_ids), ids, version)) is buf.running[rid]
    return ids


def finish_all(buf: RecyclingBuffer, rids: list[str], reward: float = 1.0) -> None:
    for rid in rids:
        buf.on_finished(rid, "stop", reward)


def snapshot(buf: RecyclingBuffer) -> tuple:
    """Everything observable about a buffer, to check that an event changed nothing."""
    return buf.state(), dict(buf.running), list(buf.partials), set(buf.pruning)


# --- Rollout.append -------------------------------------------------------------------------

def test_contiguous_chunks_append():
    r = rollout()
    append_chunk(r, chunk("g0-0.1", 0, [10, 11], version=0))
    append_chunk(r, chunk("g0-0.1", 2, [12], version=1))
    append_chunk(r, chunk("g0-0.1", 3, [13, 14, 15], version=1))
    assert r.response_ids == [10, 11, 12, 13, 14, 15]
    assert r.logprobs == pytest.approx([-0.010, -0.011, -0.012, -0.013, -0.014, -0.015])
    assert r.versions == [0, 0, 1, 1, 1, 1]
    assert r.tokens_left == 10 and not r.finished


@pytest.mark.parametrize("offset", [3, 5, 1, 0], ids=["gap", "big-gap", "overlap", "duplicate"])
def test_non_contiguous_chunk_raises_and_leaves_rollout_intact(offset):
    r = rollout()
    append_chunk(r, chunk("g0-0.1", 0, [10, 11]))
    before = msgspec.structs.replace(r, response_ids=list(r.response_ids), logprobs=list(r.logprobs),
                                     versions=list(r.versions))
    with pytest.raises(BufferError, match="lost or duplicated") as info:
        append_chunk(r, chunk("g0-0.7", offset, [99]))
    assert "g0-0.7" in str(info.value)  # names the request
    assert f"starts at token {offset}" in str(info.value) and "has 2 tokens" in str(info.value)
    assert r == before


def test_first_chunk_must_start_at_zero():
    r = rollout()
    with pytest.raises(BufferError, match="g0-0.1"):
        append_chunk(r, chunk("g0-0.1", 1, [10]))
    assert r.response_ids == [] and r.logprobs == [] and r.versions == []


def test_chunks_without_logprobs():
    r = rollout()
    append_chunk(r, chunk("r", 0, [10, 11], logprobs=False))
    append_chunk(r, chunk("r", 2, [12], version=3, logprobs=False))
    assert r.logprobs is None
    assert r.response_ids == [10, 11, 12] and r.versions == [0, 0, 3]
    assert restart(r) == 3
    assert r.logprobs is None  # still not requested after a restart
    append_chunk(r, chunk("r", 0, [13], logprobs=False))
    assert r.response_ids == [13] and r.logprobs is None


def test_empty_chunk_keeps_logprobs():
    r = rollout()
    append_chunk(r, chunk("r", 0, [10, 11]))
    append_chunk(r, TokenChunk(request_id="r", offset=2, token_ids=[], logprobs=[], versions=[]))
    append_chunk(r, chunk("r", 2, [12]))
    assert r.response_ids == [10, 11, 12]
    assert r.logprobs == pytest.approx([-0.010, -0.011, -0.012])


@pytest.mark.parametrize("logprobs,versions", [
    ([-0.1], [0, 0]),  # too few logprobs
    ([-0.1, -0.2, -0.3], [0, 0]),  # too many logprobs
    ([-0.1, -0.2], [0]),  # too few versions
    ([], [0, 0, 0]),  # too many versions, no logprobs
], ids=["few-logprobs", "many-logprobs", "few-versions", "many-versions"])
def test_mismatched_lengths_raise_and_leave_rollout_intact(logprobs, versions):
    r = rollout()
    append_chunk(r, chunk("g0-0.1", 0, [10]))
    bad = TokenChunk(request_id="g0-0.1", offset=1, token_ids=[11, 12], logprobs=logprobs, versions=versions)
    with pytest.raises(BufferError, match=r"g0-0\.1 has 2 tokens"):
        append_chunk(r, bad)
    assert r.response_ids == [10] and r.logprobs == pytest.approx([-0.010]) and r.versions == [0]


def test_logprobs_without_tokens_raise():
    r = rollout()
    with pytest.raises(BufferError, match="0 tokens"):
        append_chunk(r, TokenChunk(request_id="r", offset=0, token_ids=[], logprobs=[-0.1], versions=[]))
    assert r.response_ids == [] and r.logprobs == []


def test_restart_clears_tokens_and_counts():
    r = rollout(max_tokens=5)
    r.attempt = 2
    append_chunk(r, chunk("g0-0.2", 0, [10, 11, 12], version=4))
    assert r.tokens_left == 2
    assert restart(r) == 3
    assert (r.response_ids, r.logprobs, r.versions, r.restarts) == ([], [], [], 1)
    assert r.tokens_left == 5 and r.attempt == 2 and r.request_id == "g0-0.2"
    assert restart(r) == 0 and r.restarts == 2
    append_chunk(r, chunk("g0-0.3", 0, [20]))  # generated again from the prompt
    assert r.response_ids == [20]


def test_request_id_and_fresh_rollouts_do_not_share_lists():
    a, b = rollout(), rollout()
    assert a.request_id == "g0-0.0"
    append_chunk(a, chunk("x", 0, [1]))
    assert b.response_ids == [] and b.logprobs == [] and b.versions == []


@settings(max_examples=40, deadline=None)
@given(tokens=st.lists(st.integers(0, 50_000), min_size=1, max_size=100), data=st.data())
def test_random_chunking_reassembles_exactly(tokens, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, len(tokens)), max_size=10)))
    bounds = [0] + [c for c in cuts if c < len(tokens)] + [len(tokens)]
    r = rollout(max_tokens=len(tokens))
    for lo, hi in zip(bounds, bounds[1:]):
        append_chunk(r, TokenChunk(request_id="r", offset=lo, token_ids=tokens[lo:hi],
                            logprobs=[-float(i) for i in range(lo, hi)], versions=list(range(lo, hi))))
    assert r.response_ids == tokens
    assert r.logprobs == [-float(i) for i in range(len(tokens))]
    assert r.versions == list(range(len(tokens)))
    assert r.tokens_left == 0


# --- RecyclingBuffer: new groups and starting requests -----------------------------------------

def test_new_group_makes_group_size_rollouts():
    buf = make_buffer(group_size=3)
    prompt = [5, 6, 7]
    members = buf.new_group(prompt, "42", 9)
    assert [r.rollout_id for r in members] == ["g0-0", "g0-1", "g0-2"]
    assert all(r.group_id == "g0" and r.answer == "42" and r.max_tokens == 9 for r in members)
    assert all(r.prompt_ids == [5, 6, 7] and r.attempt == 0 and not r.finished for r in members)
    prompt.append(8)  # the buffer keeps its own copy of the prompt
    assert all(r.prompt_ids == [5, 6, 7] for r in members)
    assert members[0].prompt_ids is not members[1].prompt_ids
    assert buf.groups["g0"] == members and buf.num_open_groups == 1
    assert [r.rollout_id for r in buf.new_group([1], "x", 4)] == ["g1-0", "g1-1", "g1-2"]
    assert buf.next_group == 2 and buf.stats.groups_started == 2
    assert not buf.running and not buf.partials  # not started yet


def test_start_gives_request_ids_and_increments_attempt():
    buf = make_buffer()
    members = buf.new_group(PROMPT, "7", 8)
    rid = buf.start(members[1])
    assert rid == "g0-1.1" == members[1].request_id and members[1].attempt == 1
    assert buf.running == {"g0-1.1": members[1]}
    assert buf.group_of("g0-1.1") == "g0" and buf.group_of("g0-0.1") is None


def test_start_rollout_of_unknown_group_raises():
    buf = make_buffer()
    with pytest.raises(BufferError, match=r"rollout g0-0 belongs to unknown group 'g0'"):
        buf.start(rollout())
    buf.new_group(PROMPT, "7", 8)
    with pytest.raises(BufferError, match="unknown group"):  # same ids, but not the buffer's rollout
        buf.start(rollout())
    assert not buf.running


def test_start_rollout_of_dropped_group_raises():
    buf = make_buffer()
    members = buf.new_group(PROMPT, "7", 8)
    buf.drop_group("g0")
    with pytest.raises(BufferError, match="unknown group 'g0'"):
        buf.start(members[0])


def test_start_running_rollout_raises():
    buf = make_buffer()
    (r, _), _ = open_group(buf)
    with pytest.raises(BufferError, match="rollout g0-0 is already running"):
        buf.start(r)
    assert r.attempt == 1 and list(buf.running) == ["g0-0.1", "g0-1.1"]


def test_start_finished_rollout_raises():
    buf = make_buffer()
    (r, _), (rid, _) = open_group(buf)
    buf.on_finished(rid, "stop", 1.0)
    with pytest.raises(BufferError, match="rollout g0-0 is already finished"):
        buf.start(r)
    assert r.attempt == 1 and "g0-0.2" not in buf.running


def test_start_without_budget_raises():
    buf = make_buffer()
    r, _ = buf.new_group(PROMPT, "7", 0)
    with pytest.raises(BufferError, match="rollout g0-0 has no token budget left"):
        buf.start(r)
    assert r.attempt == 0 and not buf.running


def test_empty_prompt_refused():
    buf = make_buffer()
    with pytest.raises(BufferError, match="non-empty prompt"):
        buf.new_group([], "7", 8)
    assert buf.num_open_groups == 0 and buf.next_group == 0 and buf.stats.groups_started == 0


def test_unknown_continuation_order_refused():
    with pytest.raises(BufferError, match="unknown continuation order 'lifo'.*fifo, most_generated"):
        make_buffer(order="lifo")


def test_max_groups_refuses_new_group_and_never_evicts():
    buf = make_buffer(group_size=2, max_groups=2)
    _, a = open_group(buf)
    _, b = open_group(buf)
    gen(buf, a[0], 3)
    buf.on_finished(b[1], "stop", 1.0)
    before = snapshot(buf)
    with pytest.raises(BufferError, match=r"buffer\.max_groups=2"):
        buf.new_group(PROMPT, "7", 8)
    assert snapshot(buf) == before and buf.next_group == 2
    # Completing a group frees a slot; so does dropping one.
    finish_all(buf, a)
    open_group(buf)
    assert buf.num_open_groups == 2
    with pytest.raises(BufferError, match="max_groups"):
        buf.new_group(PROMPT, "7", 8)
    buf.drop_group("g1")
    assert [r.rollout_id for r in buf.new_group(PROMPT, "7", 8)] == ["g3-0", "g3-1"]


# --- group completion ---------------------------------------------------------------------------

def test_group_ready_only_when_all_members_finished():
    buf = make_buffer(group_size=3)
    members, rids = open_group(buf)
    gen(buf, rids[0], 2)
    assert buf.on_finished(rids[2], "length", 0.0) is members[2]
    assert buf.on_finished(rids[0], "stop", 1.0) is members[0]
    # Finished members wait in their open group; nothing is ready yet.
    assert buf.num_ready == 0 and buf.num_open_groups == 1
    assert list(buf.running) == [rids[1]] and not buf.partials
    assert members[0].finished and members[2].finished
    buf.on_finished(rids[1], "stop", 1.0)
    assert buf.num_ready == 1 and buf.num_open_groups == 0 and not buf.running
    (group,) = buf.take_ready(5)
    assert group.group_id == "g0" and group.rollouts == members and group.rollouts[0] is members[0]
    assert [r.finish_reason for r in group.rollouts] == ["stop", "stop", "length"]
    assert group.rewards == [1.0, 1.0, 0.0] and group.num_tokens == 2
    assert buf.stats.groups_completed == 1


def test_take_ready_in_completion_order_and_count():
    buf = make_buffer(group_size=2, max_groups=5)
    rids = {gid: open_group(buf)[1] for gid in ("g0", "g1", "g2")}
    for gid in ("g2", "g0", "g1"):  # completion order differs from opening order
        finish_all(buf, rids[gid])
    assert buf.num_ready == 3
    assert [g.group_id for g in buf.take_ready(2)] == ["g2", "g0"]
    assert buf.num_ready == 1
    assert buf.take_ready(0) == []
    assert [g.group_id for g in buf.take_ready(5)] == ["g1"]
    assert buf.take_ready(1) == [] and buf.stats.groups_completed == 3


def test_unknown_finish_reason_raises():
    buf = make_buffer()
    _, (rid, _) = open_group(buf)
    with pytest.raises(BufferError, match=r"unknown finish reason 'bogus' for g0-0\.1"):
        buf.on_finished(rid, "bogus", 1.0)


def test_unknown_finish_reason_leaves_buffer_unchanged():
    buf = make_buffer()
    (r, _), (rid, _) = open_group(buf)
    before = snapshot(buf)
    with pytest.raises(BufferError):
        buf.on_finished(rid, "bogus", 1.0)
    assert buf.running.get(rid) is r
    assert snapshot(buf) == before


def test_finish_of_unknown_request_is_a_late_message():
    buf = make_buffer()
    open_group(buf)
    before = snapshot(buf)
    assert buf.on_finished("g9-0.1", "stop", 1.0) is None
    assert buf.on_chunk(chunk("g9-0.1", 0, [1])) is None
    assert buf.stats.late_messages == 2 and snapshot(buf)[1:] == before[1:]


# --- abort -> partial -> continuation ----------------------------------------------------------

def test_abort_makes_a_partial():
    buf = make_buffer()
    (r, _), (rid, _) = open_group(buf, max_tokens=8)
    ids = gen(buf, rid, 3)
    assert buf.on_finished(rid, "abort", 0.5) is r
    assert list(buf.partials) == [r] and rid not in buf.running
    assert not r.finished and r.reward is None and r.response_ids == ids
    assert buf.stats.partials_created == 1 and buf.num_open_groups == 1


def test_abort_with_spent_budget_finishes_as_length():
    buf = make_buffer(group_size=1)
    (r,), (rid,) = open_group(buf, max_tokens=3)
    gen(buf, rid, 3)
    buf.on_finished(rid, "abort", 0.25)
    assert r.finish_reason == "length" and r.reward == 0.25
    assert not buf.partials and buf.stats.partials_created == 0
    assert [g.rollouts for g in buf.take_ready(1)] == [[r]]


def test_partials_continue_fifo_with_new_request_ids():
    buf = make_buffer(group_size=3)
    members, rids = open_group(buf, max_tokens=10)
    first = {rid: gen(buf, rid, n, version=0) for rid, n in zip(rids, (1, 4, 0))}
    for i in (2, 0, 1):  # abort order = queue order
        buf.on_finished(rids[i], "abort")
    out, abort = buf.take_partials(version=1)
    assert out == [members[2], members[0], members[1]] and out[0] is members[2] and abort == []
    assert not buf.partials
    assert buf.stats.partials_continued == 2  # the one without tokens is just started again
    new = [buf.start(r) for r in out]
    assert new == ["g0-2.2", "g0-0.2", "g0-1.2"]
    more = gen(buf, "g0-1.2", 2, version=1)
    assert members[1].response_ids == first[rids[1]] + more
    assert members[1].versions == [0, 0, 0, 0, 1, 1] and members[1].tokens_left == 4
    assert members[1].logprobs == pytest.approx([-0.001 * t for t in first[rids[1]] + more])


def test_continuation_chunk_must_continue_past_the_partial():
    buf = make_buffer(group_size=1)
    (r,), (rid,) = open_group(buf)
    gen(buf, rid, 3)
    buf.on_finished(rid, "abort")
    (p,), _ = buf.take_partials(0)
    new = buf.start(p)
    with pytest.raises(BufferError, match=r"g0-0\.2 starts at token 0 but rollout g0-0 has 3 tokens"):
        buf.on_chunk(chunk(new, 0, [1, 2, 3, 4]))
    assert len(r.response_ids) == 3


def test_late_messages_of_the_old_request_change_nothing():
    buf = make_buffer(group_size=1)
    (r,), (old,) = open_group(buf)
    gen(buf, old, 2)
    buf.on_finished(old, "abort")
    # Late while queued as a partial ...
    before = snapshot(buf)
    assert buf.on_chunk(chunk(old, 2, [77])) is None
    assert buf.on_finished(old, "stop", 1.0) is None
    assert snapshot(buf)[1:] == before[1:] and buf.stats.late_messages == 2
    # ... and while its continuation runs.
    (p,), _ = buf.take_partials(0)
    new = buf.start(p)
    gen(buf, new, 1)
    before = snapshot(buf)
    assert buf.on_chunk(chunk(old, 3, [78])) is None
    assert buf.on_finished(old, "abort") is None
    assert buf.stats.late_messages == 4 and snapshot(buf)[1:] == before[1:]
    assert list(buf.running) == [new] and not buf.partials and len(r.response_ids) == 3


def test_partial_aborted_twice_keeps_all_its_tokens():
    buf = make_buffer(group_size=1)
    (r,), (rid,) = open_group(buf, max_tokens=6)
    sent = []
    for version in range(3):
        if version:
            (p,), _ = buf.take_partials(version)
            rid = buf.start(p)
        sent += gen(buf, rid, 2, version)
        buf.on_finished(rid, "abort")
    assert r.response_ids == sent and r.versions == [0, 0, 1, 1, 2, 2] and r.attempt == 3
    assert r.finish_reason == "length" and buf.num_ready == 1  # last abort came at the budget


def test_take_partials_most_generated_order():
    buf = make_buffer(group_size=4, order="most_generated")
    members, rids = open_group(buf, max_tokens=10)
    for rid, n in zip(rids, (2, 7, 0, 5)):
        gen(buf, rid, n)
        buf.on_finished(rid, "abort")
    out, _ = buf.take_partials(0)
    assert [r.rollout_id for r in out] == ["g0-1", "g0-3", "g0-0", "g0-2"]  # most tokens generated first


def test_most_generated_ties_keep_fifo_order():
    buf = make_buffer(group_size=3, order="most_generated")
    members, rids = open_group(buf, max_tokens=10)
    for i in (2, 0, 1):
        gen(buf, rids[i], 3)
        buf.on_finished(rids[i], "abort")
    assert [r.rollout_id for r in buf.take_partials(0)[0]] == ["g0-2", "g0-0", "g0-1"]


def test_take_partials_limit_keeps_the_rest_in_order():
    buf = make_buffer(group_size=4)
    members, rids = open_group(buf)
    for rid in rids:
        gen(buf, rid, 1)
        buf.on_finished(rid, "abort")
    out, _ = buf.take_partials(0, limit=1)
    assert out == [members[0]] and list(buf.partials) == members[1:]
    out, _ = buf.take_partials(0, limit=2)
    assert out == members[1:3] and list(buf.partials) == members[3:]
    assert buf.take_partials(0, limit=0) == ([], []) and list(buf.partials) == members[3:]
    assert buf.stats.partials_continued == 3


# --- staleness -----------------------------------------------------------------------------------

def aborted_partial(buf: RecyclingBuffer, versions: list[int]) -> tuple[Rollout, str]:
    """Open a group of one; its request generates one token per version, then is aborted."""
    (r,), (rid,) = open_group(buf, max_tokens=10)
    for v in versions:
        gen(buf, rid, 1, v)
    buf.on_finished(rid, "abort")
    return r, rid


def test_stale_partial_restarts_from_the_prompt():
    buf = make_buffer(group_size=1, max_staleness=2, stale_policy="restart")
    r, old = aborted_partial(buf, [0, 1, 3])
    out, abort = buf.take_partials(version=3)  # oldest token is 3 versions old
    assert out == [r] and abort == []
    assert (r.response_ids, r.versions, r.logprobs, r.restarts) == ([], [], [], 1)
    assert r.tokens_left == 10 and r.prompt_ids == PROMPT
    assert buf.stats.stale_restarted == 1 and buf.stats.tokens_discarded == 3
    assert buf.stats.partials_continued == 0
    new = buf.start(r)
    assert new == "g0-0.2" != old
    gen(buf, new, 2, version=3)  # offset 0 again
    assert r.versions == [3, 3]
    assert buf.on_chunk(chunk(old, 3, [1])) is None and buf.stats.late_messages == 1


def test_partial_within_the_staleness_bound_is_continued_unchanged():
    buf = make_buffer(group_size=1, max_staleness=2)
    r, _ = aborted_partial(buf, [1, 2])
    tokens = list(r.response_ids)
    out, _ = buf.take_partials(version=3)  # exactly max_staleness old: still allowed
    assert out == [r] and r.response_ids == tokens and r.versions == [1, 2] and r.restarts == 0
    assert buf.stats.stale_restarted == 0 and buf.stats.tokens_discarded == 0
    assert buf.stats.partials_continued == 1


def test_partial_without_tokens_is_never_stale():
    buf = make_buffer(group_size=1, max_staleness=0, stale_policy="drop")
    r, _ = aborted_partial(buf, [])
    assert buf.take_partials(version=100) == ([r], [])
    assert buf.num_open_groups == 1 and buf.stats.stale_dropped_groups == 0


def test_stale_policy_mask_keeps_every_rollout_and_group():
    # "mask": the learner leaves old tokens out; the buffer restarts and
    # drops nothing, whatever the bound.
    buf = make_buffer(group_size=1, max_staleness=0, stale_policy="mask")
    r, _ = aborted_partial(buf, [0, 0])
    out, abort = buf.take_partials(version=10**6)
    assert out == [r] and not abort and r.versions == [0, 0] and r.restarts == 0
    buf.start(r)
    buf.on_finished(r.request_id, "stop", 1.0)
    assert buf.expire_stale_ready(10**6) == 0 and buf.num_ready == 1
    assert buf.stats.stale_restarted == buf.stats.stale_dropped_groups == buf.stats.tokens_discarded == 0


def test_no_staleness_bound_never_restarts():
    buf = make_buffer(group_size=1, max_staleness=None)
    r, _ = aborted_partial(buf, [0, 0])
    out, _ = buf.take_partials(version=10**6)
    assert out == [r] and r.versions == [0, 0] and r.restarts == 0
    assert buf.stats.stale_restarted == 0 and buf.stats.tokens_discarded == 0


def test_stale_policy_drop_discards_the_whole_group():
    buf = make_buffer(group_size=3, max_staleness=1, stale_policy="drop")
    members, rids = open_group(buf)
    gen(buf, rids[0], 2, version=0)
    buf.on_finished(rids[0], "abort")
    gen(buf, rids[1], 1, version=0)
    buf.on_finished(rids[1], "stop", 1.0)
    gen(buf, rids[2], 4, version=0)  # still running
    _, other = open_group(buf)  # an unrelated, fresh group
    gen(buf, other[0], 1, version=2)
    buf.on_finished(other[0], "abort")
    out, abort = buf.take_partials(version=2)
    assert abort == [rids[2]]  # the caller aborts the running sibling
    assert [r.rollout_id for r in out] == ["g1-0"]
    assert list(buf.groups) == ["g1"] and set(buf.running) == set(other[1:]) and not buf.partials
    s = buf.stats
    assert (s.stale_dropped_groups, s.groups_dropped, s.tokens_discarded, s.stale_restarted) == (1, 1, 7, 0)
    assert buf.on_chunk(chunk(rids[2], 4, [1])) is None
    assert buf.on_finished(rids[2], "abort") is None
    assert buf.stats.late_messages == 2 and buf.num_ready == 0


def test_stale_policy_drop_counts_a_group_once():
    buf = make_buffer(group_size=2, max_staleness=0, stale_policy="drop")
    _, rids = open_group(buf)
    for rid in rids:
        gen(buf, rid, 1, version=0)
        buf.on_finished(rid, "abort")
    assert buf.take_partials(version=1) == ([], [])
    assert buf.stats.stale_dropped_groups == 1 and buf.stats.groups_dropped == 1
    assert buf.num_open_groups == 0 and not buf.partials


def test_stale_drop_never_hands_out_a_partial_of_the_dropped_group():
    buf = make_buffer(group_size=2, max_staleness=1, stale_policy="drop")
    members, rids = open_group(buf)
    buf.on_finished(rids[0], "abort")  # aborted before its first token: never stale
    gen(buf, rids[1], 2, version=0)
    buf.on_finished(rids[1], "abort")  # stale at version 2
    out, abort = buf.take_partials(version=2)
    assert "g0" not in buf.groups  # the group was dropped ...
    assert out == []  # ... so none of its members may be handed out to be started


# --- prune ---------------------------------------------------------------------------------------

def test_pruned_abort_finishes_as_pruned_and_completes_the_group():
    buf = make_buffer(group_size=3)
    members, rids = open_group(buf)
    gen(buf, rids[1], 3)
    buf.prune(rids[1])
    buf.on_finished(rids[0], "stop", 1.0)
    buf.on_finished(rids[2], "length", 0.0)
    assert buf.on_finished(rids[1], "abort", 0.7) is members[1]
    assert members[1].finish_reason == "pruned" and members[1].reward is None
    assert not buf.partials and not buf.pruning
    (group,) = buf.take_ready(1)
    assert group.survivors == [members[0], members[2]]
    assert group.rewards == [1.0, 0.0] and group.num_tokens == 3
    assert "pruned" in FINISH_REASONS


def test_pruned_request_at_its_budget_is_pruned_not_length():
    buf = make_buffer(group_size=1)
    (r,), (rid,) = open_group(buf, max_tokens=2)
    gen(buf, rid, 2)
    buf.prune(rid)
    buf.on_finished(rid, "abort")
    assert r.finish_reason == "pruned"


def test_pruned_request_that_ends_on_its_own_still_counts_as_pruned():
    buf = make_buffer(group_size=1)
    (r,), (rid,) = open_group(buf)
    buf.prune(rid)
    buf.on_finished(rid, "stop", 1.0)  # finished before the abort reached the engine
    assert (r.finish_reason, r.reward) == ("pruned", None) and not buf.pruning


def test_prune_of_a_request_not_running_raises():
    buf = make_buffer()
    _, rids = open_group(buf)
    buf.on_finished(rids[0], "abort")
    with pytest.raises(BufferError, match=r"cannot prune 'g0-0\.1': it is not running"):
        buf.prune(rids[0])
    with pytest.raises(BufferError, match="not running"):
        buf.prune("nope")
    assert not buf.pruning


def test_group_survivors_and_rewards():
    g = Group(group_id="g", rollouts=[
        Rollout(rollout_id=f"g-{i}", group_id="g", prompt_ids=[1], answer="", max_tokens=4,
                response_ids=[1] * i, finish_reason=reason, reward=reward)
        for i, (reason, reward) in enumerate([("stop", 1.0), ("pruned", None), ("length", 0.0)])])
    assert [r.rollout_id for r in g.survivors] == ["g-0", "g-2"]
    assert g.rewards == [1.0, 0.0] and g.num_tokens == 3


# --- drop_group ----------------------------------------------------------------------------------

def test_drop_group_removes_running_members_and_partials():
    buf = make_buffer(group_size=3)
    members, rids = open_group(buf)
    _, other = open_group(buf)
    gen(buf, rids[0], 2)
    buf.on_finished(rids[0], "abort")
    gen(buf, other[0], 1)
    buf.on_finished(other[0], "abort")
    gen(buf, rids[1], 3)
    buf.prune(rids[1])
    buf.on_finished(rids[2], "stop", 1.0)
    assert buf.drop_group("g0") == [rids[1]]
    assert list(buf.groups) == ["g1"] and [r.rollout_id for r in buf.partials] == ["g1-0"]
    assert set(buf.running) == set(other[1:]) and not buf.pruning
    assert buf.stats.groups_dropped == 1 and buf.stats.tokens_discarded == 5
    assert buf.group_of(rids[1]) is None
    assert buf.on_finished(rids[1], "abort") is None and buf.stats.late_messages == 1
    assert [r.rollout_id for r in buf.take_partials(0)[0]] == ["g1-0"]
    with pytest.raises(BufferError, match="unknown group 'g0'"):
        buf.drop_group("g0")
    with pytest.raises(BufferError, match="unknown group 'nope'"):
        buf.drop_group("nope")
    assert buf.stats.groups_dropped == 1


# --- persistence ---------------------------------------------------------------------------------

def busy_buffer(**kw) -> tuple[RecyclingBuffer, dict[str, list[str]]]:
    """A buffer holding every kind of rollout: ready groups, queued partials (not in
    member order), running requests (one of them already continued), finished
    members in open groups, a never-started group, a dropped group, late messages."""
    buf = make_buffer(group_size=3, max_groups=6, max_staleness=5, **kw)
    rids = {}
    _, rids["ready"] = open_group(buf)  # g0
    for rid in rids["ready"]:
        gen(buf, rid, 2, version=1)
    buf.prune(rids["ready"][2])
    finish_all(buf, rids["ready"], reward=0.5)
    _, rids["partials"] = open_group(buf)  # g1
    for i in (2, 0):
        gen(buf, rids["partials"][i], i + 1, version=2)
        buf.on_finished(rids["partials"][i], "abort")
    _, rids["dropped"] = open_group(buf)  # g2
    gen(buf, rids["dropped"][0], 3)
    buf.drop_group("g2")
    _, rids["mixed"] = open_group(buf)  # g3
    gen(buf, rids["mixed"][0], 1, version=3)
    buf.on_finished(rids["mixed"][0], "stop", 1.0)
    gen(buf, rids["mixed"][1], 2, version=3)
    buf.on_finished(rids["mixed"][1], "abort")
    (p,), _ = buf.take_partials(3, limit=1)  # g1-2 continues
    rids["continued"] = [buf.start(p)]
    gen(buf, rids["continued"][0], 1, version=3)
    buf.new_group([9, 9], "x", 5)  # g4, never started
    buf.on_chunk(chunk(rids["dropped"][1], 0, [1]))  # late
    buf.on_finished(rids["dropped"][1], "abort")  # late
    return buf, rids


def test_busy_buffer_is_what_the_persistence_tests_think_it_is():
    buf, _ = busy_buffer()
    assert list(buf.groups) == ["g1", "g3", "g4"] and buf.num_ready == 1 and buf.next_group == 5
    assert [r.rollout_id for r in buf.partials] == ["g1-0", "g3-1"]
    assert set(buf.running) == {"g1-1.1", "g1-2.2", "g3-2.1"}
    assert buf.stats.late_messages == 2 and buf.stats.groups_dropped == 1


def test_save_load_restores_exactly(tmp_path):
    buf, _ = busy_buffer()
    path = tmp_path / "buffer.msgpack"
    buf.save(path)
    assert path.exists() and not (tmp_path / "buffer.msgpack.tmp").exists()
    fresh = make_buffer(group_size=3, max_groups=6, max_staleness=5)
    fresh.load(path)
    assert fresh.state() == buf.state()
    st_ = fresh.state()
    # Queued partials first (queue order), then running and never-started rollouts (group order).
    assert st_.partials == ["g1-0", "g3-1", "g1-1", "g1-2", "g3-2", "g4-0", "g4-1", "g4-2"]
    assert [g.group_id for g in fresh.ready] == ["g0"] and fresh.ready == buf.ready
    assert fresh.ready[0].rollouts[2].finish_reason == "pruned"
    assert fresh.stats == buf.stats and fresh.stats.late_messages == 2
    assert fresh.next_group == 5 and list(fresh.groups) == ["g1", "g3", "g4"]
    assert not fresh.running and not fresh.pruning
    assert [r.rollout_id for r in fresh.partials] == st_.partials
    assert all(any(r is m for m in fresh.groups[r.group_id]) for r in fresh.partials)  # the same objects
    g3 = fresh.groups["g3"]
    assert g3[0].finish_reason == "stop" and g3[0].reward == 1.0 and g3[1].versions == [3, 3]
    assert g3[1].logprobs == buf.groups["g3"][1].logprobs


def test_state_is_a_deep_copy():
    buf, rids = busy_buffer()
    snap = buf.state()
    again = buf.state()
    gen(buf, rids["continued"][0], 2, version=4)
    buf.take_ready(1)
    buf.stats.late_messages += 10
    assert snap == again and snap != buf.state()


def test_restored_rollouts_continue_with_fresh_request_ids(tmp_path):
    buf, rids = busy_buffer()
    used = {rid for ids in rids.values() for rid in ids} | {"g1-2.1"}
    buf.save(tmp_path / "b")
    fresh = make_buffer(group_size=3, max_groups=6, max_staleness=5)
    fresh.load(tmp_path / "b")
    out, abort = fresh.take_partials(version=4)
    assert abort == [] and [r.rollout_id for r in out] == ["g1-0", "g3-1", "g1-1", "g1-2", "g3-2",
                                                             "g4-0", "g4-1", "g4-2"]
    new = [fresh.start(r) for r in out]
    assert not set(new) & used and len(set(new)) == len(new)
    # A restored buffer's requests carry its session: a killed run's requests
    # may still run in an engine that survived it.
    assert fresh.session.startswith("~") and new[3] == f"g1-2.3{fresh.session}" and new[5] == f"g4-0.1{fresh.session}"
    # Old requests are late; the continuation appends right after the saved tokens.
    assert fresh.on_chunk(chunk(rids["continued"][0], 2, [5])) is None
    g12 = fresh.groups["g1"][2]
    tokens = list(g12.response_ids)
    assert len(tokens) == 4
    more = gen(fresh, new[3], 2, version=4)
    assert g12.response_ids == tokens + more and g12.versions == [2, 2, 2, 3, 4, 4]
    finish_all(fresh, new)
    assert [g.group_id for g in fresh.take_ready(5)] == ["g0", "g1", "g3", "g4"]


def test_save_overwrites_and_empty_buffer_round_trips(tmp_path):
    path = tmp_path / "b"
    buf, _ = busy_buffer()
    buf.save(path)
    empty = make_buffer(group_size=3)
    empty.save(path)
    fresh = make_buffer(group_size=3)
    fresh.load(path)
    assert fresh.state() == empty.state() == BufferState(groups=[], partials=[], ready=[], next_group=0,
                                                         stats=BufferStats())


@pytest.mark.parametrize("content", [None, b"", b"\xc1garbage", msgspec.msgpack.encode({"format": 1})],
                         ids=["missing", "empty", "corrupt", "wrong-schema"])
def test_load_of_bad_file_raises_naming_the_path(tmp_path, content):
    path = tmp_path / "state.msgpack"
    if content is not None:
        path.write_bytes(content)
    buf = make_buffer()
    with pytest.raises(BufferError, match="cannot restore the buffer from") as info:
        buf.load(path)
    assert str(path) in str(info.value)
    assert buf.state() == make_buffer().state()


def test_load_of_a_directory_raises(tmp_path):
    with pytest.raises(BufferError, match=re.escape(str(tmp_path))):
        make_buffer().load(tmp_path)


@pytest.mark.parametrize("setup", ["open", "running", "ready"])
def test_restore_into_non_empty_buffer_raises(setup):
    src, _ = busy_buffer()
    buf = make_buffer(group_size=3)
    if setup == "open":
        buf.new_group(PROMPT, "7", 8)  # not started
    else:
        _, rids = open_group(buf)
        if setup == "ready":
            finish_all(buf, rids)
            assert not buf.groups and not buf.running
    before = snapshot(buf)
    with pytest.raises(BufferError, match="already holds rollouts"):
        buf.restore(src.state())
    assert snapshot(buf) == before


def test_restore_with_group_size_mismatch_raises():
    src, _ = busy_buffer()
    with pytest.raises(BufferError, match="saved group g1 has 3 members, but group_size is 2"):
        make_buffer(group_size=2).restore(src.state())


def test_restore_with_unknown_partials_raises():
    state = busy_buffer()[0].state()
    state.partials.append("g7-0")
    with pytest.raises(BufferError, match=r"unknown rollouts: \['g7-0'\]"):
        make_buffer(group_size=3).restore(state)


def test_request_at_its_budget_survives_restore():
    buf = make_buffer(group_size=2)
    members, rids = open_group(buf, max_tokens=2)
    gen(buf, rids[0], 2)  # the whole budget; the engine's "length" notice is still in flight
    buf.on_finished(rids[1], "stop", 1.0)
    fresh = make_buffer(group_size=2)
    fresh.restore(buf.state())
    out, _ = fresh.take_partials(version=0)
    # The one at its budget has nothing left to generate: it is finished as
    # truncated instead of started (the controller scores it).
    spent = [r for r in out if r.tokens_left <= 0]
    assert len(spent) == 1 and spent[0].response_ids == members[0].response_ids
    with pytest.raises(BufferError, match="no token budget left"):
        fresh.start(spent[0])
    fresh.finish(spent[0], "length", 0.0)
    assert fresh.num_ready == 1 and fresh.ready[0].rollouts[0].finish_reason == "length"


def test_rejected_restore_leaves_the_buffer_empty():
    src, _ = busy_buffer()
    good = src.state()
    bad = src.state()
    bad.groups[1] = bad.groups[1][:2]  # g3 lost a member
    buf = make_buffer(group_size=3)
    with pytest.raises(BufferError, match="group g3 has 2 members"):
        buf.restore(bad)
    assert buf.num_open_groups == 0
    buf.restore(good)
    assert buf.state() == good


# --- property test: a scripted generator against the buffer --------------------------------------

class Sim:
    """A scripted generator and controller driving a RecyclingBuffer, with a model of
    every token ever streamed for each rollout since its last restart."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.buf = RecyclingBuffer(**cfg)
        self.version = 0
        self.sent: dict[str, list[tuple[int, float, int]]] = {}  # rollout id -> (token, logprob, version)
        self.live: dict[str, str] = {}  # engine request id -> rollout id
        self.dead: list[str] = []  # request ids that ended (their messages are late)
        self.used: set[str] = set()
        self.pruned: set[str] = set()  # request ids pruned, not yet ended
        self.reason: dict[str, str] = {}  # rollout id -> expected finish reason
        self.late = self.discarded = self.completed = 0
        self.reopened: set[str] = set()  # groups reopened by the staleness bound (restart)

    # -- engine-side helpers --
    def pick(self, i: int) -> str:
        return list(self.live)[i % len(self.live)]

    def start(self, r: Rollout) -> None:
        rid = self.buf.start(r)
        assert rid == r.request_id and rid not in self.used
        self.used.add(rid)
        self.live[rid] = r.rollout_id
        self.sent.setdefault(r.rollout_id, [])

    def emit(self, rid: str, n: int) -> None:
        rol = self.live[rid]
        ids = [next(_tokens) for _ in range(n)]
        c = chunk(rid, len(self.sent[rol]), ids, self.version)
        self.sent[rol] += list(zip(c.token_ids, c.logprobs, c.versions))
        assert self.buf.on_chunk(c).rollout_id == rol

    def end(self, rid: str, reason: str, reward: float | None = None) -> None:
        rol = self.live.pop(rid)
        r = self.buf.running[rid]
        groups_before = self.buf.num_ready
        self.dead.append(rid)
        if rid in self.pruned:
            self.pruned.discard(rid)
            self.reason[rol] = "pruned"
        elif reason != "abort" or r.tokens_left == 0:
            self.reason[rol] = "length" if reason == "abort" else reason
        assert self.buf.on_finished(rid, reason, reward) is r
        self.completed += self.buf.num_ready - groups_before

    def forget_group(self, members: list[Rollout]) -> None:
        for m in members:
            self.discarded += len(m.response_ids)
            self.sent.pop(m.rollout_id, None)
        for rid, rol in list(self.live.items()):
            if rol.rsplit("-", 1)[0] == members[0].group_id:
                del self.live[rid]
                self.dead.append(rid)
                self.pruned.discard(rid)

    # -- events --
    def do(self, op: str, a: int, b: int) -> None:
        buf = self.buf
        if op == "open":
            if buf.num_open_groups < self.cfg["max_groups"]:
                for r in buf.new_group(PROMPT, "7", 1 + a):
                    self.start(r)
            else:
                before = snapshot(buf)
                with pytest.raises(BufferError, match="max_groups"):
                    buf.new_group(PROMPT, "7", 1 + a)
                assert snapshot(buf) == before
        elif op == "chunk" and self.live:
            rid = self.pick(a)
            self.emit(rid, min(b, buf.running[rid].tokens_left))
            if buf.running[rid].tokens_left == 0:
                # The engine reports "length" with its last chunk. (A request saved while
                # running at its budget: see test_request_at_its_budget_survives_restore.)
                self.end(rid, "length", float(a % 2))
        elif op == "finish" and self.live:
            rid = self.pick(a)
            self.end(rid, "stop" if buf.running[rid].tokens_left else "length", float(b % 2))
        elif op == "prune" and self.live:
            rid = self.pick(a)
            buf.prune(rid)
            self.pruned.add(rid)
        elif op == "step_end":  # the batch is ready: every running request is aborted ...
            for rid in list(self.live):
                if b % 2 and buf.running[rid].tokens_left:
                    self.emit(rid, 1)  # a last chunk arrives before the abort notice
                self.end(rid, "abort", 0.0)
            self.version += 1  # ... and the learner publishes new weights
        elif op == "bump":
            self.version += 1
        elif op == "continue":
            self.take_partials(limit=None if a % 3 else b)
        elif op == "late" and self.dead:
            rid = self.dead[a % len(self.dead)]
            before = snapshot(buf)
            assert buf.on_chunk(chunk(rid, b, [1])) is None
            assert buf.on_finished(rid, "stop" if b % 2 else "abort", 1.0) is None
            self.late += 2
            assert snapshot(buf)[1:] == before[1:]
        elif op == "drop" and buf.groups:
            gid = list(buf.groups)[a % len(buf.groups)]
            running = {rid for rid, r in buf.running.items() if r.group_id == gid}
            members = buf.groups[gid]
            assert set(buf.drop_group(gid)) == running
            self.forget_group(members)
        elif op == "expire":  # stream mode applies the bound to complete groups before taking a batch
            S = None if self.cfg["stale_policy"] == "mask" else self.cfg["max_staleness"]
            stale = lambda rs: S is not None and any(  # noqa: E731
                r.versions and self.version - min(r.versions) > S for r in rs)
            ready = list(buf.ready)
            expired = buf.expire_stale_ready(self.version)
            gone = [g for g in ready if g not in buf.ready]
            assert expired == len(gone)
            for g in gone:
                if self.cfg["stale_policy"] == "drop":
                    assert stale(g.rollouts) and g.group_id not in buf.groups
                    for m in g.rollouts:
                        self.discarded += len(self.sent.pop(m.rollout_id, []))
                    continue
                # restart: the group reopens; exactly its stale survivors start over
                assert self.cfg["stale_policy"] == "restart" and buf.groups[g.group_id] == g.rollouts
                self.reopened.add(g.group_id)
                for m in g.rollouts:
                    if m.finished:
                        assert m.finish_reason == "pruned" or not stale([m]), m.rollout_id
                    else:
                        assert m.response_ids == [] and any(p is m for p in buf.partials)
                        self.discarded += len(self.sent[m.rollout_id])
                        self.sent[m.rollout_id] = []
                        self.reason.pop(m.rollout_id, None)
            for g in buf.ready:
                assert not stale(g.survivors if self.cfg["stale_policy"] == "restart" else g.rollouts)
        elif op == "take_ready":
            for g in buf.take_ready(b):
                assert len(g.rollouts) == self.cfg["group_size"] and all(r.finished for r in g.rollouts)
                for r in g.rollouts:
                    self.check_tokens(r)
                    assert r.finish_reason == self.reason[r.rollout_id]
        elif op == "reload":  # save/restore: engine requests do not survive it
            state = buf.state()
            self.buf = RecyclingBuffer(**self.cfg)
            self.buf.restore(msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=BufferState))
            assert self.buf.state() == state
            self.dead += list(self.live)
            self.live.clear()
            self.pruned.clear()

    def take_partials(self, limit: int | None) -> None:
        buf = self.buf
        S = None if self.cfg["stale_policy"] == "mask" else self.cfg["max_staleness"]  # mask: the learner's bound
        before = {r.rollout_id: (r, list(r.response_ids), list(r.versions), r.restarts) for r in buf.partials}
        groups_before = dict(buf.groups)
        running_before = {rid: r.group_id for rid, r in buf.running.items()}

        def stale(rol: str) -> bool:
            versions = before[rol][2]
            return S is not None and bool(versions) and self.version - min(versions) > S

        out, abort = buf.take_partials(self.version, limit)
        assert limit is None or len(out) <= limit
        dropped = [gid for gid in groups_before if gid not in buf.groups]
        if dropped:
            assert self.cfg["stale_policy"] == "drop" and S is not None
        for gid in dropped:  # dropped only because one of its partials was too stale
            assert any(stale(rol) and before[rol][0].group_id == gid for rol in before)
            self.forget_group(groups_before[gid])
        assert set(abort) == {rid for rid, gid in running_before.items() if gid in dropped}
        # Every partial is handed out or kept, except those of dropped groups.
        handed_out = [r.rollout_id for r in out]
        kept = [r.rollout_id for r in buf.partials]
        assert sorted(handed_out + kept) == sorted(
            rol for rol, (r, *_) in before.items() if r.group_id not in dropped or rol in handed_out)
        if self.cfg["order"] == "fifo":
            assert handed_out == [rol for rol in before if rol in handed_out]
        else:
            generated = [len(before[rol][1]) for rol in handed_out]
            assert generated == sorted(generated, reverse=True)
        for r in out:
            _, tokens, _, restarts = before[r.rollout_id]
            if r.restarts != restarts:
                assert r.restarts == restarts + 1 and self.cfg["stale_policy"] == "restart"
                assert stale(r.rollout_id) and r.response_ids == [] and r.versions == []
                self.discarded += len(tokens)
                self.sent[r.rollout_id] = []
            else:
                assert not stale(r.rollout_id) and r.response_ids == tokens
            assert r.group_id in buf.groups, "take_partials handed out a partial of a dropped group"
            self.start(r)

    # -- invariants --
    def check_tokens(self, r: Rollout) -> None:
        sent = self.sent[r.rollout_id]
        assert r.response_ids == [t for t, _, _ in sent]
        assert r.logprobs == [lp for _, lp, _ in sent]
        assert r.versions == [v for _, _, v in sent]
        assert len(r.response_ids) <= r.max_tokens

    def check(self) -> None:
        buf = self.buf
        # A reopened group is no new one: it may stand beyond max_groups (new ones are refused meanwhile).
        assert buf.num_open_groups <= self.cfg["max_groups"] + len(self.reopened & buf.groups.keys())
        assert set(buf.running) == set(self.live)  # the buffer tracks exactly the live requests
        assert buf.pruning == self.pruned
        members = {id(r): r for ms in buf.groups.values() for r in ms}
        running = {id(r) for r in buf.running.values()}
        partials = [id(r) for r in buf.partials]
        assert len(running) == len(buf.running) and len(set(partials)) == len(partials)
        assert running <= members.keys() and set(partials) <= members.keys()
        for rid, r in buf.running.items():
            assert rid == r.request_id and self.live[rid] == r.rollout_id
        for gid, ms in buf.groups.items():
            assert [r.rollout_id for r in ms] == [f"{gid}-{i}" for i in range(self.cfg["group_size"])]
            assert all(r.group_id == gid for r in ms)
            assert not all(r.finished for r in ms)  # a complete group moves to ready
        for key, r in members.items():
            places = (key in running) + (key in partials) + r.finished
            assert places == 1, f"{r.rollout_id} is in {places} places"
            if key in partials:
                assert r.tokens_left > 0
            if r.finished:
                assert r.finish_reason == self.reason[r.rollout_id]
            self.check_tokens(r)
        ready_ids = [g.group_id for g in buf.ready]
        assert len(set(ready_ids)) == len(ready_ids) and not set(ready_ids) & buf.groups.keys()
        for g in buf.ready:
            assert all(r.finished for r in g.rollouts) and len(g.rollouts) == self.cfg["group_size"]
            for r in g.rollouts:
                self.check_tokens(r)
        assert buf.stats.late_messages == self.late
        assert buf.stats.tokens_discarded == self.discarded
        assert buf.stats.groups_completed == self.completed


OPS = ["open", "open", "chunk", "chunk", "chunk", "chunk", "finish", "prune", "step_end", "step_end", "bump",
       "bump", "continue", "continue", "late", "drop", "expire", "take_ready", "reload"]


@pytest.mark.parametrize("stale_policy", [None, "restart", "drop", "mask"])
@settings(max_examples=30, deadline=None)
@given(cfg=st.fixed_dictionaries({
    "group_size": st.integers(1, 3),
    "max_groups": st.integers(1, 3),
    "max_staleness": st.integers(0, 2),
    "order": st.sampled_from(["fifo", "most_generated"]),
}), ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 7), st.integers(1, 4)), min_size=20, max_size=80))
def test_random_interleavings_keep_the_buffer_invariants(stale_policy, cfg, ops):
    cfg = dict(cfg, stale_policy=stale_policy or "restart")
    if stale_policy is None:
        cfg["max_staleness"] = None
    sim = Sim(cfg)
    for op, a, b in [("open", 3, 1)] + ops:
        sim.do(op, a, b)
        sim.check()
    # Finally drain: abort everything, continue partials until every group completes.
    for _ in range(100):
        if not sim.buf.groups:
            break
        sim.do("step_end", 0, 1)
        sim.do("continue", 1, 1)
        for rid in list(sim.live):
            sim.end(rid, "stop", 1.0)
        sim.check()
    assert not sim.buf.groups and not sim.buf.running and not sim.buf.partials
    sim.do("take_ready", 0, 1000)
    assert sim.buf.num_ready == 0


def test_stale_complete_groups_are_dropped_unless_kept():
    buf = make_buffer(group_size=2, max_groups=4, max_staleness=2, stale_policy="drop")
    for version in (0, 3):
        members, rids = open_group(buf)
        for rid in rids:
            gen(buf, rid, 2, version=version)
        finish_all(buf, rids)
    old, new = [g.group_id for g in buf.ready]
    assert buf.expire_stale_ready(5, keep={old}) == 0 and buf.num_ready == 2  # lag 5 > 2, but kept
    assert buf.expire_stale_ready(5) == 1 and [g.group_id for g in buf.ready] == [new]
    assert buf.stats.stale_dropped_groups == 1 and buf.stats.tokens_discarded == 4
    assert make_buffer(max_staleness=None).expire_stale_ready(100) == 0


def test_stale_complete_group_reopens_under_restart():
    """stale_policy restart never drops a group: its stale survivors start
    over from the prompt (keeping the draws they survived), its fresh and
    pruned members stay as they are, and it completes again."""
    buf = make_buffer(group_size=3, max_groups=4, max_staleness=2, stale_policy="restart")
    members, rids = open_group(buf)
    gen(buf, rids[0], 2, version=0)
    gen(buf, rids[1], 1, version=0)
    buf.prune(rids[1])
    buf.on_finished(rids[1], "abort")  # pruned, with a stale token: never trained, left alone
    gen(buf, rids[2], 3, version=4)
    members[0].keep_prob = 0.5
    finish_all(buf, [rids[0], rids[2]])
    assert buf.num_ready == 1
    assert buf.expire_stale_ready(5) == 1 and buf.num_ready == 0 and list(buf.groups) == ["g0"]
    stale, pruned, fresh = members
    assert (stale.response_ids, stale.finish_reason, stale.reward, stale.restarts, stale.keep_prob) == \
        ([], None, None, 1, 0.5)
    assert pruned.finish_reason == "pruned" and fresh.finish_reason == "stop" and fresh.restarts == 0
    assert list(buf.partials) == [stale]
    assert buf.stats.stale_restarted == 1 and buf.stats.tokens_discarded == 2 and buf.stats.stale_dropped_groups == 0
    (again,), _ = buf.take_partials(version=5)
    rid = buf.start(again)
    gen(buf, rid, 2, version=5)
    buf.on_finished(rid, "stop", 1.0)
    assert [g.group_id for g in buf.ready] == ["g0"] and buf.expire_stale_ready(5) == 0


def test_a_rollout_paused_at_its_decision_point_continues_and_is_no_recycled_partial():
    buf = make_buffer()
    (r0, r1), (a, b) = open_group(buf, max_tokens=8)
    gen(buf, a, 3)
    buf.on_finished(a, "abort", paused=True)  # stopped at the decision point, kept
    assert list(buf.partials) == [r0] and not r0.finished
    out, abort = buf.take_partials(version=0)
    assert out == [r0] and not abort
    assert buf.stats.partials_created == 0 and buf.stats.partials_continued == 0
    a2 = buf.start(r0)
    gen(buf, a2, 2)
    buf.on_finished(a2, "abort")  # a step-end abort afterwards is a recycled partial again
    buf.take_partials(version=0)
    assert buf.stats.partials_created == 1 and buf.stats.partials_continued == 1
    # Pruned at its decision point: it ends there and completes its group.
    buf.prune(b)
    gen(buf, b, 3)
    buf.on_finished(b, "length")
    assert r1.finish_reason == "pruned" and r1.reward is None


def test_end_says_what_became_of_each_request():
    """`end` (the controller's one call per finished request): a request that
    stopped at its decision point is kept as a paused partial, a pruned one
    completes its group as pruned, an abort with budget left is a partial,
    anything else finishes with the reward `score` gives; a repeat is late."""
    buf = make_buffer(group_size=5)
    a, b, c, d, e = buf.new_group(PROMPT, "7", 20)
    ra, rb, re_ = (buf.start(r, pause_at=3) for r in (a, b, e))
    rc, rd = buf.start(c), buf.start(d)
    for rid in (ra, rb, rc, rd):
        buf.on_chunk(chunk(rid, 0, [10, 11, 12]))
    buf.on_chunk(chunk(re_, 0, [10, 11]))
    buf.prune(rb)
    scored = []

    def score(r):
        scored.append(r.rollout_id)
        return 1.0

    assert buf.end(ra, "length", score) == (a, "paused")
    assert buf.end(rb, "length", score) == (b, "pruned") and b.finish_reason == "pruned"
    assert buf.end(rc, "abort", score) == (c, "partial")
    assert buf.end(rd, "stop", score) == (d, "finished") and d.reward == 1.0
    # Ended by its budget short of the decision point: finished, not paused.
    assert buf.end(re_, "length", score) == (e, "finished")
    assert scored == [d.rollout_id, e.rollout_id]
    assert buf.end(rd, "stop", score) == (None, "late") and buf.stats.late_messages == 1
    assert [r.rollout_id for r in buf.partials] == [a.rollout_id, c.rollout_id]
    assert buf.stats.partials_created == 1  # the paused one is no recycled partial
    with pytest.raises(BufferError, match="unknown finish reason"):
        buf.end(rd, "exploded", score)


def test_stale_running_leaves_out_the_fresh_and_the_pruned():
    buf = make_buffer(group_size=3, max_staleness=1)
    a, b, c = buf.new_group(PROMPT, "7", 20)
    ra, rb, rc = buf.start(a), buf.start(b), buf.start(c)
    buf.on_chunk(chunk(ra, 0, [10], version=0))
    buf.on_chunk(chunk(rb, 0, [10], version=2))
    buf.on_chunk(chunk(rc, 0, [10], version=0))
    buf.prune(rc)
    assert buf.stale_running(version=2) == [ra] and buf.stale_running(version=1) == []
    assert make_buffer(stale_policy="mask", max_staleness=0).stale_running(version=9) == []
    assert buf.members(a.group_id) == [a, b, c]
