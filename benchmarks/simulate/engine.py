"""Simulated generators behind the `GeneratorPool` interface the job uses.

Each engine runs continuous batching on the virtual clock: up to
`max_num_seqs` requests decode together, a decode step of a batch of B with
C context tokens costs `decode_a + decode_b * B + decode_c * C` seconds, a
request joining a step adds `prefill_per_token` x its prompt (and
continued response) tokens. The engine advances in leaps: from one moment
where something is sent (a full chunk, a finished request, a quality
score) to the next, or `quantum` steps at least (then what falls due inside
a leap goes out at its end: coarser, much faster at scale). A submit, an
abort or a weight load cuts the leap after the step in progress, as a real
engine takes them between steps.

Messages are the protocol's own: `TokenChunk`s of `chunk_tokens` tokens
carrying the version the engine served when it sampled each token,
`QualityScore` on the chunk that reaches a request's `score_at + 1`
(ARRoL), `RolloutFinished` at the drawn length (stop), at the request's
budget (length) or on abort. A weight load takes `load_s` from the request
to serving, the last `pause_s` of it with generation stopped; running
requests keep running (in-flight) and later tokens carry the new version."""

from __future__ import annotations

import math
from collections import deque
from types import SimpleNamespace

from stream_rl.protocol import QualityScore, Receivers, RolloutFinished, TokenChunk, WeightsUpdated

from benchmarks.simulate.events import EventLoop
from benchmarks.simulate.workload import FILL, RIGHT, WRONG, Workload


class _Req:
    __slots__ = ("msg", "n0", "produced", "streamed", "fate", "stop_len", "correct", "budget", "segs",
                 "scored", "aborted", "prefill")

    def __init__(self, msg, fate: int | None):
        self.msg = msg
        self.n0 = len(msg.response_ids)
        self.produced = self.streamed = 0
        self.fate = fate
        self.stop_len, self.correct = Workload.fate(fate) if fate is not None else (None, False)
        self.budget = msg.max_tokens
        self.segs: list[list[int]] = []  # [count, version] runs of sampled, unsent tokens
        self.scored = msg.score_at is None
        self.aborted = False
        self.prefill = len(msg.prompt_ids) + self.n0

    def to_end(self) -> int:
        left = self.budget - self.produced
        if self.stop_len is not None:
            left = min(left, self.stop_len - self.n0 - self.produced)
        return max(0, left)


class SimEngine:
    def __init__(self, idx: int, pool: "SimPool"):
        self.idx, self.pool = idx, pool
        self.loop: EventLoop = pool.loop
        self.cost, self.cfg = pool.cost, pool.cfg.generator
        self.version = 0
        self.stream = SimpleNamespace(rejected=0)
        self.running: dict[str, _Req] = {}
        self.waiting: deque[_Req] = deque()
        self.leap: tuple | None = None  # (t0, k, B, prefill, base, cinc)
        self.gen = 0
        self.paused = False
        self.busy_s = self.paused_s = 0.0
        self.seq_s = 0.0  # sequences in the batch integrated over decode time
        self.tokens = 0

    @property
    def load(self) -> int:
        return len(self.running) + len(self.waiting)

    # --- time model -------------------------------------------------------------------

    def _time(self, leap, j: int) -> float:
        _, _, B, prefill, base, cinc = leap
        return prefill + j * base + cinc * j * (j - 1) / 2

    def _steps_by(self, leap, elapsed: float) -> int:
        _, k, B, prefill, base, cinc = leap
        e = elapsed - prefill
        if e <= 0:
            return 0
        if cinc <= 0:
            j = int(e / base) if base > 0 else k
        else:  # cinc/2 j^2 + (base - cinc/2) j - e <= 0
            a2, b2 = cinc / 2, base - cinc / 2
            j = int((-b2 + math.sqrt(b2 * b2 + 4 * a2 * e)) / (2 * a2))
        while j > 0 and self._time(leap, j) > elapsed + 1e-12:
            j -= 1
        return min(j, k)

    # --- requests ---------------------------------------------------------------------

    def submit(self, msg) -> None:
        self.waiting.append(_Req(msg, msg.response_ids[0] if msg.response_ids else None))
        self._interrupt()

    def abort(self, ids) -> None:
        hit = False
        for rid in ids:
            r = self.running.get(rid)
            if r is not None:
                r.aborted = hit = True
                continue
            for w in self.waiting:
                if w.msg.request_id == rid:
                    w.aborted = hit = True
        if hit:
            self._interrupt()

    def begin_load(self, version: int) -> None:
        c = self.cost
        self.loop.at(self.loop.now + max(0.0, c.load_s - c.pause_s), lambda: self._pause(version))

    def _pause(self, version: int) -> None:
        t = self._cut()
        self.paused = True
        self.leap = None
        self.gen += 1
        end = t + self.cost.pause_s
        self.paused_s += end - self.loop.now

        def resume():
            self.paused = False
            self.version = max(self.version, version)
            self.pool._updated(self.idx, WeightsUpdated(version=version, load_s=self.cost.load_s,
                                                        pause_s=self.cost.pause_s))
            self._plan(self.loop.now)

        self.loop.at(end, resume)

    # --- the leaps --------------------------------------------------------------------

    def _interrupt(self) -> None:
        if self.paused:
            return
        if self.leap is None:
            self._plan(self.loop.now)
            return
        t = self._cut()
        self._plan(t)

    def _cut(self) -> float:
        """Stop the current leap after the step in progress; returns when that step ends."""
        leap, now = self.leap, self.loop.now
        if leap is None:
            return now
        # A change at the instant the leap starts joins its first step.
        j = 0 if now <= leap[0] else min(leap[1], self._steps_by(leap, now - leap[0]) + 1)
        self.gen += 1
        self.leap = None
        return self._apply(leap, j)

    def _plan(self, t: float) -> None:
        """Start the next leap at time t (>= now)."""
        self.gen += 1
        if self.paused:
            return
        out = []
        for rid in [rid for rid, r in self.running.items() if r.aborted]:
            self._finish(self.running.pop(rid), "abort", out)
        if any(w.aborted for w in self.waiting):
            for w in [w for w in self.waiting if w.aborted]:
                self.waiting.remove(w)
                self._finish(w, "abort", out)
        prefill = 0
        while self.waiting and len(self.running) < self.cfg.max_num_seqs:
            r = self.waiting.popleft()
            self.running[r.msg.request_id] = r
            prefill += r.prefill
        self._emit(out, t)
        if not self.running:
            self.leap = None
            return
        chunk = self.cfg.chunk_tokens
        k = None
        ctx = 0
        for r in self.running.values():
            if r.fate is None:  # its first token is drawn now, by the weights it starts on
                r.fate = self.pool.workload.draw(r.msg.prompt_ids, self.version, self.pool.cfg.generator.max_tokens)
                r.stop_len, r.correct = Workload.fate(r.fate)
            pend = r.produced - r.streamed
            kr = min(r.to_end(), chunk - pend)
            if not r.scored:
                kr = min(kr, r.msg.score_at + 1 - r.n0 - r.produced)
            kr = max(1, kr)
            k = kr if k is None else min(k, kr)
            ctx += len(r.msg.prompt_ids) + r.n0 + r.produced
        k = max(k, self.pool.quantum)
        c, B, f = self.cost, len(self.running), self.pool.slowdown
        leap = (t, k, B, f * c.prefill_per_token * prefill, f * (c.decode_a + c.decode_b * B + c.decode_c * ctx),
                f * c.decode_c * B)
        self.leap = leap
        gen = self.gen
        self.loop.at(t + self._time(leap, k), lambda: self._leap_end(gen))

    def _leap_end(self, gen: int) -> None:
        if gen != self.gen or self.leap is None:
            return
        leap, self.leap = self.leap, None
        t = self._apply(leap, leap[1])
        self._plan(t)

    def _apply(self, leap, j: int) -> float:
        """j steps of `leap` done: tokens sampled, what fell due sent. Returns when they end."""
        t = leap[0] + self._time(leap, j)
        self.busy_s += t - leap[0]
        self.seq_s += leap[2] * (t - leap[0])
        out = []
        chunk = self.cfg.chunk_tokens
        done = []
        for rid, r in self.running.items():
            g = min(j, r.to_end())
            if g > 0:
                r.produced += g
                self.tokens += g
                if r.segs and r.segs[-1][1] == self.version:
                    r.segs[-1][0] += g
                else:
                    r.segs.append([g, self.version])
            if r.to_end() == 0:
                done.append(rid)
                continue
            due = (not r.scored) and r.n0 + r.produced >= r.msg.score_at + 1
            while r.produced - r.streamed >= chunk or (due and r.produced > r.streamed):
                self._send(r, out)
        for rid in done:
            r = self.running.pop(rid)
            stop = r.stop_len is not None and r.n0 + r.produced >= r.stop_len
            self._finish(r, "stop" if stop else "length", out)
        self._emit(out, t)
        return t

    def _send(self, r: _Req, out: list) -> None:
        """One chunk of the unsent tokens (at most chunk_tokens)."""
        n = min(self.cfg.chunk_tokens, r.produced - r.streamed)
        start = r.n0 + r.streamed  # response position of its first token
        ids = [FILL] * n
        if start == 0:
            ids[0] = r.fate
        if r.stop_len is not None and start <= r.stop_len - 1 < start + n:
            ids[r.stop_len - 1 - start] = RIGHT if r.correct else WRONG
        versions = []
        need = n
        while need:
            seg = r.segs[0]
            take = min(need, seg[0])
            versions += [seg[1]] * take
            seg[0] -= take
            need -= take
            if not seg[0]:
                r.segs.pop(0)
        score = None
        last = r.streamed + n == r.produced
        if last and not r.scored and r.n0 + r.produced >= r.msg.score_at + 1:
            r.scored = True
            score = QualityScore(at_tokens=r.msg.score_at, logit=self.pool.workload.score_logit(r.correct), features=b"")
        out.append(TokenChunk(request_id=r.msg.request_id, offset=r.n0 + r.streamed, token_ids=ids,
                              logprobs=[-1.0] * n if self.pool.cfg.generator.return_logprobs else [],
                              versions=versions, score=score))
        r.streamed += n

    def _finish(self, r: _Req, reason: str, out: list) -> None:
        while r.produced > r.streamed:  # what it sampled (before an abort took effect too) goes out first
            self._send(r, out)
        out.append(RolloutFinished(request_id=r.msg.request_id, finish_reason=reason, num_tokens=r.streamed))

    def _emit(self, msgs: list, t: float) -> None:
        if not msgs:
            return
        if t <= self.loop.now:
            self.pool._deliver(self.idx, msgs)
        else:
            self.loop.at(t, lambda: self.pool._deliver(self.idx, msgs))


class SimPool:
    """The `GeneratorPool` interface over `n` simulated engines."""

    def __init__(self, loop: EventLoop, cfg, cost, workload: Workload, n: int, quantum: int = 1):
        self.loop, self.cfg, self.cost, self.workload, self.quantum = loop, cfg, cost, workload, quantum
        self.clients = [SimEngine(i, self) for i in range(n)]
        self.outbox: deque = deque()
        self.owner: dict[str, int] = {}
        self.submitted = [0] * n
        self.recovered: set[str] = set()
        self.joining: list[int] = []
        self.live = list(range(n))
        self.pending: int | None = None
        self.last_update: dict[int, WeightsUpdated] = {}
        self.messages = 0
        self.slowdown = 1.0  # step time factor (the learner contending for the engines' host core)

    @property
    def version(self) -> int:
        return min(c.version for c in self.clients)

    def stats(self) -> dict:
        return {}

    def submit(self, req) -> None:
        i = min(range(len(self.clients)), key=lambda j: self.clients[j].load)
        self.owner[req.request_id] = i
        self.submitted[i] += 1
        self.clients[i].submit(req)

    def abort(self, request_ids) -> None:
        by: dict[int, list[str]] = {}
        for rid in request_ids:
            if rid in self.owner:
                by.setdefault(self.owner[rid], []).append(rid)
        for i, ids in by.items():
            self.clients[i].abort(ids)

    def check_alive(self) -> None:
        pass

    def recv(self, timeout_ms: int | None = None):
        if not self.outbox:
            self.loop.run_until(lambda: bool(self.outbox), None if timeout_ms is None else timeout_ms / 1000)
        return self.outbox.popleft() if self.outbox else None

    def _deliver(self, i: int, msgs: list) -> None:
        for m in msgs:
            if isinstance(m, RolloutFinished):
                self.owner.pop(m.request_id, None)
        self.messages += len(msgs)
        self.outbox.extend(msgs)

    def set_training(self, training: bool) -> None:
        """An update started or ended: steps after the one in progress run at the new speed."""
        f = 1.0 + (self.cost.engine_slowdown_while_training if training else 0.0)
        if f != self.slowdown:
            self.slowdown = f
            for c in self.clients:
                c._interrupt()

    # --- weights ------------------------------------------------------------------------

    def receivers(self) -> Receivers:
        return Receivers(generators=list(range(len(self.clients))))

    def begin_update(self, version: int, uri: str, receivers: Receivers | None = None) -> bool:
        self.pending = version
        for c in self.clients:
            c.begin_load(version)
        return True

    def update_weights(self, version: int, uri: str, receivers: Receivers | None = None,
                       timeout_s: float = 600.0) -> bool:
        self.begin_update(version, uri, receivers)
        self.loop.run_until(lambda: self.pending != version, timeout_s)
        return True

    def _updated(self, i: int, msg: WeightsUpdated) -> None:
        self.last_update[i] = msg
        if self.pending is not None and all(c.version >= self.pending for c in self.clients):
            self.pending = None

    # --- numbers ------------------------------------------------------------------------

    def bubble_fraction(self, t0: float, t1: float) -> float:
        """Engine time not decoding (idle or paused for weights) over the span, mean over engines."""
        span = max(1e-12, t1 - t0)
        return 1.0 - sum(min(c.busy_s, span) for c in self.clients) / (span * len(self.clients))

    def mean_batch(self, t0: float, t1: float) -> float:
        """Sequences an engine decodes at once, averaged over the span (idle time counts 0)."""
        return sum(c.seq_s for c in self.clients) / (max(1e-12, t1 - t0) * len(self.clients))
