"""The engine side of `stream-rl eval`: k candidates per question from vLLM,
each scored by the quality head inside the engine.

The engine is the generators' (`generator.engine.build_engine`, with the
worker extension), so the head runs exactly as it does in training: the
worker's `QualityScorer` applies it to the engine's own final hidden state
and the raw log-probs of the response tokens (`pruner.head.head_features`),
asked for through `SamplingParams.extra_args[SCORE_KEY]`, and pushes the
logit over a ZMQ side channel.

Scoring is a second, one-token request per candidate, prompt + its first
`at` response tokens with their log-probs, which the scorer scores at its
prefill (as it scores a recycled partial of exactly L_detect tokens): `at`
is L_detect, as in training, or the whole response when it is shorter, and
that is known only once the candidate has finished. Training labels only
rollouts that reached L_detect, so the head has never seen a shorter one;
scoring those at their end is an extrapolation (eval reports the head's
accuracy on both kinds separately).
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgspec
import torch

from stream_rl.config import Config
from stream_rl.controller.rollouts import request_seed
from stream_rl.eval.checkpoint import CheckpointError, PolicySource
from stream_rl.eval.voting import deepconf_token_confidence
from stream_rl.generator.engine import EngineReports, build_engine
from stream_rl.generator.quality_scorer import SCORE_KEY
from stream_rl.pruner.head import QualityHead, head_input_size

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    token_ids: list[int]
    logprobs: list[float]  # of the sampled tokens (raw, before temperature)
    confidence: list[float]  # DeepConf token confidence at each position
    finish_reason: str
    score: float | None = None  # the head's logit
    scored_at: int | None = None  # response tokens the head saw


def _top_logprobs(entry: dict, top_k: int) -> list[float]:
    """The top_k log-probs of one position (vLLM adds the sampled token
    when it is not among them)."""
    return sorted((lp.logprob for lp in entry.values()), reverse=True)[:top_k]


class EvalEngine:
    """A vLLM engine serving the evaluated policy, with its quality head."""

    def __init__(self, cfg: Config, source: PolicySource):
        self.cfg = cfg
        self.source = source
        self.engine = None
        self.has_head = False
        self._scores = None
        self._waiting: dict[str, asyncio.Future] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="stream-rl-eval-")

    @staticmethod
    def engine_config(cfg: Config, source: PolicySource) -> Config:
        """A model directory is served as is; a learner checkpoint's weights
        are loaded into the config's model (its tokenizer's home)."""
        if source.model_dir is None:
            return cfg
        return msgspec.structs.replace(cfg, model=msgspec.structs.replace(cfg.model, path=str(source.model_dir)))

    async def start(self) -> None:
        self.engine = build_engine(self.cfg)
        if self.source.weights_file is not None:
            # The training weight sync's own path ("file" backend): names
            # and shapes are checked against the model first.
            await self.engine.collective_rpc("stream_rl_load_weights_from_file",
                                             args=(str(self.source.weights_file),))
            await self.engine.reset_prefix_cache()
        if self.source.head is not None:
            await self._load_head(self.source.head)

    async def _load_head(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        head = QualityHead.from_synced(tensors)
        want = head_input_size(self.engine.model_config.get_hidden_size())
        if head.in_features != want:
            raise CheckpointError(f"the quality head takes {head.in_features} features; this model's hidden state "
                                  f"gives {want}: the head belongs to another model")
        self._scores = EngineReports(self.engine, self.cfg.generator.hwm, on_score=self._on_score)
        await self._scores.enable_scoring()
        path = Path(self._tmp.name) / "quality_head.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        await self.engine.collective_rpc("stream_rl_load_weights_from_file", args=(str(path),))
        self.has_head = True

    def _on_score(self, s) -> None:
        fut = self._waiting.pop(s.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(s.score)

    async def sample(self, prompt_ids: list[int], k: int, tag: str) -> list[Candidate]:
        """k independent candidates for one prompt."""
        return list(await asyncio.gather(*(self._sample_one(prompt_ids, f"{tag}-s{j}") for j in range(k))))

    async def _sample_one(self, prompt_ids: list[int], rid: str) -> Candidate:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        g, e = self.cfg.generator, self.cfg.eval
        params = SamplingParams(
            n=1, temperature=g.temperature, top_p=g.top_p,
            seed=request_seed(self.cfg.run.seed, rid) if g.seeded else None,
            max_tokens=min(g.max_tokens, self.cfg.model.max_model_len - len(prompt_ids)),
            logprobs=e.deepconf_top_k, output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False)
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, rid):
            final = out
        if final is None:  # the engine ended the request without output
            return Candidate(token_ids=[], logprobs=[], confidence=[], finish_reason="abort")
        c = final.outputs[0]
        ids = list(c.token_ids)
        entries = list(c.logprobs or [])
        return Candidate(token_ids=ids, logprobs=[float(en[t].logprob) for t, en in zip(ids, entries)],
                         confidence=[deepconf_token_confidence(_top_logprobs(en, e.deepconf_top_k))
                                     for en in entries],
                         finish_reason=str(c.finish_reason))

    async def score(self, prompt_ids: list[int], cands: list[Candidate], l_detect: int, tag: str,
                    timeout_s: float = 60.0) -> None:
        """Set each candidate's `score` (None when it cannot be scored)."""
        if not self.has_head:
            return
        jobs = []
        for j, c in enumerate(cands):
            at = min(l_detect, len(c.token_ids))
            # Room for the one token the scoring request samples.
            if at >= 1 and len(prompt_ids) + at < self.cfg.model.max_model_len and len(c.logprobs) >= at:
                jobs.append((c, at, f"{tag}-score{j}"))
        futs = {rid: asyncio.get_running_loop().create_future() for _, _, rid in jobs}
        self._waiting.update(futs)
        try:
            await asyncio.gather(*(self._score_one(prompt_ids, c, at, rid) for c, at, rid in jobs))
            # The worker sends a score before its step's output leaves the
            # engine, but on another socket: wait for it.
            done, _ = await asyncio.wait(list(futs.values()), timeout=timeout_s)
        finally:
            for rid in futs:
                self._waiting.pop(rid, None)
        for c, at, rid in jobs:
            fut = futs[rid]
            if fut in done:
                s = fut.result()
                if math.isfinite(s.logit):  # NaN: the engine has no head loaded
                    c.score, c.scored_at = float(s.logit), int(s.at_tokens)
            else:
                fut.cancel()
                log.warning("no quality-head score for %s within %.0f s", rid, timeout_s)

    async def _score_one(self, prompt_ids: list[int], c: Candidate, at: int, rid: str) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        prompt = prompt_ids + c.token_ids[:at]
        params = SamplingParams(n=1, max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY, detokenize=False,
                                extra_args={SCORE_KEY: {"len": len(prompt), "at": at, "id": rid,
                                                        "lps": c.logprobs[:at]}})
        async for _ in self.engine.generate(TokensPrompt(prompt_token_ids=prompt), params, rid):
            pass

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self._scores is not None:
            self._scores.close()
        self._tmp.cleanup()
