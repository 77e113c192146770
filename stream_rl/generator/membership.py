"""Which generators serve, which are lost, restarting or rejoining: the
pool's bookkeeping of its members, engine-free (times are passed in).

A generator slot is
- live: it takes requests;
- down: lost (died, hung, failed to start); started again at `retry_at`;
- starting: a new process (or, for one run elsewhere, a reconnect) waits
  for its `GeneratorReady`;
- joining: ready, loading the current weights before it takes requests;
- gone: lost with no restart left.

`epoch` changes at every loss and every rejoin. A weight transfer is staged
for the receivers of one epoch (`protocol.Receivers`); it is doomed once any
of them was lost after it, and is then abandoned rather than waited for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stream_rl.protocol import Receivers


@dataclass
class Slot:
    state: str = "live"
    restarts: int = 0  # started again so far
    retry_at: float = 0.0
    started_at: float = 0.0
    lost_epoch: int = -1  # the epoch its last loss began
    down_since: float | None = None  # when it stopped serving
    cause: str = ""  # why it was last lost


@dataclass
class Membership:
    n: int
    max_restarts: int = 3
    backoff_s: float = 2.0
    startup_timeout_s: float = 600.0
    epoch: int = 0
    slots: list[Slot] = field(default_factory=list)
    lost: int = 0
    restarts: int = 0
    down_s: float = 0.0  # generator-seconds not serving, losses closed so far
    none_since: float | None = None  # when the last live generator was lost
    none_s: float = 0.0  # seconds with no generator serving, closed so far

    def __post_init__(self):
        if not self.slots:
            self.slots = [Slot() for _ in range(self.n)]

    def in_state(self, *states: str) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.state in states]

    @property
    def live(self) -> list[int]:
        return self.in_state("live")

    @property
    def joining(self) -> list[int]:
        return self.in_state("joining")

    def receivers(self) -> Receivers:
        """Who a version staged now goes to: the live and the joining."""
        return Receivers(epoch=self.epoch, generators=self.in_state("live", "joining"))

    def doomed(self, receivers: Receivers) -> list[int]:
        """Members of `receivers` lost since it was drawn up (or not serving)."""
        return [i for i in receivers.generators
                if self.slots[i].lost_epoch > receivers.epoch or self.slots[i].state not in ("live", "joining")]

    def lose(self, i: int, now: float, cause: str) -> None:
        s = self.slots[i]
        if s.state in ("down", "gone"):
            return
        was_live = bool(self.live)
        self.epoch += 1
        self.lost += 1
        s.lost_epoch, s.cause = self.epoch, cause
        if s.down_since is None:
            s.down_since = now
        if s.restarts >= self.max_restarts:
            s.state = "gone"
        else:
            s.state = "down"
            s.retry_at = now + self.backoff_s * 2 ** s.restarts
        if was_live and not self.live:
            self.none_since = now

    def due(self, now: float) -> list[int]:
        """Slots to start again now."""
        return [i for i, s in enumerate(self.slots) if s.state == "down" and now >= s.retry_at]

    def started(self, i: int, now: float) -> None:
        s = self.slots[i]
        s.state, s.started_at = "starting", now
        s.restarts += 1
        self.restarts += 1

    def overdue(self, now: float) -> list[int]:
        """Starting slots that have not said ready within the startup timeout."""
        return [i for i, s in enumerate(self.slots)
                if s.state == "starting" and now - s.started_at > self.startup_timeout_s]

    def ready(self, i: int) -> bool:
        """A starting slot said ready: it joins (loads the weights). False
        for any other slot (a repeated or stray ready)."""
        if self.slots[i].state != "starting":
            return False
        self.slots[i].state = "joining"
        self.epoch += 1
        return True

    def loaded(self, i: int, now: float) -> bool:
        """A joining slot serves the current weights: it is live again."""
        s = self.slots[i]
        if s.state != "joining":
            return False
        s.state = "live"
        if s.down_since is not None:
            self.down_s += now - s.down_since
            s.down_since = None
        if self.none_since is not None:
            self.none_s += now - self.none_since
            self.none_since = None
        return True

    @property
    def exhausted(self) -> bool:
        return all(s.state == "gone" for s in self.slots)

    def stats(self, now: float) -> dict:
        return {
            "generators_live": len(self.live),
            "generators_lost": self.lost,
            "generator_restarts": self.restarts,
            # Generator-seconds not serving (ongoing losses counted to now).
            "generator_down_s": self.down_s + sum(now - s.down_since for s in self.slots if s.down_since is not None),
            "no_generator_s": self.none_s + (now - self.none_since if self.none_since is not None else 0.0),
        }
