"""`stream-rl bench generation`: raw engine, synchronous pipeline and APRIL.

One run, three modes on the same prompt sequence with the same budgets,
interleaved step by step in this order (engine, sync, april), after untimed
warm-up rounds, so the machine's drift hits every mode alike:

- `engine`: a raw `AsyncLLM` in this process, no sockets, no buffer. Each
  step submits exactly the requests the `sync` step will (same ids, prompts,
  budgets and per-request seeds, so the same tokens) and waits for them all,
  with each token's log-prob taken as the generator service takes it.
- `sync`: the streaming pipeline (generator process, ZMQ, controller, buffer,
  verifier) generating each step's `target_groups` x G to completion.
- `april`: the same pipeline with over-provisioning and partial recycling.
  The aborted requests' last tokens arrive during its next step, as in
  training.

Each mode has its own engine (this process's, and one generator process per
pipeline mode, all with the same settings); only one is busy at a time, and
an idle vLLM engine uses (almost) no CPU. Requests are seeded
(`generator.seeded`) in every mode, so `engine` and `sync` generate identical
tokens and `pipeline_vs_engine` measures only what the pipeline costs.
`useful_tokens_per_s` counts the response tokens of the groups a step
delivers that were generated inside the timed window, over the summed step
times. `engine_busy_fraction` is the time-averaged number of requests in
flight at the engine (submitted, not yet finished) over `max_num_seqs`.
`frontend_cpu_s_per_1k_tokens` is the CPU time of the processes in front of
the engine (engine: this process; pipeline: controller and generator
service, not the engine core and its workers, which poll while waiting).
After the steps, `engine_capacity_tokens_per_s` is the raw engine's
saturated rate (`benchmarks/capacity.py`, twice, on requests of the engine
mode's mean length) and each mode's `capacity_fraction` its share of it.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from benchmarks.capacity import CapacityProbe
from benchmarks.common import BenchSetupError, emit, with_free_ports
from stream_rl.config import Config
from stream_rl.controller.rollouts import RolloutController, request_seed
from stream_rl.data import PromptDataset, PromptSampler
from stream_rl.generator.sampled_logprobs import STREAM_KEY
from stream_rl.pruner import make_pruner
from stream_rl.verifier import make_verifier


class InFlightMeter:
    """Integrates the number of requests in flight over time."""

    def __init__(self):
        self.n = 0
        self.request_s = 0.0
        self._last = time.perf_counter()

    def change(self, delta: int) -> None:
        now = time.perf_counter()
        self.request_s += self.n * (now - self._last)
        self._last = now
        self.n += delta


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class ModeTally:
    """One mode's timed steps."""

    def __init__(self, max_num_seqs: int):
        self.max_num_seqs = max_num_seqs
        self.tokens: list[int] = []
        self.seconds: list[float] = []
        self.request_s = 0.0
        self.frontend_cpu_s = 0.0
        self.extra: dict[str, int] = {}

    def add(self, tokens: int, seconds: float, request_s: float, frontend_cpu_s: float, **extra: int) -> None:
        self.tokens.append(tokens)
        self.seconds.append(seconds)
        self.request_s += request_s
        self.frontend_cpu_s += frontend_cpu_s
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0) + v

    def result(self) -> dict:
        total_s, n = sum(self.seconds), sum(self.tokens)
        return {
            "useful_tokens_per_s": n / total_s if total_s else 0.0,
            "step_s": statistics.mean(self.seconds) if self.seconds else 0.0,
            "engine_busy_fraction": self.request_s / total_s / self.max_num_seqs if total_s else 0.0,
            "mean_requests_in_flight": self.request_s / total_s if total_s else 0.0,
            "useful_tokens": n,
            "frontend_cpu_s_per_1k_tokens": 1000 * self.frontend_cpu_s / n if n else 0.0,
            "seconds": total_s,
            "steps": len(self.seconds),
            "step_s_each": [round(x, 3) for x in self.seconds],
            **self.extra,
        }


class EngineMode:
    """The raw engine, driven on its own event loop between pipeline steps."""

    def __init__(self, cfg: Config, sampler: PromptSampler):
        import uvloop  # the loop the generator service runs on (vLLM's servers too)

        from stream_rl.generator.engine import build_engine

        self.cfg, self.sampler = cfg, sampler
        self.loop = uvloop.new_event_loop()
        self.engine = self.loop.run_until_complete(self._async(build_engine, cfg))
        # Log-probs as the generator service takes them: from the worker.
        self.logprobs = self.reports = None
        if cfg.generator.return_logprobs:
            self.loop.run_until_complete(self._reports())
        self.tally = ModeTally(cfg.generator.max_num_seqs)
        self.group = 0

    @staticmethod
    async def _async(fn, *args):
        return fn(*args)

    async def _reports(self) -> None:
        from stream_rl.generator.engine import EngineReports
        from stream_rl.generator.logprob_ledger import LogprobLedger

        self.logprobs = LogprobLedger()
        self.reports = EngineReports(self.engine, self.cfg.generator.hwm, self.logprobs.add)
        await self.reports.enable_logprobs()

    async def _batch(self, reqs: list[tuple[str, list[int]]], meter: InFlightMeter) -> list[int]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        g, cfg = self.cfg.generator, self.cfg

        async def one(rid: str, prompt: list[int]) -> int:
            key = self.logprobs.open(rid) if self.logprobs else None
            params = SamplingParams(n=1, temperature=g.temperature, top_p=g.top_p,
                                    seed=request_seed(cfg.run.seed, rid),
                                    max_tokens=min(g.max_tokens, cfg.model.max_model_len - len(prompt)),
                                    extra_args={STREAM_KEY: key} if key else None,
                                    output_kind=RequestOutputKind.DELTA, detokenize=False)
            n = 0
            meter.change(+1)
            try:
                async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt), params, rid):
                    new = len(out.outputs[0].token_ids)
                    if key and new:
                        await self.logprobs.get(key, n, n + new)
                    n += new
            finally:
                meter.change(-1)
                if key:
                    self.logprobs.close(key)
            return n

        return await asyncio.gather(*(one(rid, p) for rid, p in reqs))

    def step(self, timed: bool) -> None:
        g = self.cfg.generator
        reqs = []
        for _ in range(g.target_groups):
            row = self.sampler.next()
            # The ids the controller gives a group's first requests.
            reqs += [(f"g{self.group}-{i}.1", row.prompt_ids) for i in range(g.group_size)]
            self.group += 1
        meter = InFlightMeter()
        c0, t0 = cpu_s(os.getpid()), time.perf_counter()
        counts = self.loop.run_until_complete(self._batch(reqs, meter))
        meter.change(0)
        if timed:
            self.tally.add(sum(counts), time.perf_counter() - t0, meter.request_s, cpu_s(os.getpid()) - c0)

    def close(self) -> None:
        if self.reports is not None:
            self.reports.close()
        # Inside its loop, so the engine's output task ends with it.
        self.loop.run_until_complete(self._async(self.engine.shutdown))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


class PipelineMode:
    """The controller over the generator process, in `sync` mode or, with
    `overprovision`, `april` mode."""

    def __init__(self, cfg: Config, client, dataset, tokenizer, overprovision: float | None = None):
        self.cfg, self.client, self.overprovision = cfg, client, overprovision
        self.controller = RolloutController(cfg, client, PromptSampler(dataset, cfg.data.shuffle, cfg.run.seed),
                                            tokenizer, make_verifier(cfg.data), make_pruner(cfg))
        self.tally = ModeTally(cfg.generator.max_num_seqs)
        self.before: dict[str, int] | None = None

    def start_window(self) -> None:
        """Tokens already in the buffer were generated before the window."""
        self.controller.drain()
        buf = self.controller.buffer
        self.before = {r.rollout_id: len(r.response_ids)
                       for members in [*buf.groups.values(), *(grp.rollouts for grp in buf.ready)] for r in members}

    def step(self, timed: bool) -> None:
        pids = (os.getpid(), self.client.proc.pid)
        c0 = sum(cpu_s(p) for p in pids)
        groups, stats = self.controller.collect(self.cfg.generator.target_groups, self.overprovision)
        if timed:
            tokens = sum(len(r.response_ids) - self.before.get(r.rollout_id, 0) for grp in groups for r in grp.rollouts)
            self.tally.add(tokens, stats.seconds, stats.busy_request_s,
                           sum(cpu_s(p) for p in pids) - c0, tokens_generated=stats.tokens_generated,
                           aborted_at_step_end=stats.aborted,
                           partials_continued=stats.buffer["partials_continued"])


def _with(cfg: Config, **generator) -> Config:
    return msgspec.structs.replace(cfg, generator=msgspec.structs.replace(cfg.generator, **generator))


def bench_generation(cfg: Config, steps: int = 10, warmup_steps: int = 2, workdir: str | None = None,
                     capacity: bool = True) -> dict:
    from transformers import AutoTokenizer

    from stream_rl.generator.client import GeneratorProcess

    if cfg.generator.overprovision <= 1.0:
        # The tiny default streams with 1.0 (stream mode needs no more); the
        # synchronous APRIL step measured here is nothing without it.
        raise BenchSetupError(f"generator.overprovision is {cfg.generator.overprovision}: the april mode keeps "
                              "no more groups in flight than sync; pass --set generator.overprovision=2.0 "
                              "(APRIL's setting)")
    cfg = _with(cfg, seeded=True)
    g = cfg.generator
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    dataset = PromptDataset.load(cfg.data, tokenizer)
    t_start = time.time()
    engine = EngineMode(cfg, PromptSampler(dataset, cfg.data.shuffle, cfg.run.seed))
    gens, cfgs = [], []
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            for name in ("sync", "april"):
                gcfg = with_free_ports(cfg)
                cfgs.append(gcfg)
                gens.append(GeneratorProcess(gcfg, Path(tmp) / name))
            # sync's request ids (and so seeds and tokens) are the engine mode's.
            sync = PipelineMode(cfgs[0], gens[0], dataset, tokenizer)
            april = PipelineMode(cfgs[1], gens[1], dataset, tokenizer, g.overprovision)
            for i in range(warmup_steps + steps):
                if i == warmup_steps:
                    sync.start_window()
                    april.start_window()
                for mode in (engine, sync, april):
                    mode.step(timed=i >= warmup_steps)
            april.controller.drain()
            open_left = april.controller.buffer.num_open_groups
    finally:
        for gen in gens:
            gen.stop()
        engine.close()
    caps = []
    if capacity:
        # With the modes' engines gone: the raw engine saturated at the
        # pipeline's concurrency, on requests of the engine mode's mean length (#24).
        tokens = round(sum(engine.tally.tokens) / max(1, steps * g.target_groups * g.group_size))
        with CapacityProbe(cfg) as probe:
            caps = [probe.measure(max(1, tokens)) for _ in range(2)]
    modes = {"engine": engine.tally.result(), "sync": sync.tally.result(), "april": april.tally.result()}
    capacity_tps = statistics.fmean(c["engine_capacity_tokens_per_s"] for c in caps) if caps else None
    for m in modes.values():
        m["capacity_fraction"] = m["useful_tokens_per_s"] / capacity_tps if capacity_tps else None
    modes["april"]["open_groups_left"] = open_left
    eng, syn, apr = modes["engine"], modes["sync"], modes["april"]
    return {
        "benchmark": "generation",
        "april_vs_sync": apr["useful_tokens_per_s"] / syn["useful_tokens_per_s"],
        "pipeline_vs_engine": syn["useful_tokens_per_s"] / eng["useful_tokens_per_s"],
        # Seeded requests: the engine and the sync pipeline sample the same tokens.
        "engine_and_sync_tokens_equal": eng["useful_tokens"] == syn["useful_tokens"],
        "engine_capacity_tokens_per_s": capacity_tps,
        "engine_capacity": caps,
        "modes": modes,
        "setup": {
            "model": cfg.model.path, "target_groups": g.target_groups, "group_size": g.group_size,
            "max_tokens": g.max_tokens, "overprovision": g.overprovision, "chunk_tokens": g.chunk_tokens,
            "max_num_seqs": g.max_num_seqs, "return_logprobs": g.return_logprobs, "seeded": True,
            "steps": steps, "warmup_steps": warmup_steps, "order": "interleaved per step: engine, sync, april; one engine per mode",
            "busy_measure": "time-averaged requests in flight at the engine / generator.max_num_seqs",
            "useful_tokens": "response tokens of delivered (complete) groups generated in the timed window",
            "cpus": os.cpu_count(), "platform": platform.platform(), "wall_s": round(time.time() - t_start, 1),
        },
    }


def main(cfg: Config, out_json: str | None, steps: int, warmup_steps: int, capacity: bool = True) -> dict:
    return emit(bench_generation(cfg, steps, warmup_steps, capacity=capacity), out_json)
