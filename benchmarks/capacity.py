"""The engine's own capacity, measured beside the systems it limits (#24).

`capacity_fraction` = a system's generated tokens/s ÷ what the raw engine
generates when nothing else holds it back. The raw engine here is the
pipeline's: built by `build_engine` from the same config (dtype, compiled or
eager, per-request seeds, the worker's sampled log-probs) and placed on the
cores the pipeline gives its engine (`placement.for_job`: the engine's
processes on theirs, this process's front end on the rest). It runs in a
child process of its own for the whole benchmark, idle between systems, and
each `measure` keeps `concurrency` requests in flight (a finished one is
replaced at once) with `ignore_eos` and `max_tokens` = the workload's mean
response length, counting the tokens that arrive in a window after a
warm-up. This machine's speed drifts by up to ±40% within minutes, so the
capacity is measured next to each system, not once.

Not counted as engine work: the quality head's scoring at L_detect (ARRoL;
the pipeline asks the worker for it) and aborts; both are the pipeline's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import statistics
import time

import msgspec

from stream_rl.config import Config
from stream_rl.controller.rollouts import request_seed


def pipeline_concurrency(cfg: Config) -> int:
    """Requests the pipeline keeps in flight at once: every member of its open groups."""
    g = cfg.generator
    return max(1, min(g.max_num_seqs, round(g.target_groups * g.group_size * max(1.0, g.overprovision))))


def capacity_fraction(records: list[dict], capacity_tokens_per_s: float) -> dict:
    """A system's generated tokens over its training wall time, and that over the capacity."""
    tokens = sum(r.get("tokens_generated", 0) for r in records)
    wall = records[-1]["wall_s"] if records else 0.0
    rate = tokens / wall if wall else 0.0
    return {"gen_tokens_per_s": rate,
            "capacity_fraction": rate / capacity_tokens_per_s if capacity_tokens_per_s else None}


def mean_response_tokens(records: list[dict], default: int) -> int:
    """The workload's mean response length over a run's steps (`response_len_mean`)."""
    lens = [r["response_len_mean"] for r in records if r.get("response_len_mean")]
    return max(1, round(statistics.fmean(lens))) if lens else default


async def raw_request(engine, ledger, cfg: Config, rid: str, prompt: list[int], tokens: int, seed: int | None):
    """One request of up to `tokens` tokens (`ignore_eos`, within
    `model.max_model_len`) on the raw engine, sampled as the generators
    sample, its log-probs taken from the worker as the generator service
    takes them: yields (token ids, log-probs) per engine step ([] without a
    `ledger`). Close it (`contextlib.aclosing`) to abort it in the engine."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from stream_rl.generator.sampled_logprobs import STREAM_KEY

    g = cfg.generator
    key = ledger.open(rid) if ledger else None
    params = SamplingParams(n=1, temperature=g.temperature, top_p=g.top_p, ignore_eos=True, seed=seed,
                            max_tokens=max(1, min(tokens, cfg.model.max_model_len - len(prompt))),
                            output_kind=RequestOutputKind.DELTA, detokenize=False,
                            extra_args={STREAM_KEY: key} if key else None)
    n = 0
    stream = engine.generate(TokensPrompt(prompt_token_ids=prompt), params, rid)
    try:
        async for out in stream:
            new = list(out.outputs[0].token_ids)
            lps = await ledger.get(key, n, n + len(new)) if key and new else []
            n += len(new)
            yield new, lps
    finally:
        await stream.aclose()  # aborts the request in the engine if it still runs
        if key:
            ledger.close(key)


async def saturate(engine, logprobs, cfg: Config, prompts: list[list[int]], concurrency: int, tokens: int,
                   seconds: float, warmup_s: float) -> dict:
    """Keep `concurrency` requests of `tokens` tokens in flight for
    `warmup_s` + `seconds`; the tokens that arrive in the last `seconds`."""
    ids, rows = itertools.count(), itertools.cycle(prompts)
    t0 = time.perf_counter()
    start, end = t0 + warmup_s, t0 + warmup_s + seconds
    counted = finished = 0

    async def lane() -> None:
        nonlocal counted, finished
        while time.perf_counter() < end:
            rid = f"capacity-{next(ids)}"
            seed = request_seed(cfg.run.seed, rid) if cfg.generator.seeded else None
            async with contextlib.aclosing(raw_request(engine, logprobs, cfg, rid, next(rows), tokens,
                                                       seed)) as steps:
                async for new, _ in steps:
                    now = time.perf_counter()
                    if start <= now < end:
                        counted += len(new)
                    if now >= end:
                        break
                else:
                    finished += 1

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return {"engine_capacity_tokens_per_s": counted / seconds, "concurrency": concurrency,
            "tokens_per_request": tokens, "seconds": seconds, "warmup_s": warmup_s,
            "requests_finished": finished}


def _resolve(call: str | None):
    """A measurement for the child to run: `saturate`, or another benchmark's
    "module:function" with saturate's first four arguments."""
    if call is None:
        return saturate
    import importlib

    module, _, name = call.partition(":")
    return getattr(importlib.import_module(module), name)


def _serve(cfg_bytes: bytes, engine_cpus: list[int] | None, front_cpus: list[int] | None, conn) -> None:
    """The child: the engine placed as the generator service places its own,
    then one measurement per request on `conn` until None."""
    import uvloop

    from stream_rl.config import Config as _Config
    from stream_rl.placement import pin

    cfg = msgspec.json.decode(cfg_bytes, type=_Config)

    async def run() -> None:
        from transformers import AutoTokenizer

        from stream_rl.data import PromptDataset
        from stream_rl.generator.engine import EngineReports, build_engine
        from stream_rl.generator.logprob_ledger import LogprobLedger

        if engine_cpus:  # the engine's scheduler process inherits this process's cores
            pin(engine_cpus)
        engine = build_engine(cfg, 0, engine_cpus)
        if front_cpus:
            pin(front_cpus)
        ledger = reports = None
        try:
            if cfg.generator.return_logprobs:
                ledger = LogprobLedger()
                reports = EngineReports(engine, cfg.generator.hwm, ledger.add)
                await reports.enable_logprobs()
            tok = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
            prompts = [list(r.prompt_ids) for r in PromptDataset.load(cfg.data, tok).rows[:4096]]
            loop = asyncio.get_running_loop()
            conn.send({"ready": True})
            while (req := await loop.run_in_executor(None, conn.recv)) is not None:
                fn = _resolve(req.pop("call", None))
                conn.send(await fn(engine, ledger, cfg, prompts, **req))
        finally:
            if reports is not None:
                reports.close()
            engine.shutdown()

    try:
        uvloop.run(run())
    except BaseException as err:  # the parent waits on the pipe: tell it why
        conn.send({"error": f"{type(err).__name__}: {err}"})
        raise


class CapacityError(RuntimeError):
    pass


class CapacityProbe:
    """The raw engine in a child process, measured on request."""

    def __init__(self, cfg: Config, startup_timeout_s: float | None = None):
        from stream_rl.placement import for_job

        placement = for_job(cfg)
        engine_cpus, front = (placement.engines[0], placement.rest) if placement else (None, None)
        self.cfg = cfg
        self._conn, child = mp.get_context("spawn").Pipe()
        self._proc = mp.get_context("spawn").Process(
            target=_serve, args=(msgspec.json.encode(cfg), engine_cpus, front, child), daemon=False)
        self._proc.start()
        self._wait(startup_timeout_s or cfg.generator.startup_timeout_s)

    def _wait(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(1.0):
            if not self._proc.is_alive():  # died before it could say why (its log has it)
                code = self._proc.exitcode
                self.close()
                raise CapacityError(f"the capacity engine's process exited with code {code}")
            if time.monotonic() > deadline:
                self.close()
                raise CapacityError(f"the capacity engine answered nothing in {timeout_s:.0f} s")
        msg = self._conn.recv()
        if "error" in msg:
            self.close()
            raise CapacityError(f"the capacity engine failed: {msg['error']}")
        return msg

    def measure(self, tokens: int, concurrency: int | None = None, seconds: float = 10.0,
                warmup_s: float = 3.0) -> dict:
        req = {"concurrency": concurrency or pipeline_concurrency(self.cfg), "tokens": int(tokens),
               "seconds": float(seconds), "warmup_s": float(warmup_s)}
        self._conn.send(req)
        return self._wait(warmup_s + seconds + 120.0)

    def call(self, fn: str, timeout_s: float, **kwargs) -> dict:
        """Run "module:function" in the engine's child: `fn(engine, ledger,
        cfg, prompts, **kwargs)`, awaited there; its (picklable) result."""
        self._conn.send({"call": fn, **kwargs})
        return self._wait(timeout_s)

    def cpu_s(self) -> float:
        """CPU seconds the engine's processes (this child and its own) have used so far."""
        import psutil

        proc = psutil.Process(self._proc.pid)
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(60)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(10)
        self._conn.close()

    def __enter__(self) -> "CapacityProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CapacityProbe", "CapacityError", "capacity_fraction", "mean_response_tokens", "pipeline_concurrency",
           "raw_request", "saturate"]
