"""Several generators behind the one-generator interface the controller uses.

Requests go to the live generator with the fewest running; an abort goes to
the generator that runs the request; the streams of all generators are read
as one. Weight updates go to the receivers they were staged for and
complete when all of them serve the new version (`version` is the lowest
version served, the one that bounds staleness).

A generator that dies or hangs is lost, not fatal (`generator/membership.py`
keeps the states): what it streamed before it went is read, each of its
running requests ends as an abort, so the controller keeps its rollouts as
partials (tokens, log-probs and versions intact) and continues them on the
others; it is killed, started again after a backoff (`restart`), loads the
current weights and rejoins. With none serving, requests wait here for it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable

import zmq

from stream_rl.generator.client import GeneratorClient, GeneratorError
from stream_rl.generator.membership import Membership
from stream_rl.protocol import (AttentionWindowSet, GeneratorReady, Receivers, RequestRejected, RolloutFinished,
                                RolloutRequest, SetAttentionWindow, UpdateWeights, WeightsUpdated, WeightsUpdateFailed)
from stream_rl.transport import ms_until

log = logging.getLogger(__name__)

HEALTH_EVERY_S = 0.5  # how often liveness, silence and restarts are looked at while reading


class GeneratorPool:
    def __init__(self, clients: list[GeneratorClient], hang_timeout_s: float | None = None,
                 restart: Callable[[int], GeneratorClient] | None = None, max_restarts: int = 3,
                 backoff_s: float = 2.0, startup_timeout_s: float = 600.0):
        """`restart(i)`: a new client for generator i, its process started
        (or reconnected to one run elsewhere), not waited for; None: a lost
        generator stays lost."""
        if not clients:
            raise ValueError("a generator pool needs at least one generator")
        self.clients = list(clients)
        # A generator with requests running that sends nothing for this long
        # hangs (a stopped process, a wedged engine): it is lost.
        self.hang_timeout_s = hang_timeout_s
        self.restart = restart
        self.members = Membership(len(clients), max_restarts if restart else 0, backoff_s, startup_timeout_s)
        self.heard = [time.monotonic()] * len(clients)  # when each last sent anything
        self._checked = 0.0
        self.owner: dict[str, int] = {}  # running request id -> generator index
        self.running = [0] * len(clients)
        self.submitted = [0] * len(clients)
        self.queued: dict[str, RolloutRequest] = {}  # submitted while no generator serves
        # Messages handed out before the sockets are read again: a lost
        # generator's last ones, then the aborts that end its requests.
        self._held: deque = deque()
        self.recovered: set[str] = set()  # request ids a loss ended (the controller counts their tokens)
        self.rollouts_recovered = 0
        self._poller = zmq.Poller()
        for c in clients:
            self._poller.register(c.stream.sock, zmq.POLLIN)
        self._next = 0  # round-robin start of the next read, so no stream starves
        self.pending: int | None = None  # version sent, not yet served by all its receivers
        self._pending_to: list[int] = []
        self.abandoned: set[int] = set()  # versions whose transfer lost a receiver
        self.last_update: dict[int, WeightsUpdated] = {}  # generator index -> its last reply
        # Sparse rollouts: the attention window every generator should run
        # with (0: dense), and the one each confirmed.
        self.window = 0
        self.windows: dict[int, int] = {}
        self._version = 0

    @property
    def version(self) -> int:
        """The lowest version a live generator serves (the last known while none does)."""
        live = self.members.live
        if live:
            self._version = min(self.clients[i].version for i in live)
        return self._version

    def stats(self) -> dict:
        return {**self.members.stats(time.monotonic()), "rollouts_recovered": self.rollouts_recovered,
                "weight_updates_abandoned": len(self.abandoned)}

    # --- requests ------------------------------------------------------------------

    def submit(self, req: RolloutRequest) -> None:
        live = self.members.live
        if not live:
            self.queued[req.request_id] = req
            return
        i = min(live, key=self.running.__getitem__)
        if not self.running[i]:
            self.heard[i] = time.monotonic()  # its silence while idle is no hang
        self.owner[req.request_id] = i
        self.running[i] += 1
        self.submitted[i] += 1
        self.clients[i].submit(req)

    def abort(self, request_ids: list[str]) -> None:
        by_gen: dict[int, list[str]] = {}
        for rid in request_ids:
            if rid in self.owner:
                by_gen.setdefault(self.owner[rid], []).append(rid)
            elif self.queued.pop(rid, None) is not None:  # never sent: its end is told here
                self._held.append(RolloutFinished(request_id=rid, finish_reason="abort", num_tokens=0))
        for i, ids in by_gen.items():
            self.clients[i].abort(ids)

    # --- losses and restarts ---------------------------------------------------------

    def check_alive(self) -> None:
        """Look at every generator now (the controller calls this when idle)."""
        self._health(time.monotonic())

    def _health(self, now: float) -> None:
        self._checked = now
        for i, c in enumerate(self.clients):
            state = self.members.slots[i].state
            if state in ("down", "gone"):
                continue
            cause = c.exit_cause()
            if cause:
                self._lose(i, cause)
            elif (state == "live" and self.hang_timeout_s is not None and self.running[i]
                  and now - self.heard[i] > self.hang_timeout_s):
                c.hung = True
                self._lose(i, f"it has sent nothing for {now - self.heard[i]:.0f} s with {self.running[i]} "
                              f"requests running: it hangs (generator.hang_timeout_s: {self.hang_timeout_s:g})")
        for i in self.members.overdue(now):
            self._lose(i, f"it did not start within generator.startup_timeout_s "
                          f"({self.members.startup_timeout_s:g} s)")
        for i in self.members.due(now):
            self._start(i, now)

    def _lose(self, i: int, cause: str) -> None:
        c = self.clients[i]
        c.kill()  # its engine too: it holds memory, ports and a rank of the weight group
        # What it streamed before it went is kept, then its requests end as aborts.
        while (msg := c.recv(timeout_ms=20)) is not None:
            msg = self._read(i, msg)
            if msg is not None:
                self._held.append(msg)
        ids = [rid for rid, j in self.owner.items() if j == i]
        for rid in ids:
            del self.owner[rid]
            self.recovered.add(rid)
            self._held.append(RolloutFinished(request_id=rid, finish_reason="abort", num_tokens=0))
        self.rollouts_recovered += len(ids)
        self.running[i] = 0
        self._poller.unregister(c.stream.sock)
        c.close()
        self.members.lose(i, time.monotonic(), cause)
        slot = self.members.slots[i]
        log.error("generator %d lost: %s; %d running requests continue on %s", i, cause, len(ids),
                  f"generator(s) {self.members.live}" if self.members.live else "its restart")
        if self.pending is not None and i in self._pending_to:
            self._abandon(self.pending, f"generator {i} was lost during its transfer")
        if slot.state == "gone" and self.restart is not None:
            log.error("generator %d: no restart left (generator.max_restarts: %d)", i, self.members.max_restarts)
        if self.members.exhausted:
            raise GeneratorError(f"generator {i} was lost and no generator is left to continue "
                                 f"(generator.max_restarts: {self.members.max_restarts}): {cause}")

    def _start(self, i: int, now: float) -> None:
        self.members.started(i, now)
        slot = self.members.slots[i]
        log.warning("generator %d: starting it again (restart %d of %d)", i, slot.restarts, self.members.max_restarts)
        try:
            c = self.restart(i)
        except Exception as err:  # counts as a restart, as one that dies while starting
            cause = f"its restart failed: {type(err).__name__}: {err}"
            log.error("generator %d: %s", i, cause)
            self.members.lose(i, now, cause)
            if self.members.exhausted:  # else the job would wait for a generator forever
                raise GeneratorError(f"generator {i} could not be started again and no generator is left "
                                     f"(generator.max_restarts: {self.members.max_restarts}): {cause}") from err
            return
        self.clients[i] = c
        self._poller.register(c.stream.sock, zmq.POLLIN)
        self.heard[i] = now

    def _abandon(self, version: int, why: str) -> None:
        log.warning("weights version %d abandoned (%s): the next version goes to the generators serving then",
                    version, why)
        self.abandoned.add(version)
        if self.pending == version:
            self.pending, self._pending_to = None, []

    def _flush(self) -> None:
        """Requests that waited for a generator go out."""
        queued, self.queued = self.queued, {}
        for req in queued.values():
            self.submit(req)

    # --- the streams ---------------------------------------------------------------

    def _read(self, i: int, msg):
        """Book-keeping on a message from generator i; weight replies are
        consumed here (None returned), everything else goes on."""
        self.heard[i] = time.monotonic()
        if isinstance(msg, (RolloutFinished, RequestRejected)):
            if self.owner.get(msg.request_id) == i:
                del self.owner[msg.request_id]
                self.running[i] -= 1
        elif isinstance(msg, AttentionWindowSet):
            if msg.error:
                log.warning("generator %d kept attention window %d: %s", i, msg.window, msg.error)
            self.windows[i] = msg.window
            return None
        elif isinstance(msg, WeightsUpdateFailed):
            if msg.version != self.pending:
                # An abandoned transfer (`_abandon` cleared it), or one of a
                # controller before this one (resumed job).
                log.warning("generator %d: weights version %d failed: %s", i, msg.version, msg.error)
                return None
            raise GeneratorError(f"generator {i} failed to load weights version {msg.version}: {msg.error}")
        elif isinstance(msg, (WeightsUpdated, GeneratorReady)):
            c = self.clients[i]
            c.version = max(c.version, msg.version)
            if isinstance(msg, GeneratorReady) and self.members.ready(i):
                log.warning("generator %d is up again (version %d); it rejoins with the next weights", i, msg.version)
                if self.window:  # a new engine starts dense
                    c.requests.send(SetAttentionWindow(window=self.window))
            if isinstance(msg, WeightsUpdated):
                self.last_update[i] = msg
                if self.members.loaded(i, time.monotonic()):
                    log.warning("generator %d rejoined, serving version %d", i, msg.version)
                    self._flush()
            if self.pending is not None and all(self.clients[j].version >= self.pending for j in self._pending_to):
                self.pending, self._pending_to = None, []
            return None
        return msg

    def _pull(self, timeout_ms: int | None) -> None:
        """One wait on the sockets (health looked at first, when due); what
        goes on is queued in `_held`. One message is read from every stream
        that has one, so with many generators a poll serves a round of them,
        not one message, and no stream starves."""
        now = time.monotonic()
        if now - self._checked > HEALTH_EVERY_S:
            self._health(now)
            if self._held:
                return
        n = len(self.clients)
        waiting = any(c._backlog for c in self.clients)  # replies set aside while waiting for a specific one
        ready = dict(self._poller.poll(0 if waiting else timeout_ms))
        for k in range(n):
            i = (self._next + k) % n
            c = self.clients[i]
            if c._backlog or c.stream.sock in ready:
                for msg in c.take():
                    msg = self._read(i, msg)
                    if msg is not None:
                        self._held.append(msg)
        self._next = (self._next + 1) % n

    def recv(self, timeout_ms: int | None = None):
        """The next message of any generator, or None on timeout."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            if self._held:
                return self._held.popleft()
            wait = int(HEALTH_EVERY_S * 1000) if deadline is None else min(ms_until(deadline),
                                                                              int(HEALTH_EVERY_S * 1000))
            self._pull(wait)
            if not self._held and deadline is not None and time.monotonic() >= deadline:
                return None

    # --- weights ------------------------------------------------------------------

    def receivers(self) -> Receivers:
        """Who weights staged now go to (the serving and the rejoining)."""
        return self.members.receivers()

    @property
    def joining(self) -> list[int]:
        return self.members.joining

    @property
    def live(self) -> list[int]:
        return self.members.live

    def set_window(self, window: int) -> None:
        """Every generator attends to the last `window` tokens from now on
        (0: dense); each confirms with `AttentionWindowSet` (`windows`). A
        generator that restarts gets it when it is up again."""
        self.window = window
        for c in self.clients:
            if not c.requests.sock.closed:
                c.requests.send(SetAttentionWindow(window=window))

    def begin_update(self, version: int, uri: str, receivers: Receivers | None = None) -> bool:
        """Ask `receivers` (default: those serving or rejoining now) to load
        `version`; `pending` clears once all serve it (`recv` reads their
        replies). False, with nothing sent, if one of them was lost since
        the weights were staged: that transfer cannot complete."""
        receivers = receivers or self.receivers()
        lost = self.members.doomed(receivers)
        if lost or not receivers.generators:
            self._abandon(version, f"generator(s) {lost} lost since it was staged" if lost else "no generator serves")
            return False
        served = max(self.clients[j].version for j in receivers.generators)
        if version <= served:
            raise GeneratorError(f"weights version {version} is not above the served {served}")
        self.pending, self._pending_to = version, list(receivers.generators)
        for j in receivers.generators:
            self.clients[j].requests.send(UpdateWeights(version=version, uri=uri))
        return True

    def update_weights(self, version: int, uri: str, receivers: Receivers | None = None,
                       timeout_s: float = 600.0) -> bool:
        """`begin_update` and wait until its receivers serve `version` (other
        messages are kept for `recv`, in order); False if it was abandoned."""
        if not self.begin_update(version, uri, receivers):
            return False
        deadline = time.monotonic() + timeout_s
        while self.pending == version:
            if time.monotonic() > deadline:
                raise GeneratorError(f"timed out after {timeout_s:.0f} s waiting for weights version {version}")
            self._pull(min(ms_until(deadline), int(HEALTH_EVERY_S * 1000)))
        return version not in self.abandoned
