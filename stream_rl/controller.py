"""The rollout controller: requests out, chunks in, pruner, rewards, buffer.

A rollout walks generator -> pruner -> buffer here: every chunk is appended
to its rollout, the pruner decides whether it keeps generating, and a finished
rollout is scored by the verifier and handed to the group buffer, which
releases groups once all members are finished.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from stream_rl.buffer.rollouts import Group, GroupBuffer, Rollout
from stream_rl.config import Config
from stream_rl.data import PromptRow, PromptSampler
from stream_rl.generator.client import GeneratorClient, GeneratorError
from stream_rl.protocol import RequestRejected, RolloutFinished, RolloutRequest, TokenChunk
from stream_rl.pruner.base import Pruner
from stream_rl.verifier import MathVerifier

log = logging.getLogger(__name__)


@dataclass
class RolloutStats:
    tokens_generated: int = 0
    rollouts_finished: int = 0
    truncated: int = 0  # finished by the length budget, not by EOS
    pruned: int = 0
    rejected: int = 0
    seconds: float = 0.0
    response_lens: list[int] = field(default_factory=list)


class RolloutController:
    def __init__(self, cfg: Config, client: GeneratorClient, sampler: PromptSampler, tokenizer,
                 verifier: MathVerifier, pruner: Pruner):
        self.cfg = cfg
        self.client = client
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.verifier = verifier
        self.pruner = pruner
        self.buffer = GroupBuffer(cfg.generator.group_size, cfg.buffer.max_groups)
        self._next_group = 0

    def _submit_group(self, row: PromptRow) -> None:
        g = self.cfg.generator
        gid = f"g{self._next_group}"
        self._next_group += 1
        for i in range(g.group_size):
            r = Rollout(request_id=f"{gid}-{i}", group_id=gid, prompt_ids=list(row.prompt_ids), answer=row.answer)
            self.buffer.add(r)
            self.client.submit(RolloutRequest(request_id=r.request_id, group_id=gid, prompt_ids=r.prompt_ids,
                                              max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p))

    def _drop_group(self, group_id: str) -> None:
        ids = self.buffer.drop_group(group_id)
        self.client.abort(ids)

    def collect(self, target_groups: int, timeout_s: float = 3600.0) -> tuple[list[Group], RolloutStats]:
        """Synchronous GRPO rollout: `target_groups` groups generated to completion."""
        stats = RolloutStats()
        t0 = time.perf_counter()
        for _ in range(target_groups):
            self._submit_group(self.sampler.next())
        deadline = time.monotonic() + timeout_s
        while self.buffer.num_ready < target_groups:
            if time.monotonic() > deadline:
                raise GeneratorError(f"rollout step did not finish within {timeout_s:.0f} s")
            msg = self.client.recv(timeout_ms=1000)
            if msg is None:
                self.client.check_alive()
                continue
            self._handle(msg, stats)
        stats.seconds = time.perf_counter() - t0
        return self.buffer.take_ready(target_groups), stats

    def _handle(self, msg, stats: RolloutStats) -> None:
        if isinstance(msg, TokenChunk):
            if msg.request_id not in self.buffer.rollouts:
                return  # a late chunk of a dropped group
            r = self.buffer.get(msg.request_id)
            r.append(msg)
            stats.tokens_generated += len(msg.token_ids)
            if not self.pruner.review(r):
                stats.pruned += 1
                self.client.abort([r.request_id])
        elif isinstance(msg, RolloutFinished):
            if msg.request_id not in self.buffer.rollouts:
                return
            r = self.buffer.get(msg.request_id)
            text = self.tokenizer.decode(r.response_ids, skip_special_tokens=True)
            reward = self.verifier.score(text, r.answer)
            stats.rollouts_finished += 1
            stats.truncated += msg.finish_reason == "length"
            stats.response_lens.append(len(r.response_ids))
            self.buffer.finish(msg.request_id, msg.finish_reason, reward)
        elif isinstance(msg, RequestRejected):
            if msg.request_id not in self.buffer.rollouts:
                return
            stats.rejected += 1
            group_id = self.buffer.get(msg.request_id).group_id
            log.error("generator rejected %s: %s; dropping group %s and drawing a new prompt",
                      msg.request_id, msg.error, group_id)
            self._drop_group(group_id)
            self._submit_group(self.sampler.next())
        else:
            log.warning("unexpected message during rollout: %s", type(msg).__name__)
