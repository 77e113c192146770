"""Evaluates ARRoL's quality head inside the vLLM worker, on the fly.

A forward pre-hook on the model's `logits_processor` sees, every engine step,
the final hidden state of each running request: exactly the rows the
sampler turns into next-token logits (row i is `input_batch.req_ids[i]`), so
the head costs no second forward pass of the backbone. A request asks to be
scored through its sampling params' `extra_args` (set by the generator
service from `RolloutRequest.score_at`): the prompt+response length at
which to score, the response length that is, and the service's request id
(the engine renames requests internally). When a row's sequence length, after this step's tokens, equals
that length, the head is applied to the row and the score and the row itself
(the head's input features) are pushed to the service over a ZMQ side
channel, which puts them on the rollout's token stream.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from stream_rl.protocol import QualityScore, WorkerScore, WorkerScores, encode
from stream_rl.pruner.head import QualityHead, encode_features

log = logging.getLogger(__name__)

# SamplingParams.extra_args key; value: {"len": seq len to score at,
# "at": response tokens at that length, "id": request id}.
SCORE_KEY = "stream_rl_score"


class QualityScorer:
    def __init__(self, runner, addr: str, send: bool):
        import zmq

        self.runner = runner
        self.head: QualityHead | None = None
        # Only one tensor-parallel rank reports (the hidden states are replicated).
        self._sock = None
        if send:
            self._sock = zmq.Context.instance().socket(zmq.PUSH)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.SNDHWM, 100000)
            self._sock.connect(addr)
        # engine request id -> (seq len to score at, response tokens then,
        # service request id); seq len 0: no score wanted (or given already)
        self._targets: dict[str, tuple[int, int, str]] = {}
        model = runner.get_model()
        lp = getattr(model, "logits_processor", None)
        if lp is None:
            raise RuntimeError(f"{type(model).__name__} has no logits_processor to hook the quality head on")
        self._handle = lp.register_forward_pre_hook(self._hook)
        self._failed = False

    def load_head(self, tensors: dict[str, torch.Tensor]) -> None:
        head = QualityHead.from_synced(tensors)
        device = next(self.runner.get_model().parameters()).device
        self.head = head.to(device)

    def close(self) -> None:
        self._handle.remove()
        if self._sock is not None:
            self._sock.close()

    def _target(self, req_id: str) -> tuple[int, int, str]:
        t = self._targets.get(req_id)
        if t is None:
            state = self.runner.requests.get(req_id)
            extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
            want = extra.get(SCORE_KEY)
            t = (int(want["len"]), int(want["at"]), str(want["id"])) if want else (0, 0, "")
            self._targets[req_id] = t
        return t

    def _hook(self, module, args):
        if self.head is None or self._failed:
            return None
        try:
            self._score(args[1])
        except Exception:  # never take the engine down: stop scoring, loudly
            self._failed = True
            log.exception("quality head scoring failed; scoring is off for this engine")
        return None

    def _score(self, hidden: torch.Tensor) -> None:
        batch = self.runner.input_batch
        n = batch.num_reqs
        if n == 0 or hidden.shape[0] != n:
            return  # a profiling/dummy run, or a call that is not the sampling rows
        req_ids = batch.req_ids[:n]
        targets = [self._target(r) for r in req_ids]
        want = np.fromiter((t[0] for t in targets), dtype=np.int64, count=n)
        if not want.any():
            return
        # Sequence length once this step's tokens are in: the row is the
        # hidden state of that length's last token.
        seq_lens = self.runner.optimistic_seq_lens_cpu[:n].numpy()
        rows = np.nonzero((want > 0) & (want == seq_lens))[0]
        if len(rows) == 0:
            return
        idx = torch.from_numpy(rows).to(hidden.device)
        h = hidden.index_select(0, idx)
        with torch.no_grad():
            logits = self.head(h).float().cpu().tolist()
        feats = encode_features(h)
        scores = []
        for k, i in enumerate(rows.tolist()):
            _, at, rid = targets[i]
            self._targets[req_ids[i]] = (0, at, rid)  # once per request, even if recomputed
            scores.append(WorkerScore(rid, QualityScore(at_tokens=at, logit=logits[k], features=feats[k])))
        if self._sock is not None:
            import zmq
            try:
                self._sock.send(encode(WorkerScores(scores=scores)), zmq.NOBLOCK)
            except zmq.Again:
                log.warning("score channel full; %d scores dropped", len(scores))
        if len(self._targets) > 8 * max(n, 64):  # forget finished requests
            live = self.runner.requests
            self._targets = {k: v for k, v in self._targets.items() if k in live}
