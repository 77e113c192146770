"""`stream-rl bench controller`: a stress test of the controller on real wire traffic.

Load-generator processes (`benchmarks/load_generator.py`) stand in for the
generator services: each serves several generator connections on their real
addresses and streams chunks, scores and finishes in the real wire format.
This process is the controller: the real `GeneratorPool` of
`GeneratorClient`s, `RolloutController`, `RecyclingBuffer`, ARRoL pruner
(cold start off and no AUC gate, so every score is reviewed and drawn on),
verifier, tokenizer and prompts, in `run_stream`'s loop without a learner:
fill, pump, take each complete batch (the pruner's `end_step`) and drop it.

For each connection count the offered rate is ramped (doubling, then
bisection): a trial offers a rate for a warm-up and a window, then stops
the load and drains. A rate is sustained when, over the window, the
controller took in at least 95% of it, no token sent was missing from the
buffer after the drain, and the p99 delay from a chunk's send to the end of
its handling (in the buffer, reviewed by the pruner) was at most 100 ms.
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import secrets
import statistics
import time
from dataclasses import dataclass, field

import msgspec

from benchmarks.common import BenchSetupError, emit, free_ports
from benchmarks.load_generator import LoadSpec
from benchmarks.load_generator import run as run_load
from stream_rl.config import Config, config_from_dict, config_to_dict, generator_addrs
from stream_rl.controller.launch import make_pool, settle_heap
from stream_rl.controller.rollouts import RolloutController
from stream_rl.data import PromptSampler
from stream_rl.generator.client import GeneratorClient
from stream_rl.preflight import check_job
from stream_rl.protocol import Hello
from stream_rl.pruner import make_pruner
from stream_rl.transport import caps
from stream_rl.verifier import make_verifier

CONNECTIONS = (1, 8, 32, 64)
MAX_DELAY_S = 0.100
MIN_TAKEN = 0.95  # of the offered rate, over the window


@dataclass
class Options:
    connections: tuple[int, ...] = CONNECTIONS
    wires: tuple[str, ...] = ("batch",)
    start_rate: float = 50_000.0  # tokens/s, the first trial of the first connection count
    max_rate: float = 4_000_000.0
    bisections: int = 2
    warmup_s: float = 2.5
    window_s: float = 2.0
    drain_s: float = 5.0
    # Tokens/s of one running request: a connection offered R tokens/s runs
    # R / request_rate requests (a GPU engine decodes each at tens of tokens/s;
    # rollouts then live seconds, and a few seconds of warm-up reach the steady
    # mix of chunks, scores, finishes and new groups at any rate).
    request_rate: float = 60.0
    load_procs: int = 1  # load-generator processes (they share the connections)
    feature_floats: int = 4096
    median_tokens: float = 120.0
    sigma: float = 0.8


def options(connections: str, wire: str, load_procs: int = 1, request_rate: float = 60.0,
            quick: bool = False) -> Options:
    """Options from the command line's text."""
    try:
        counts = tuple(int(x) for x in connections.split(",") if x.strip())
    except ValueError:
        raise BenchSetupError(f"--connections must be comma-separated integers (got {connections!r})") from None
    wires = tuple(w.strip() for w in wire.split(",") if w.strip())
    if load_procs < 1 or not request_rate > 0:
        raise BenchSetupError("--load-procs must be >= 1 and --request-rate > 0")
    o = Options(connections=counts, wires=wires, load_procs=load_procs, request_rate=request_rate)
    if quick:
        o.warmup_s, o.window_s, o.bisections, o.drain_s = 1.0, 1.0, 1, 3.0
    return o


# --- the ramp (pure) ---------------------------------------------------------------

def sustained(offered: float, taken: float, lost: int, p99_s: float | None) -> bool:
    """Whether a trial held its offered rate: taken in, nothing lost, delay bounded."""
    return (lost == 0 and taken >= MIN_TAKEN * offered and p99_s is not None and math.isfinite(p99_s)
            and p99_s <= MAX_DELAY_S)


class Ramp:
    """Offered rates to try: double from `start` while they hold, halve while
    they do not (from the start), then bisect (geometrically) between the
    highest that held and the lowest that failed `bisections` times."""

    def __init__(self, start: float, max_rate: float, bisections: int = 2, min_rate: float = 1000.0):
        self.start, self.max_rate, self.bisections, self.min_rate = start, max_rate, bisections, min_rate
        self.best: float | None = None  # highest sustained
        self.fail: float | None = None  # lowest not sustained
        self.tried = 0
        self._bisected = 0

    def next(self) -> float | None:
        if self.tried == 0:
            return min(self.start, self.max_rate)
        if self.fail is None:  # all held so far
            nxt = 2 * self.best
            return nxt if nxt <= self.max_rate else (self.max_rate if self.best < self.max_rate else None)
        if self.best is None:  # none held yet
            nxt = self.fail / 2
            return nxt if nxt >= self.min_rate else None
        if self._bisected >= self.bisections:
            return None
        return math.sqrt(self.best * self.fail)

    def record(self, rate: float, ok: bool) -> None:
        if self.fail is not None and self.best is not None:
            self._bisected += 1
        self.tried += 1
        if ok:
            self.best = max(self.best or 0.0, rate)
        else:
            self.fail = min(self.fail if self.fail is not None else math.inf, rate)


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]


# --- config -------------------------------------------------------------------------

def bench_config(cfg: Config, connections: int, max_groups: int) -> Config:
    """`cfg` for one connection count: its generators on consecutive free
    loopback ports, room in the buffer for `max_groups` open groups (the bench
    opens what keeps every connection busy, `Bench.step`), ARRoL reviewing
    every score from the start."""
    base = free_ports(2 * connections + 2, consecutive=True)[0]
    learner = (base + 2 * connections, base + 2 * connections + 1)
    raw = config_to_dict(cfg)
    raw["generator"].update(count=connections, hosts=[], request_addr=f"tcp://127.0.0.1:{base}",
                            stream_addr=f"tcp://127.0.0.1:{base + 1}", overprovision=1.0)
    raw["learner"].update(addr=f"tcp://127.0.0.1:{learner[0]}", reply_addr=f"tcp://127.0.0.1:{learner[1]}")
    raw["buffer"]["max_groups"] = max(cfg.buffer.max_groups, max_groups)
    if cfg.pruner.mode == "arrol":
        raw["pruner"].update(cold_start_steps=0, min_head_auc=0.0)
    raw["run"].update(id=secrets.token_hex(4), progress=False)
    return config_from_dict(raw)


# --- the controller under test ---------------------------------------------------------

class GcClock:
    """Seconds this process spent in the cyclic garbage collector, by generation."""

    def __init__(self):
        self.seconds = [0.0, 0.0, 0.0]
        self.counts = [0, 0, 0]
        self.longest = 0.0
        self._t = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            dt = time.perf_counter() - self._t
            g = info["generation"]
            self.seconds[g] += dt
            self.counts[g] += 1
            self.longest = max(self.longest, dt)

    def snapshot(self) -> tuple:
        return list(self.seconds), list(self.counts)

    def close(self) -> None:
        gc.callbacks.remove(self._on)


class TimedController(RolloutController):
    """The real controller, timing each chunk when its handling ends and
    counting the tokens its buffer took."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_in = 0
        self.recording = False
        self.handled: dict[tuple[str, int], float] = {}

    def handle(self, msg, stats) -> None:
        before = stats.tokens_generated
        super().handle(msg, stats)
        if stats.tokens_generated != before:
            self.tokens_in += stats.tokens_generated - before
            if self.recording:
                self.handled[(msg.request_id, msg.offset)] = time.monotonic()


@dataclass
class Trial:
    offered: float
    taken: float
    sent: float
    lost: int
    p99_s: float | None
    cpu_s_per_1k: float
    load_cpu_s_per_1k: float
    chunks: int
    ok: bool
    extra: dict = field(default_factory=dict)

    def asdict(self) -> dict:
        return {"offered_tokens_per_s": round(self.offered), "tokens_per_s": round(self.taken),
                "sent_tokens_per_s": round(self.sent), "lost_tokens": self.lost,
                "p99_delay_s": self.p99_s, "cpu_s_per_1k_tokens": self.cpu_s_per_1k,
                "load_cpu_s_per_1k_tokens": self.load_cpu_s_per_1k, "chunks": self.chunks, "sustained": self.ok,
                **self.extra}


class Bench:
    """One connection count and wire: the load generators, the pool and the controller."""

    def __init__(self, cfg: Config, checked, connections: int, wire: str, opts: Options):
        self.opts, self.connections, self.wire = opts, connections, wire
        # Every request the highest rate could run, 1.5 times over, in groups.
        most = math.ceil(1.5 * self.slots(opts.max_rate) * connections / cfg.generator.group_size)
        self.cfg = cfg = bench_config(cfg, connections, most)
        g = cfg.generator
        addrs = [generator_addrs(g, i) for i in range(connections)]
        procs = max(1, min(opts.load_procs, connections))
        ctx = mp.get_context("spawn")
        self.procs, self.pipes = [], []
        cap, _ = caps(cfg)
        vocab = len(checked.tokenizer)
        for k in range(procs):
            idx = list(range(k, connections, procs))
            spec = LoadSpec(run=cfg.run.id, addrs=[addrs[i] for i in idx], first_index=idx[0], hwm=g.hwm,
                            max_message_bytes=cap.max_bytes, max_model_len=cfg.model.max_model_len,
                            vocab_size=vocab, chunk_tokens=g.chunk_tokens, max_tokens=g.max_tokens,
                            concurrency=1, median_tokens=opts.median_tokens, sigma=opts.sigma,
                            feature_floats=opts.feature_floats, seed=k, wire=wire)
            parent, child = ctx.Pipe()
            p = ctx.Process(target=run_load, args=(spec, child), daemon=True, name=f"load-generator-{k}")
            p.start()
            self.procs.append(p)
            self.pipes.append(parent)
        for pipe in self.pipes:
            if not pipe.poll(60):
                raise RuntimeError("a load generator did not start within 60 s")
            msg = pipe.recv()
            if msg[0] != "ready":
                raise RuntimeError(f"a load generator failed: {msg[1]}")
        clients = [GeneratorClient(cfg, i) for i in range(connections)]
        for c in clients:
            c.requests.send(Hello())
        for c in clients:
            c.wait_ready(30.0)
        self.pool = make_pool(cfg, clients)
        sampler = PromptSampler(checked.dataset, cfg.data.shuffle, cfg.run.seed)
        self.c = TimedController(cfg, self.pool, sampler, checked.tokenizer, make_verifier(cfg.data),
                                 make_pruner(cfg))
        self.target = g.target_groups
        self.want_running = 0  # requests kept in flight (`trial` sets it)
        self.stats = self.c.begin_step()
        self.batches = 0
        self.gc = GcClock()
        # The pruner's first end_step imports scipy.stats (~0.7 s on the CPU
        # box): a one-time stall of a job's first step, not a rate; done here.
        import scipy.stats  # noqa: F401
        settle_heap()  # as the job's controller does before its first step

    def slots(self, rate: float) -> int:
        """Requests each connection runs at a total offered `rate`."""
        return max(1, math.ceil(rate / self.connections / self.opts.request_rate))

    def prime(self, timeout_s: float = 30.0) -> bool:
        """Every connection holds its requests before the warm-up (a first
        fill at 64 connections submits thousands, which no trial should
        time). False if the controller could not get them there in
        `timeout_s`: it cannot keep that many in flight, so the trial that
        follows measures it falling short (taken < 95% of offered)."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = sum(r["running"] + r["waiting"] for r in self.ask(("report",)))
            if held >= 0.9 * self.want_running:
                return True
            if time.monotonic() > deadline:
                return False
            self.run_for(0.05)

    # --- the loop: run_stream's, without a learner ---

    def step(self) -> None:
        c = self.c
        # run_stream keeps overprovision x target_groups groups open; a group
        # whose members finished holds no request, so here the open groups
        # follow the requests in flight instead: all slots stay busy.
        short = self.want_running - len(c.buffer.running) - len(c.buffer.partials)
        c.fill(c.num_open + max(0, math.ceil(short / self.cfg.generator.group_size)))
        c.pump(self.stats, timeout_ms=5)
        if c.num_ready >= self.target:
            c.take_batch(self.target, self.stats)  # the pruner's end_step; the batch is dropped
            self.batches += 1
            self.stats = c.begin_step()

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.step()

    def ask(self, *cmds, reply: bool = True) -> list:
        """Send `cmds` to every load generator; with `reply`, keep the
        controller running until each has answered the last."""
        for pipe in self.pipes:
            for cmd in cmds:
                pipe.send(cmd)
        if not reply:
            return []
        out: list = [None] * len(self.pipes)
        deadline = time.monotonic() + 30.0
        while any(o is None for o in out):
            if time.monotonic() > deadline:
                raise RuntimeError("a load generator did not answer within 30 s")
            for k, pipe in enumerate(self.pipes):
                if out[k] is None and pipe.poll():
                    out[k] = pipe.recv()
            self.step()
        return out

    def trial(self, rate: float) -> Trial:
        o, c = self.opts, self.c
        slots = self.slots(rate)
        # Every slot of every connection busy, and a tenth more waiting in
        # their queues (requests between generator and controller would
        # otherwise leave slots idle).
        self.want_running = math.ceil(1.1 * self.connections * slots)
        self.ask(("rate", rate / self.connections, slots), reply=False)
        primed = self.prime()
        self.run_for(o.warmup_s)
        c.handled.clear()
        c.recording = True
        start = self.ask(("record", True), ("report",))
        t0, cpu0, in0 = time.monotonic(), time.process_time(), c.tokens_in
        gc0, self.gc.longest = self.gc.snapshot(), 0.0
        self.run_for(o.window_s)
        t1, cpu1, in1 = time.monotonic(), time.process_time(), c.tokens_in
        gc1, gc_longest = self.gc.snapshot(), self.gc.longest
        end = self.ask(("record", False), ("report",), ("rate", 0.0))[: len(self.pipes)]
        # Drain: everything sent reaches the buffer, or is lost.
        deadline = time.monotonic() + o.drain_s
        while True:
            final = self.ask(("report",))
            sent_total = sum(sum(r["sent_tokens"]) for r in final)
            if c.tokens_in >= sent_total or time.monotonic() > deadline:
                break
            self.run_for(0.05)
        c.recording = False
        lost = sent_total - c.tokens_in
        delays, missing = [], 0
        for rep in end:
            for rid, off, _n, t in rep["log"]:
                h = c.handled.get((rid, off))
                if h is None:
                    missing += 1
                else:
                    delays.append(h - t)
        c.handled.clear()
        span = t1 - t0
        taken = (in1 - in0) / span
        sent = sum(sum(e["sent_tokens"]) - sum(s["sent_tokens"]) for s, e in zip(start, end)) / span
        load_cpu = sum(e["cpu_s"] - s["cpu_s"] for s, e in zip(start, end))
        tokens_k = max(1e-9, (in1 - in0) / 1000)
        q = p99(delays)
        ok = primed and sustained(rate, taken, lost, q) and missing == 0
        return Trial(rate, taken, sent, lost, q, (cpu1 - cpu0) / tokens_k, load_cpu / tokens_k, len(delays), ok,
                     {"primed": primed, "median_delay_s": statistics.median(delays) if delays else None,
                      "chunks_unmatched": missing, "controller_cpu_frac": (cpu1 - cpu0) / span,
                      "load_cpu_frac": load_cpu / span, "batches": self.batches,
                      "slots_per_connection": slots, "requests_running": sum(e["running"] for e in end),
                      "requests_waiting": sum(e["waiting"] for e in end),
                      "late_messages": c.buffer.stats.late_messages, "chunks_out_of_order": len(c.out_of_order),
                      # The controller's cyclic GC over the window: seconds per generation, runs, longest pause.
                      "gc_s": [round(b - a, 4) for a, b in zip(gc0[0], gc1[0])],
                      "gc_runs": [b - a for a, b in zip(gc0[1], gc1[1])], "gc_longest_s": round(gc_longest, 4)})

    def close(self) -> None:
        self.gc.close()
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        for cl in self.pool.clients:
            cl.close()


def ramp(cfg: Config, checked, connections: int, wire: str, opts: Options, start: float, log) -> dict:
    b = Bench(cfg, checked, connections, wire, opts)
    trials = []
    try:
        r = Ramp(start, opts.max_rate, opts.bisections)
        while (rate := r.next()) is not None:
            t = b.trial(rate)
            r.record(rate, t.ok)
            trials.append(t)
            log(f"connections={connections} wire={wire} offered={rate:,.0f} taken={t.taken:,.0f} "
                f"lost={t.lost} p99={t.p99_s if t.p99_s is None else round(t.p99_s * 1000, 1)} ms "
                f"cpu/1k={t.cpu_s_per_1k * 1000:.2f} ms load_cpu/1k={t.load_cpu_s_per_1k * 1000:.2f} ms "
                f"{'ok' if t.ok else 'FAIL'}")
    finally:
        b.close()
    best = max((t for t in trials if t.ok), key=lambda t: t.offered, default=None)
    return {"connections": connections, "wire": wire,
            "max_tokens_per_s": round(best.taken) if best else 0,
            "lost_tokens": sum(t.lost for t in trials),
            "p99_delay_s": best.p99_s if best else None,
            "cpu_s_per_1k_tokens": best.cpu_s_per_1k if best else None,
            "load_cpu_s_per_1k_tokens": best.load_cpu_s_per_1k if best else None,
            "request_tokens_per_s": opts.request_rate,
            "trials": [t.asdict() for t in trials]}


def main(cfg: Config, out_json: str | None, opts: Options, log=print) -> dict:
    import sys

    if cfg.pruner.mode != "arrol":
        raise BenchSetupError(f"bench controller measures the ARRoL pruner with scores (pruner.mode={cfg.pruner.mode!r})")
    bad = [w for w in opts.wires if w not in ("chunk", "batch")]
    if bad or not opts.wires:
        raise BenchSetupError(f"--wire takes chunk and/or batch (got {','.join(opts.wires)})")
    if not opts.connections or min(opts.connections) < 1:
        raise BenchSetupError("--connections must list counts >= 1")
    checked = check_job(cfg)
    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log = say if log is print else log
    results: dict[str, list] = {w: [] for w in opts.wires}
    t_start = time.monotonic()
    prev: dict[str, float] = {}
    for n in opts.connections:
        for w in opts.wires:  # interleaved: each count measures every wire back to back
            start = max(opts.start_rate, prev[w] / 2) if prev.get(w) else opts.start_rate
            res = ramp(cfg, checked, n, w, opts, start, log)
            prev[w] = res["max_tokens_per_s"] or prev.get(w, 0.0)
            results[w].append(res)
    # The top level is the generators' wire (batch) when measured, else the one given last.
    main_wire = "batch" if "batch" in opts.wires else opts.wires[-1]
    out = {
        "bench": "controller",
        "results": results[main_wire],
        "max_tokens_per_s_at_64": next((r["max_tokens_per_s"] for r in results[main_wire]
                                        if r["connections"] == 64), None),
        "wire": main_wire,
        "by_wire": {w: {"results": rs, "max_tokens_per_s_at_64": next(
            (r["max_tokens_per_s"] for r in rs if r["connections"] == 64), None)} for w, rs in results.items()},
        "target": {"tokens_per_s_at_64": 1_000_000, "p99_delay_s": MAX_DELAY_S, "lost_tokens": 0},
        "chunk_tokens": cfg.generator.chunk_tokens,
        "feature_bytes": 4 * opts.feature_floats,
        "load_processes": opts.load_procs,
        "options": msgspec.to_builtins(opts.__dict__),
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    return emit(out, out_json)
