"""RolloutController's bookkeeping when the stream misbehaves, against a
recording stand-in for the generator pool: a request a lost generator left
running, and a stream that skips a chunk. Either way the rollout keeps its
tokens (with their log-probs and versions) and continues from them."""

from __future__ import annotations

from collections import deque

from stream_rl.buffer.recycling import RecyclingBuffer
from stream_rl.config import load_config
from stream_rl.controller.rollouts import RolloutController, RolloutStats
from stream_rl.data import PromptDataset, PromptRow, PromptSampler
from stream_rl.protocol import RolloutFinished, TokenChunk
from stream_rl.pruner import make_pruner
from stream_rl.verifier import make_verifier
from tests.conftest import ROOT


class Pool:
    """What the controller uses of a GeneratorPool, recorded."""

    def __init__(self):
        self.sent, self.aborted, self.inbox = [], [], deque()
        self.version, self.recovered = 3, set()

    def submit(self, req):
        self.sent.append(req)

    def abort(self, ids):
        self.aborted += list(ids)

    def recv(self, timeout_ms=None):
        return self.inbox.popleft() if self.inbox else None

    def check_alive(self):
        pass


class Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _controller():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["pruner.mode=none", "generator.group_size=2"])
    rows = [PromptRow(index=0, prompt="q", answer="7", prompt_ids=(1, 2, 3))]
    pool = Pool()
    c = RolloutController(cfg, pool, PromptSampler(PromptDataset(rows=rows, source="t", overlong=[]), False, 0),
                          Tokenizer(), make_verifier(cfg.data), make_pruner(cfg),
                          RecyclingBuffer(2, 8))
    c.fill(1)
    return c, pool


def chunk(rid, offset, n, version=3):
    return TokenChunk(request_id=rid, offset=offset, token_ids=list(range(10 + offset, 10 + offset + n)),
                      logprobs=[-0.5] * n, versions=[version] * n)


def test_a_request_a_lost_generator_left_continues_from_its_tokens_and_counts_them():
    c, pool = _controller()
    rid = pool.sent[0].request_id
    stats = RolloutStats()
    c.handle(chunk(rid, 0, 4), stats)
    pool.recovered.add(rid)  # the pool ended it: its generator was lost
    c.handle(RolloutFinished(request_id=rid, finish_reason="abort", num_tokens=0), stats)
    assert stats.tokens_recovered == 4 and not pool.recovered
    c.fill(1)
    again = pool.sent[-1]
    assert again.response_ids == [10, 11, 12, 13] and again.max_tokens == c.cfg.generator.max_tokens - 4
    r = c.buffer.running[again.request_id]
    assert r.logprobs == [-0.5] * 4 and r.versions == [3] * 4  # nothing regenerated


def test_a_skipped_chunk_stops_the_request_which_continues_from_the_tokens_before_it():
    c, pool = _controller()
    rid = pool.sent[0].request_id
    stats = RolloutStats()
    c.handle(chunk(rid, 0, 4), stats)
    c.handle(chunk(rid, 8, 4), stats)  # 4..7 went elsewhere (a second reader on the stream)
    assert stats.chunks_out_of_order == 1 and pool.aborted == [rid]
    c.handle(chunk(rid, 12, 4), stats)  # what follows the gap is not its either
    # The engine finished it before the abort arrived: not scored incomplete.
    c.handle(RolloutFinished(request_id=rid, finish_reason="stop", num_tokens=16), stats)
    assert stats.rollouts_finished == 0 and stats.chunks_out_of_order == 1
    c.fill(1)
    assert pool.sent[-1].response_ids == [10, 11, 12, 13]
