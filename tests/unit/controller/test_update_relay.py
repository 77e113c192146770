"""UpdateRelay: stream mode's one-load-at-a-time weight relay. Every staged
version is released to the learner exactly once, loaded or replaced."""

from __future__ import annotations

from hypothesis import given, strategies as st

from stream_rl.protocol import WeightsLoaded, WeightsStaged
from stream_rl.controller.schedules import UpdateRelay


class Pool:
    """The two things UpdateRelay reads of a GeneratorPool: begin_update and
    `pending` (cleared here when the test lets the load finish)."""

    def __init__(self, doomed=()):
        self.pending, self.begun = None, []
        self.doomed = set(doomed)  # versions staged for a receiver lost since

    def begin_update(self, version: int, uri: str, receivers=None) -> bool:
        if version in self.doomed:
            return False
        self.pending = version
        self.begun.append(version)
        return True


class Learner:
    def __init__(self):
        self.sent = []

    def send(self, msg) -> None:
        self.sent.append(msg)


def _released(learner: Learner) -> list[int]:
    assert all(isinstance(m, WeightsLoaded) for m in learner.sent)
    return [m.version for m in learner.sent]


def test_waiting_version_replaced_by_newer_is_released_and_never_loaded():
    pool, learner = Pool(), Learner()
    relay = UpdateRelay(pool, learner)
    relay.add(WeightsStaged(version=1, uri="u1"))
    relay.add(WeightsStaged(version=2, uri="u2"))
    relay.add(WeightsStaged(version=3, uri="u3"))  # replaces 2
    assert _released(learner) == [2]
    assert not relay.poll()  # 1 still loading
    pool.pending = None
    assert relay.poll()
    assert _released(learner) == [2, 1] and pool.begun == [1, 3]
    pool.pending = None
    assert relay.poll() and _released(learner) == [2, 1, 3]
    assert not relay.poll()


@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_every_staged_version_released_once_and_loads_in_order(events):
    """events: True stages the next version, False lets a load finish."""
    pool, learner = Pool(), Learner()
    relay = UpdateRelay(pool, learner)
    version = 0
    for stage in events:
        if stage:
            version += 1
            relay.add(WeightsStaged(version=version, uri=f"u{version}"))
        else:
            pool.pending = None
            relay.poll()
    for _ in range(3):  # drain
        pool.pending = None
        relay.poll()
    released = _released(learner)
    assert sorted(released) == list(range(1, version + 1))
    assert pool.begun == sorted(pool.begun) and (not version or pool.begun[-1] == version)


def test_a_version_staged_for_a_lost_generator_is_released_at_once_and_the_next_loads():
    pool, learner = Pool(doomed={2}), Learner()
    relay = UpdateRelay(pool, learner)
    relay.add(WeightsStaged(version=1, uri="u1"))
    relay.add(WeightsStaged(version=2, uri="u2"))  # waits for 1
    pool.pending = None
    assert relay.poll()  # 1 loaded; 2 cannot be: released, nothing loading
    assert _released(learner) == [1, 2] and relay.loading is None
    relay.add(WeightsStaged(version=3, uri="u3"))
    assert pool.begun == [1, 3] and relay.loading.version == 3
