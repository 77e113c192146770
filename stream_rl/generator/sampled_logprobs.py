"""The log-prob of every sampled token, read inside the vLLM worker.

vLLM's own path (`SamplingParams.logprobs`) packs small arrays per request
and per step in the engine and builds a `Logprob` object per token in the
front end. On the tiny world that cost about a quarter of a CPU engine's
tokens a second (docs/cores-and-placement.md). Here hooks on the
sampler read the step's raw logits and the tokens drawn from them. One
message per step carries every request's log-prob to the generator service:
the service's key for the request and the token's position in the request's
output.

The values are vLLM's default "raw" log-probs: log-softmax of the logits
before temperature, top-p or penalties.
"""

from __future__ import annotations

from typing import Callable

import torch

from stream_rl.protocol import WorkerLogprobs

# SamplingParams.extra_args key: the service's key for this engine request.
# Requests without one are not reported.
STREAM_KEY = "stream_rl_key"


def request_extra_args(runner, req_id: str) -> dict:
    """The `SamplingParams.extra_args` of engine request `req_id` ({} if none)."""
    state = runner.requests.get(req_id)
    return getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}


class SampledLogprobs:
    """Hooks on the worker's sampler; `send` gets a `WorkerLogprobs` each
    step (None: report nothing). `listeners` get (rows, log-probs) each step
    someone wants them: the batch rows that sampled a token and every row's
    value. `wanted` says whether a listener wants this step's."""

    def __init__(self, runner, send: Callable[[WorkerLogprobs], None] | None = None):
        sampler = getattr(runner, "sampler", None)
        if sampler is None or not hasattr(runner, "discard_request_mask"):
            raise RuntimeError(f"{type(runner).__name__} has no sampler or discard_request_mask: this vLLM "
                               "version cannot report sampled-token log-probs from the worker")
        self.runner = runner
        self.send = send
        self.listeners: list[Callable[[list[int], list[float]], None]] = []
        self.wanted: list[Callable[[], bool]] = []
        self._logprobs: torch.Tensor | None = None
        self._keys: dict[str, str | None] = {}
        self._handles = [sampler.register_forward_pre_hook(self._before, with_kwargs=True),
                         sampler.register_forward_hook(self._after)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def _before(self, module, args, kwargs):
        self._logprobs = None
        logits = kwargs.get("logits", args[0] if args else None)
        n = self.runner.input_batch.num_reqs
        if logits is None or n == 0 or logits.shape[0] != n:
            return None  # a profiling or dummy run
        if self.send is not None or any(w() for w in self.wanted):
            # Before the sampler: it may scale the logits in place.
            self._logprobs = torch.log_softmax(logits.float(), dim=-1)
        return None

    def _after(self, module, args, output):
        logprobs, self._logprobs = self._logprobs, None
        if logprobs is None:
            return None
        sampled = output.sampled_token_ids
        if sampled.shape[1] != 1:
            raise RuntimeError("sampled-token log-probs from the worker need one token per step "
                               "(no speculative decoding)")
        values = logprobs.gather(1, sampled.to(logprobs.device).long()).squeeze(1).tolist()
        n = len(values)
        # Rows still prefilling sample a token that vLLM then throws away.
        discard = self.runner.discard_request_mask.np[:n].tolist()
        rows = [i for i in range(n) if not discard[i]]
        for fn in self.listeners:
            fn(rows, values)
        if self.send is not None:
            self._report(rows, values)
        return None

    def _report(self, rows: list[int], values: list[float]) -> None:
        req_ids = self.runner.input_batch.req_ids
        requests = self.runner.requests
        keys, index, lps = [], [], []
        for i in rows:
            rid = req_ids[i]
            key = self._key(rid)
            if key is not None:
                keys.append(key)
                # The sampler runs before vLLM appends this step's tokens.
                index.append(len(requests[rid].output_token_ids))
                lps.append(values[i])
        if keys:
            self.send(WorkerLogprobs(keys=keys, index=index, logprobs=lps))
        if len(self._keys) > 8 * max(len(requests), 64):  # forget finished requests
            self._keys = {k: v for k, v in self._keys.items() if k in requests}

    def _key(self, req_id: str) -> str | None:
        if req_id not in self._keys:
            self._keys[req_id] = request_extra_args(self.runner, req_id).get(STREAM_KEY)
        return self._keys[req_id]
