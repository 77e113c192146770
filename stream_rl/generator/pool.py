"""Several generators behind the one-generator interface the controller uses.

Requests go to the generator with the fewest running; an abort goes to the
generator that runs the request; the streams of all generators are read as
one. Weight updates are sent to every generator and complete when all of
them serve the new version (`version` is the lowest version served, the one
that bounds staleness).
"""

from __future__ import annotations

import logging
import time

import zmq

from stream_rl.generator.client import GeneratorClient, GeneratorError
from stream_rl.protocol import (GeneratorReady, RequestRejected, RolloutFinished, RolloutRequest, UpdateWeights,
                                WeightsUpdated, WeightsUpdateFailed)
from stream_rl.transport import ms_until

log = logging.getLogger(__name__)


class GeneratorPool:
    def __init__(self, clients: list[GeneratorClient], hang_timeout_s: float | None = None):
        if not clients:
            raise ValueError("a generator pool needs at least one generator")
        self.clients = clients
        # A generator with requests running that sends nothing for this long
        # hangs (a stopped process, a wedged engine): the job stops naming it.
        self.hang_timeout_s = hang_timeout_s
        self.heard = [time.monotonic()] * len(clients)  # when each last sent anything
        self._silence_checked = 0.0
        self.owner: dict[str, int] = {}  # running request id -> generator index
        self.running = [0] * len(clients)
        self.submitted = [0] * len(clients)
        self._poller = zmq.Poller()
        for c in clients:
            self._poller.register(c.stream.sock, zmq.POLLIN)
        self._next = 0  # round-robin start of the next read, so no stream starves
        self.pending: int | None = None  # version sent, not yet served by all
        self.last_update: dict[int, WeightsUpdated] = {}  # generator index -> its last reply

    @property
    def version(self) -> int:
        return min(c.version for c in self.clients)

    def submit(self, req: RolloutRequest) -> None:
        i = min(range(len(self.clients)), key=self.running.__getitem__)
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
        for i, ids in by_gen.items():
            self.clients[i].abort(ids)

    def check_alive(self) -> None:
        for c in self.clients:
            c.check_alive()
        self.check_silence(time.monotonic())

    def check_silence(self, now: float) -> None:
        """GeneratorError for a generator with requests running that has sent
        nothing for `hang_timeout_s`."""
        if self.hang_timeout_s is None:
            return
        for i, heard in enumerate(self.heard):
            if self.running[i] and now - heard > self.hang_timeout_s:
                self.clients[i].hung = True  # its stop is not waited out
                raise GeneratorError(f"generator {i} has sent nothing for {now - heard:.0f} s with "
                                     f"{self.running[i]} requests running: it hangs (generator.hang_timeout_s: "
                                     f"{self.hang_timeout_s:g})")

    # --- the streams ---------------------------------------------------------------

    def _read(self, i: int, msg):
        """Book-keeping on a message from generator i; weight replies are
        consumed here (None returned), everything else goes on."""
        self.heard[i] = now = time.monotonic()
        if now - self._silence_checked > 1.0:  # one generator may hang while another streams
            self._silence_checked = now
            self.check_silence(now)
        if isinstance(msg, (RolloutFinished, RequestRejected)):
            if self.owner.pop(msg.request_id, None) is not None:
                self.running[i] -= 1
        elif isinstance(msg, WeightsUpdateFailed):
            if msg.version != self.pending:  # a transfer of a controller before this one (resumed job)
                log.warning("generator %d: earlier weights version %d failed: %s", i, msg.version, msg.error)
                return None
            raise GeneratorError(f"generator {i} failed to load weights version {msg.version}: {msg.error}")
        elif isinstance(msg, (WeightsUpdated, GeneratorReady)):
            self.clients[i].version = max(self.clients[i].version, msg.version)
            if isinstance(msg, WeightsUpdated):
                self.last_update[i] = msg
            if self.pending is not None and self.version >= self.pending:
                self.pending = None
            return None
        return msg

    def recv(self, timeout_ms: int | None = None):
        """The next message of any generator, or None on timeout."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        n = len(self.clients)
        while True:
            for k in range(n):  # replies set aside while waiting for a specific one
                i = (self._next + k) % n
                if self.clients[i]._backlog:
                    msg = self._read(i, self.clients[i]._backlog.popleft())
                    if msg is not None:
                        return msg
            left = None if deadline is None else ms_until(deadline)
            ready = dict(self._poller.poll(left))
            got = None
            for k in range(n):
                i = (self._next + k) % n
                if self.clients[i].stream.sock in ready:
                    self._next = (i + 1) % n
                    got = self._read(i, self.clients[i].stream.recv(0))
                    if got is not None:
                        return got
            if not ready and deadline is not None and time.monotonic() >= deadline:
                return None

    # --- weights ------------------------------------------------------------------

    def begin_update(self, version: int, uri: str) -> None:
        """Ask every generator to load `version`; `pending` clears once all
        serve it (its replies are read by `recv`)."""
        if version <= max(c.version for c in self.clients):
            raise GeneratorError(f"weights version {version} is not above the served {self.version}")
        self.pending = version
        for c in self.clients:
            c.requests.send(UpdateWeights(version=version, uri=uri))

    def update_weights(self, version: int, uri: str, timeout_s: float = 600.0) -> None:
        """`begin_update` and wait until every generator serves `version`
        (other messages are kept for `recv`, in order)."""
        self.begin_update(version, uri)
        deadline = time.monotonic() + timeout_s
        for i, c in enumerate(self.clients):
            while c.version < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GeneratorError(f"timed out after {timeout_s:.0f} s waiting for weights version {version}")
                msg = c._wait_for((WeightsUpdated, WeightsUpdateFailed), left, f"weights version {version}")
                self._read(i, msg)
        self.pending = None
