"""Evaluates ARRoL's quality head inside the vLLM worker, on the fly.

A forward pre-hook on the model's `logits_processor` sees, every engine step,
the final hidden state of each running request: exactly the rows the
sampler turns into next-token logits (row i is `input_batch.req_ids[i]`), so
the head costs no second forward pass of the backbone. The worker's
`SampledLogprobs` gives the raw log-prob of each token a scored request
samples until then, for the head's confidence features
(`pruner.head.token_confidence`).

A request asks to be scored through its sampling params' `extra_args` (set
by the generator service from `RolloutRequest.score_at`): the prompt+response
length at which to score, the response length that is, the service's request
id (the engine renames requests internally) and the log-probs of the response
tokens it continues. When a row's sequence length, after this step's tokens,
equals that length, the head is applied to the row's features and the score
and the features are pushed to the service over a ZMQ side channel, which
puts them on the rollout's token stream (a NaN score while no head is loaded).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from stream_rl.generator.sampled_logprobs import SampledLogprobs, request_extra_args
from stream_rl.protocol import QualityScore, WorkerScore, WorkerScores
from stream_rl.pruner.head import QualityHead, encode_features, head_features

log = logging.getLogger(__name__)

# SamplingParams.extra_args key; value: {"len": seq len to score at,
# "at": response tokens at that length, "id": request id, "lps": log-probs of
# the response tokens the request continues}.
SCORE_KEY = "stream_rl_score"


class _Target:
    """What the scorer tracks for one engine request that wants a score."""
    __slots__ = ("want", "at", "rid", "start", "lps")

    def __init__(self, want: int, at: int, rid: str, lps: list[float]):
        self.want = want  # sequence length to score at; 0: scored already
        self.at = at
        self.rid = rid
        self.lps = lps  # log-probs of response tokens 1.. so far
        # Sequence length at which this request's own sampled tokens begin.
        self.start = want - at + len(lps)


_NO_SCORE = _Target(0, 0, "", [])


class QualityScorer:
    def __init__(self, runner, logprobs: SampledLogprobs, send: Callable[[WorkerScores], None] | None):
        self.runner = runner
        self.head: QualityHead | None = None
        # None on all tensor-parallel ranks but one (the hidden states are replicated).
        self._send = send
        self._targets: dict[str, _Target] = {}
        # Rows of this step that sample a token whose log-prob a target needs.
        self._lp_rows: list[tuple[int, _Target]] = []
        model = runner.get_model()
        lp = getattr(model, "logits_processor", None)
        if lp is None:
            raise RuntimeError(f"{type(model).__name__} has no logits_processor to hook the quality head on")
        self._handles = [lp.register_forward_pre_hook(self._hook)]
        self._logprobs = logprobs
        logprobs.wanted.append(self._wants_logprobs)
        logprobs.listeners.append(self._on_logprobs)
        self._failed = False

    def load_head(self, tensors: dict[str, torch.Tensor]) -> None:
        head = QualityHead.from_synced(tensors)
        device = next(self.runner.get_model().parameters()).device
        self.head = head.to(device)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._logprobs.wanted.remove(self._wants_logprobs)
        self._logprobs.listeners.remove(self._on_logprobs)

    def _target(self, req_id: str) -> _Target:
        t = self._targets.get(req_id)
        if t is None:
            want = request_extra_args(self.runner, req_id).get(SCORE_KEY)
            t = _Target(int(want["len"]), int(want["at"]), str(want["id"]), [float(x) for x in want.get("lps", ())]) \
                if want else _NO_SCORE
            self._targets[req_id] = t
        return t

    def _guarded(self, fn, *args) -> None:
        if self._failed:
            return
        try:
            fn(*args)
        except Exception:  # never take the engine down: stop scoring, loudly
            self._failed = True
            self._lp_rows = []
            log.exception("quality head scoring failed; scoring is off for this engine")

    def _hook(self, module, args):
        self._guarded(self._step, args[1])
        return None

    def _wants_logprobs(self) -> bool:
        return bool(self._lp_rows)

    def _on_logprobs(self, rows: list[int], values: list[float]) -> None:
        self._guarded(self._record_logprobs, rows, values)

    def _step(self, hidden: torch.Tensor) -> None:
        """Score the rows that reach their target length; note the rows whose
        next sampled token the confidence features need."""
        self._lp_rows = []
        batch = self.runner.input_batch
        n = batch.num_reqs
        if n == 0 or hidden.shape[0] != n:
            return  # a profiling/dummy run, or a call that is not the sampling rows
        req_ids = batch.req_ids[:n]
        targets = [self._target(r) for r in req_ids]
        if not any(t.want for t in targets):
            return
        # Sequence length once this step's tokens are in: the row is the
        # hidden state of that length's last token, and the token sampled
        # from it is response token seq_len - prompt_len + 1.
        seq_lens = self.runner.optimistic_seq_lens_cpu[:n].tolist()
        scored = []
        for i, (t, sl) in enumerate(zip(targets, seq_lens)):
            if not t.want:
                continue
            if sl == t.want:
                scored.append(i)
            elif t.start <= sl < t.want:
                self._lp_rows.append((i, t))
        if scored:
            self._score(hidden, [(i, targets[i]) for i in scored])
        if len(self._targets) > 8 * max(n, 64):  # forget finished requests
            live = self.runner.requests
            self._targets = {k: v for k, v in self._targets.items() if k in live}

    def _record_logprobs(self, rows: list[int], values: list[float]) -> None:
        mine, self._lp_rows = self._lp_rows, []
        if mine:
            sampled = set(rows)
            for i, t in mine:
                if i in sampled:
                    t.lps.append(values[i])

    def _score(self, hidden: torch.Tensor, rows: list[tuple[int, _Target]]) -> None:
        feats, done = [], []
        for i, t in rows:
            if len(t.lps) < t.at:
                # Its earlier tokens were sampled while scoring was off.
                log.warning("request %s reached its score with %d of %d log-probs; left unscored",
                            t.rid, len(t.lps), t.at)
            else:
                feats.append(head_features(hidden[i], t.lps[:t.at]))
                done.append(t)
            t.want = 0  # once per request, even if the step is recomputed
        if not feats:
            return
        x = torch.stack(feats)
        if self.head is None:
            # No head yet (before the first sync that brings one): no verdict
            # (the pruner keeps the rollout), but the features still reach the
            # learner, which trains the head on them, and the service is not
            # left waiting for a score.
            logits = [float("nan")] * len(done)
        else:
            with torch.no_grad():
                logits = self.head(x).float().cpu().tolist()
        scores = [WorkerScore(t.rid, QualityScore(at_tokens=t.at, logit=lg, features=f))
                  for t, lg, f in zip(done, logits, encode_features(x))]
        if self._send is not None:
            self._send(WorkerScores(scores=scores))
