"""Rollout assembly from chunks and the group buffer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_rl.buffer.rollouts import BufferError, GroupBuffer, Rollout
from stream_rl.protocol import TokenChunk


def chunk(offset: int, ids: list[int], rid: str = "r", version: int = 0, logprobs: bool = True) -> TokenChunk:
    return TokenChunk(request_id=rid, offset=offset, token_ids=ids,
                      logprobs=[-0.1 * (offset + k + 1) for k in range(len(ids))] if logprobs else [],
                      versions=[version] * len(ids))


def new_rollout(rid: str = "r", gid: str = "g") -> Rollout:
    return Rollout(request_id=rid, group_id=gid, prompt_ids=[1, 2, 3], answer="7")


# --- Rollout.append ----------------------------------------------------------------------

def test_contiguous_chunks_append():
    r = new_rollout()
    r.append(chunk(0, [10, 11], version=0))
    r.append(chunk(2, [12], version=1))
    r.append(chunk(3, [13, 14, 15], version=1))
    assert r.response_ids == [10, 11, 12, 13, 14, 15]
    assert r.logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6])
    assert r.versions == [0, 0, 1, 1, 1, 1]
    assert not r.finished


@pytest.mark.parametrize("offset,what", [(3, "gap"), (1, "overlap"), (0, "duplicate")])
def test_non_contiguous_chunk_raises_and_leaves_rollout_intact(offset, what):
    r = new_rollout("req-9")
    r.append(chunk(0, [10, 11]))
    with pytest.raises(BufferError, match="lost or duplicated") as info:
        r.append(chunk(offset, [99]))
    assert "req-9" in str(info.value)
    assert r.response_ids == [10, 11]
    assert len(r.logprobs) == 2 and r.versions == [0, 0]


def test_first_chunk_must_start_at_zero():
    with pytest.raises(BufferError):
        new_rollout().append(chunk(1, [10]))


def test_chunks_without_logprobs():
    r = new_rollout()
    r.append(chunk(0, [10, 11], logprobs=False))
    r.append(chunk(2, [12], logprobs=False))
    assert r.logprobs is None
    assert r.response_ids == [10, 11, 12] and r.versions == [0, 0, 0]


def test_recycled_partial_continues_past_its_tokens():
    r = new_rollout()
    r.response_ids, r.logprobs, r.versions = [10, 11], [-0.1, -0.2], [0, 0]
    r.append(chunk(2, [12], version=3))
    assert r.response_ids == [10, 11, 12] and r.versions == [0, 0, 3]


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(st.integers(0, 50_000), min_size=1, max_size=200), data=st.data())
def test_random_chunking_reassembles_exactly(tokens, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(tokens) - 1, 1)), max_size=20)))
    bounds = [0] + [c for c in cuts if c < len(tokens)] + [len(tokens)]
    r = new_rollout()
    for lo, hi in zip(bounds, bounds[1:]):
        r.append(TokenChunk(request_id="r", offset=lo, token_ids=tokens[lo:hi],
                            logprobs=[-float(i) for i in range(lo, hi)], versions=list(range(lo, hi))))
    assert r.response_ids == tokens
    assert r.logprobs == [-float(i) for i in range(len(tokens))]
    assert r.versions == list(range(len(tokens)))


def test_empty_chunk_keeps_logprobs():
    r = new_rollout()
    r.append(chunk(0, [10, 11]))
    r.append(TokenChunk(request_id="r", offset=2, token_ids=[], logprobs=[], versions=[]))
    r.append(chunk(2, [12]))
    assert r.response_ids == [10, 11, 12]
    assert r.logprobs == pytest.approx([-0.1, -0.2, -0.3])


# --- GroupBuffer -------------------------------------------------------------------------

def fill_group(buf: GroupBuffer, gid: str, n: int | None = None) -> list[str]:
    ids = [f"{gid}-{i}" for i in range(buf.group_size if n is None else n)]
    for rid in ids:
        r = new_rollout(rid, gid)
        buf.add(r)
        r.append(chunk(0, [1, 2], rid=rid))
    return ids


def test_group_released_only_when_all_members_finished():
    buf = GroupBuffer(group_size=3, max_groups=10)
    ids = fill_group(buf, "g")
    assert buf.finish(ids[0], "stop", 1.0) is None
    assert buf.finish(ids[2], "length", 0.0) is None
    assert buf.num_ready == 0 and buf.num_open_groups == 1
    group = buf.finish(ids[1], "stop", 1.0)
    assert group is not None and group.group_id == "g"
    assert [r.request_id for r in group.rollouts] == ids
    assert group.rewards == [1.0, 1.0, 0.0]
    assert [r.finish_reason for r in group.rollouts] == ["stop", "stop", "length"]
    assert buf.num_ready == 1 and buf.num_open_groups == 0
    assert not any(rid in buf.rollouts for rid in ids)


def test_group_not_released_before_it_has_all_members():
    buf = GroupBuffer(group_size=3, max_groups=10)
    ids = fill_group(buf, "g", n=2)
    assert buf.finish(ids[0], "stop", 1.0) is None
    assert buf.finish(ids[1], "stop", 1.0) is None
    assert buf.num_ready == 0
    last = new_rollout("g-2", "g")
    buf.add(last)
    assert buf.finish("g-2", "stop", 0.0) is not None


def test_take_ready_in_completion_order():
    buf = GroupBuffer(group_size=2, max_groups=10)
    groups = {gid: fill_group(buf, gid) for gid in ("a", "b", "c")}
    for gid in ("c", "a", "b"):  # completion order differs from submission order
        for rid in groups[gid]:
            buf.finish(rid, "stop", 0.0)
    assert [g.group_id for g in buf.take_ready(2)] == ["c", "a"]
    assert buf.num_ready == 1
    assert [g.group_id for g in buf.take_ready(5)] == ["b"]
    assert buf.take_ready(1) == []


def test_duplicate_request_id():
    buf = GroupBuffer(group_size=4, max_groups=10)
    buf.add(new_rollout("x", "g1"))
    with pytest.raises(BufferError, match="duplicate request_id x"):
        buf.add(new_rollout("x", "g2"))
    assert buf.num_open_groups == 1


def test_group_overfull():
    buf = GroupBuffer(group_size=2, max_groups=10)
    fill_group(buf, "g")
    with pytest.raises(BufferError, match="group g already has 2 members"):
        buf.add(new_rollout("g-extra", "g"))
    assert "g-extra" not in buf.rollouts


def test_max_groups_refuses_new_group_and_keeps_accepted_data():
    buf = GroupBuffer(group_size=2, max_groups=2)
    a = fill_group(buf, "a")
    b = fill_group(buf, "b", n=1)
    before = {rid: list(buf.get(rid).response_ids) for rid in a + b}
    with pytest.raises(BufferError, match="buffer.max_groups=2"):
        buf.add(new_rollout("c-0", "c"))
    assert buf.num_open_groups == 2
    assert "c-0" not in buf.rollouts
    assert {rid: buf.get(rid).response_ids for rid in a + b} == before
    # An existing open group can still take members, and completing a group frees a slot.
    buf.add(new_rollout("b-1", "b"))
    for rid in a:
        buf.finish(rid, "stop", 1.0)
    buf.add(new_rollout("c-0", "c"))
    assert buf.num_open_groups == 2


def test_drop_group_returns_ids_and_removes_them():
    buf = GroupBuffer(group_size=3, max_groups=10)
    ids = fill_group(buf, "g")
    other = fill_group(buf, "h")
    assert buf.drop_group("g") == ids
    assert buf.num_open_groups == 1
    for rid in ids:
        assert rid not in buf.rollouts
        with pytest.raises(BufferError):
            buf.get(rid)
    assert all(rid in buf.rollouts for rid in other)
    assert buf.drop_group("g") == []  # already gone
    # The same group id can be opened again afterwards.
    buf.add(new_rollout("g-0", "g"))


def test_unknown_request_id():
    buf = GroupBuffer(group_size=2, max_groups=10)
    with pytest.raises(BufferError, match="unknown request_id 'nope'"):
        buf.get("nope")
    with pytest.raises(BufferError, match="unknown request_id"):
        buf.finish("nope", "stop", 1.0)


def test_finished_group_members_are_no_longer_known():
    buf = GroupBuffer(group_size=2, max_groups=10)
    ids = fill_group(buf, "g")
    for rid in ids:
        buf.finish(rid, "stop", 0.0)
    with pytest.raises(BufferError, match="unknown request_id"):
        buf.finish(ids[0], "stop", 1.0)
