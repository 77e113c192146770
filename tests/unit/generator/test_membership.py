"""The pool's membership bookkeeping on a virtual clock: losses, backoff,
restarts, rejoins, which staged transfers are doomed, and the time lost."""

from __future__ import annotations

from hypothesis import given, strategies as st

from stream_rl.generator.membership import Membership
from stream_rl.protocol import Receivers


def test_a_loss_restarts_with_doubling_backoff_until_none_is_left():
    m = Membership(2, max_restarts=2, backoff_s=1.0, startup_timeout_s=10.0)
    m.lose(1, now=0.0, cause="killed")
    assert m.live == [0] and m.due(0.9) == [] and m.due(1.0) == [1]
    m.started(1, now=1.0)
    assert m.overdue(10.9) == [] and m.overdue(11.1) == [1]
    m.lose(1, now=11.1, cause="did not start")  # second loss: twice the wait
    assert m.due(13.0) == [] and m.due(13.1) == [1]
    m.started(1, now=13.1)
    assert m.ready(1) and not m.ready(1)  # a repeated ready changes nothing
    assert m.joining == [1] and m.receivers().generators == [0, 1]
    assert m.loaded(1, now=14.0) and m.live == [0, 1]
    assert m.stats(20.0)["generator_down_s"] == 14.0
    m.lose(1, now=20.0, cause="killed")  # its restarts are spent
    assert m.slots[1].state == "gone" and m.due(1e9) == [] and not m.exhausted
    m.lose(0, now=20.0, cause="killed")  # 0 has restarts left: down, and none serves
    assert m.slots[0].state == "down" and m.stats(25.0)["no_generator_s"] == 5.0


def test_staged_weights_are_doomed_by_a_loss_after_them_not_before():
    m = Membership(3, max_restarts=1)
    before = m.receivers()
    m.lose(2, now=0.0, cause="killed")
    after = m.receivers()
    assert m.doomed(before) == [2] and m.doomed(after) == [] and after.generators == [0, 1]
    m.started(2, now=5.0)
    m.ready(2)
    rejoining = m.receivers()
    assert rejoining.generators == [0, 1, 2] and m.doomed(rejoining) == [] and m.doomed(after) == []
    assert m.doomed(Receivers(epoch=rejoining.epoch, generators=[0, 1, 2])) == []


@given(st.lists(st.tuples(st.sampled_from(["lose", "tick", "ready", "load"]), st.integers(0, 2)), max_size=60))
def test_epochs_only_grow_and_every_receiver_list_serves_or_rejoins(events):
    m = Membership(3, max_restarts=2, backoff_s=1.0, startup_timeout_s=5.0)
    now, epoch, drawn = 0.0, 0, []
    for kind, i in events:
        now += 0.7
        if kind == "lose":
            m.lose(i, now, "x")
        elif kind == "tick":
            for j in m.due(now):
                m.started(j, now)
        elif kind == "ready":
            m.ready(i)
        else:
            m.loaded(i, now)
        assert m.epoch >= epoch
        epoch = m.epoch
        r = m.receivers()
        assert all(m.slots[j].state in ("live", "joining") for j in r.generators) and m.doomed(r) == []
        drawn.append(r)
        # A list drawn earlier is doomed exactly when one of its members was lost after it.
        for old in drawn:
            lost_after = [j for j in old.generators if m.slots[j].lost_epoch > old.epoch]
            assert set(lost_after) <= set(m.doomed(old))
        s = m.stats(now)
        assert 0 <= s["no_generator_s"] and 0 <= s["generator_down_s"] and s["generator_restarts"] <= 6
