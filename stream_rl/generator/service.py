"""The generator service: a vLLM `AsyncLLM` behind two ZMQ channels.

It receives `RolloutRequest`/`AbortRequests`/`UpdateWeights`/
`SetAttentionWindow`/`Shutdown` (the engine's updates: `generator/engine_updates.py`) and
streams `TokenChunk`s (token ids, sampled-token log-probs, policy version per
token) and finish notices back, one engine step's together as a `TokenBatch`
(`generator/outbox.py`). Bad requests are answered with
`RequestRejected` and never disturb other requests.
"""

from __future__ import annotations

import asyncio
import logging
import os

import msgspec

from stream_rl.config import Config, generator_addrs, split_address
from stream_rl.generator.engine import (EngineReports, build_engine, delivery_interval, engine_shape_problem,
                                        token_versions, version_starts)
from stream_rl.generator.engine_updates import EngineUpdates
from stream_rl.generator.logprob_ledger import LogprobLedger
from stream_rl.generator.outbox import Outbox
from stream_rl.generator.quality_scorer import SCORE_KEY
from stream_rl.generator.sampled_logprobs import STREAM_KEY
from stream_rl.generator.step_trace import ENV as STEP_TRACE_ENV
from stream_rl import roles
from stream_rl.placement import pin
from stream_rl.codec import Decoder
from stream_rl.protocol import (AbortRequests, GeneratorReady, Hello, QualityScore, RequestRejected, RolloutFinished,
                                RolloutRequest, SetAttentionWindow, Shutdown, TokenChunk, ToGenerator, UpdateWeights)
from stream_rl.transport import AsyncZmqChannel, caps
from stream_rl.weights_sync.buckets import uri_group_key

log = logging.getLogger(__name__)
_FINISH_REASONS = ("stop", "length", "abort")


class GeneratorDied(RuntimeError):
    pass


class _AbortedEarly(Exception):
    """The request was aborted before its task started generating."""


class GeneratorService(EngineUpdates):
    def __init__(self, cfg: Config, index: int = 0, engine_cpus: list[int] | None = None,
                 front_cpus: list[int] | None = None):
        self.cfg = cfg
        self.index = index
        # Where the engine's processes and then this one run (stream_rl.placement).
        self.engine_cpus, self.front_cpus = engine_cpus, front_cpus
        self.generator_id = f"gen{index}"
        self.version = 0
        self.window = 0  # the attention window the engine runs with (0: dense)
        self.tasks: dict[str, asyncio.Task] = {}
        self.engine = None
        self._interval = delivery_interval(cfg.generator.chunk_tokens)
        # Quality-head scores from the worker, waiting for their request's
        # next chunk (request id -> score).
        self.scores: dict[str, QualityScore] = {}
        # Requests that ended at their scoring step, waiting for the score
        # (request id -> set when it arrives).
        self.score_waits: dict[str, asyncio.Event] = {}
        # Aborted requests whose task is still running. An abort can arrive
        # before the task has registered its request with the engine, where
        # vLLM would ignore it; the task checks this set and aborts itself.
        self.aborted: set[str] = set()
        # Sampled-token log-probs from the worker, by engine request.
        self.logprobs = LogprobLedger()

    # --- request validation: reject early, with the reason -----------------

    def _reject_undecodable(self, data: bytes, error: str) -> None:
        """A request that fails to decode but names its id is answered with
        RequestRejected: its sender would otherwise wait for it forever."""
        try:
            raw = msgspec.msgpack.decode(data)
            rid = raw.get("request_id") if isinstance(raw, dict) and raw.get("type") == "RolloutRequest" else None
            if isinstance(rid, str):
                asyncio.get_running_loop().create_task(
                    self.outbox.send(RequestRejected(request_id=rid, error=error)))
        except Exception:  # anything else stays a logged, dropped message
            pass

    def _validate(self, req: RolloutRequest) -> str | None:
        limit = self.cfg.model.max_model_len
        n_in = len(req.prompt_ids) + len(req.response_ids)
        if not req.prompt_ids:
            return "empty prompt: prompt_ids has no tokens"
        if req.request_id in self.tasks:
            return f"request_id {req.request_id!r} is already running"
        if n_in >= limit:
            return (f"prompt_ids + response_ids is {n_in} tokens, which leaves no room to generate "
                    f"within model.max_model_len={limit}")
        vocab = self._vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_ids) or any(t < 0 or t >= vocab for t in req.response_ids):
            return f"token id outside the model's vocabulary [0, {vocab})"
        return None

    async def _generate(self, req: RolloutRequest) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        g = self.cfg.generator
        n_in = len(req.prompt_ids) + len(req.response_ids)
        extra = {}
        if g.return_logprobs:  # the worker reports each sampled token's log-prob under this key
            extra[STREAM_KEY] = lp_key = self.logprobs.open(req.request_id)
        if req.score_at is not None:  # the worker's quality scorer: score at this sequence length
            extra[SCORE_KEY] = {"len": len(req.prompt_ids) + req.score_at, "at": req.score_at,
                                "id": req.request_id, "lps": req.response_logprobs}
        params = SamplingParams(
            n=1, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
            max_tokens=min(req.max_tokens, self.cfg.model.max_model_len - n_in), ignore_eos=req.ignore_eos,
            output_kind=RequestOutputKind.DELTA, detokenize=False, extra_args=extra or None,
            **self._interval,
        )
        offset = len(req.response_ids)
        ids: list[int] = []
        lps: list[float] = []
        vers: list[int] = []
        streamed = 0
        produced = 0  # output tokens of this engine request so far
        reason = "abort"
        try:
            if req.request_id in self.aborted:  # aborted before it reached the engine
                raise _AbortedEarly
            prompt = TokensPrompt(prompt_token_ids=req.prompt_ids + req.response_ids)
            stream = self.engine.generate(prompt, params, req.request_id)
            try:
                async for out in stream:
                    if req.request_id in self.aborted and not out.finished:
                        # The abort came while vLLM was still taking the
                        # request in, where it can miss it: stop here;
                        # closing the stream aborts it by its internal id.
                        break
                    c = out.outputs[0]
                    new = list(c.token_ids)
                    if new:
                        ids += new
                        if g.return_logprobs:
                            lps += await self.logprobs.get(lp_key, produced, produced + len(new))
                        starts = version_starts(self.engine, req.request_id, c if out.finished else None)
                        vers += token_versions(starts, produced, len(new), self.version)
                        produced += len(new)
                    if out.finished and req.score_at is not None \
                            and len(req.response_ids) + produced == req.score_at + 1:
                        # It stopped at its scoring step (the controller's
                        # decision point): its score left the worker during
                        # that step and goes out with the last tokens.
                        await self._await_score(req.request_id)
                    # A score goes out at once, with the tokens so far: the pruner
                    # decides on it and every token waited for is compute wasted.
                    scored = req.request_id in self.scores
                    # A delta can hold many tokens (vLLM merges the deltas a
                    # busy front end has not taken yet): chunks of at most
                    # chunk_tokens, the score with the last.
                    while ids and (len(ids) >= g.chunk_tokens or out.finished or scored):
                        n = min(len(ids), g.chunk_tokens)
                        await self.outbox.send(TokenChunk(
                            request_id=req.request_id, offset=offset + streamed, token_ids=ids[:n],
                            logprobs=lps[:n], versions=vers[:n],
                            score=self.scores.pop(req.request_id, None) if n == len(ids) else None))
                        streamed += n
                        ids, lps, vers = ids[n:], lps[n:], vers[n:]
                    if out.finished:
                        reason = c.finish_reason if c.finish_reason in _FINISH_REASONS else "abort"
            finally:
                await stream.aclose()
        except _AbortedEarly:
            pass
        except Exception as err:  # the engine refused or failed this request only
            if self.engine is None or self.engine.errored:
                # A dead engine fails every request: stop serving, so the
                # controller sees the process exit instead of endless refusals.
                log.error("the engine died (%s: %s); the generator stops", type(err).__name__, err)
                self._main.cancel()
                return
            log.exception("request %s failed", req.request_id)
            await self.outbox.send(RequestRejected(request_id=req.request_id, error=f"{type(err).__name__}: {err}"))
            return
        finally:
            self.tasks.pop(req.request_id, None)
            self.scores.pop(req.request_id, None)
            if g.return_logprobs:
                self.logprobs.close(lp_key)
            self.aborted.discard(req.request_id)
        await self.outbox.send(RolloutFinished(request_id=req.request_id, finish_reason=reason, num_tokens=streamed))

    async def _await_score(self, request_id: str, timeout_s: float = 10.0) -> None:
        if request_id in self.scores:
            return
        event = self.score_waits[request_id] = asyncio.Event()
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("no quality score for %s within %.0f s of its scoring step", request_id, timeout_s)
        finally:
            self.score_waits.pop(request_id, None)

    # --- quality scores (ARRoL) ---------------------------------------------------

    def _on_score(self, s) -> None:
        # A request that ended meanwhile has all its tokens out already.
        if s.request_id in self.tasks:
            self.scores[s.request_id] = s.score
            if s.request_id in self.score_waits:
                self.score_waits[s.request_id].set()

    # --- main loop -------------------------------------------------------------

    async def run(self) -> None:
        g = self.cfg.generator
        self._main = asyncio.current_task()
        from transformers import AutoConfig

        problem = engine_shape_problem(AutoConfig.from_pretrained(self.cfg.model.path,
                                                                  trust_remote_code=self.cfg.model.trust_remote_code))
        if problem:  # said once, before the engine fails on it for every request
            raise GeneratorDied(problem)
        # The addresses are claimed before the engine starts: vLLM binds its
        # own sockets to ports the kernel picks, and one took a configured
        # port between its choice and a bind made after the engine was up
        # ("Address already in use"). Requests sent meanwhile wait here.
        request_addr, stream_addr = generator_addrs(g, self.index)
        cap, _ = caps(self.cfg)
        self.inbox = AsyncZmqChannel(_bindable(request_addr), send=False, bind=True, hwm=g.hwm, cap=cap,
                                     decoder=Decoder(ToGenerator, self.cfg.run.id))
        self.inbox.on_reject = self._reject_undecodable
        # One engine step's chunks and finishes leave as one message (generator/outbox.py).
        self.outbox = Outbox(AsyncZmqChannel(_bindable(stream_addr), send=True, bind=True, hwm=g.hwm,
                                             run=self.cfg.run.id, cap=cap))
        if self.engine_cpus:  # the engine's scheduler process inherits this process's cores
            pin(self.engine_cpus)
        self.engine = build_engine(self.cfg, self.index, self.engine_cpus)
        if self.front_cpus:
            pin(self.front_cpus)
        self._vocab_size = self.engine.model_config.get_vocab_size()
        await self.engine.update_weight_version(str(self.version))
        self._sync_task = None
        self._receiving: tuple | None = None  # the group a transfer is being received over
        self._abandon = False
        self._reports = EngineReports(self.engine, g.hwm, self.logprobs.add, self._on_score)
        if g.return_logprobs:
            await self._reports.enable_logprobs()
        if os.environ.get(STEP_TRACE_ENV):  # `bench profile`'s view of the engine's steps
            await self.engine.collective_rpc("stream_rl_enable_step_trace", args=(os.environ[STEP_TRACE_ENV],))
        # Always on (it costs nothing until a head is loaded and a request
        # asks for a score), so one engine serves every pruner mode; it scores
        # with the head weights that arrive with the policy's (`quality_head.*`).
        try:
            await self._reports.enable_scoring()
        except Exception:
            if self.cfg.pruner.mode == "arrol":
                raise
            log.exception("the quality head cannot be hooked into this model; scoring is off")
        await self.outbox.send(GeneratorReady(generator_id=self.generator_id, version=self.version,
                                              max_model_len=self.cfg.model.max_model_len))
        try:
            while True:
                msg = await self.inbox.recv()
                if isinstance(msg, RolloutRequest):
                    error = self._validate(msg)
                    if error:
                        await self.outbox.send(RequestRejected(request_id=msg.request_id, error=error))
                    else:
                        self.tasks[msg.request_id] = asyncio.create_task(self._generate(msg))
                elif isinstance(msg, AbortRequests):
                    live = [r for r in msg.request_ids if r in self.tasks]
                    self.aborted.update(live)
                    if live:
                        await self.engine.abort(live)
                elif isinstance(msg, UpdateWeights):
                    # A task: requests and aborts keep being served while the
                    # weights travel; updates run one after the other. One
                    # still receiving over another group waits for a peer
                    # that was lost: it is abandoned, not waited out.
                    if self._sync_task is not None:
                        key = uri_group_key(msg.uri)
                        self._abandon = None not in (self._receiving, key) and self._receiving != key
                        await self._sync_task
                    self._sync_task = asyncio.create_task(self._update_weights(msg))
                elif isinstance(msg, SetAttentionWindow):
                    # After any weight load under way: one pause at a time.
                    if self._sync_task is not None:
                        await self._sync_task
                    self._sync_task = asyncio.create_task(self._set_window(msg))
                elif isinstance(msg, Hello):
                    await self.outbox.send(GeneratorReady(generator_id=self.generator_id, version=self.version,
                                                          max_model_len=self.cfg.model.max_model_len))
                elif isinstance(msg, Shutdown):
                    break
        except asyncio.CancelledError:
            if roles.received is not None:  # stopped by a signal: said so already
                raise
            raise GeneratorDied("the vLLM engine died; see the traceback above") from None
        finally:
            for t in list(self.tasks.values()) + [self._sync_task]:
                if t is not None:
                    t.cancel()
            self.engine.shutdown()
            # Dropped here, not at interpreter exit, where vLLM's __del__
            # finds its module globals already gone and prints a traceback.
            self.engine = None
            self.inbox.close()
            self.outbox.close()
            self._reports.close()


def _bindable(addr: str) -> str:
    """A generator on another host binds every interface of its port."""
    scheme, host, port = split_address(addr)
    local = host in ("127.0.0.1", "localhost", "*", "0.0.0.0")
    return addr if scheme != "tcp" or local else f"tcp://*:{port}"


def serve(cfg: Config, index: int = 0, engine_cpus: list[int] | None = None,
          front_cpus: list[int] | None = None) -> None:
    import uvloop

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s generator {index} %(levelname)s %(message)s")
    uvloop.run(GeneratorService(cfg, index, engine_cpus, front_cpus).run())
