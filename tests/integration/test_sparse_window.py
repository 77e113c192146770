"""The sparsity knob (ALGORITHMS.md §6) against the real engine: with an
attention window of W the engine's log-prob of every sampled token is the
dense model's under a mask that keeps each token's last W keys, and at
window 0 it is the dense model's again."""

from __future__ import annotations

import pytest
import torch

from stream_rl.protocol import RolloutRequest
from tests.integration.test_engine import _joined, _prompt, _rid, collect

pytestmark = pytest.mark.engine

WINDOW = 12


@pytest.fixture(scope="module")
def tokenizer(engine_cfg):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(engine_cfg.model.path)


@pytest.fixture(scope="module")
def dense_model(engine_cfg):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine_cfg.model.path, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def windowed_logprobs(model, prompt, response, window: int | None):
    """log p(response | prompt) with each position attending to its last
    `window` tokens (itself included; None: all of them)."""
    ids = torch.tensor([prompt + response])
    n = ids.shape[1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    keep = (j <= i) & ((i - j < window) if window else torch.ones(n, n, dtype=torch.bool))
    mask = torch.zeros(1, 1, n, n).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return lp[len(prompt) - 1:]


def sample(generator, tokenizer, window: int, seed: int = 7):
    set_ = generator.set_attention_window(window)
    assert set_.window == window and set_.layers > 0
    r = _rid(f"w{window}")
    prompt = _prompt(tokenizer, "76b=")
    generator.submit(RolloutRequest(request_id=r, group_id="g", prompt_ids=prompt, max_tokens=48, seed=seed,
                                    ignore_eos=True))
    chunks, _ = collect(generator, [r])
    tokens, logprobs, _ = _joined(chunks[r])
    return prompt, tokens, torch.tensor(logprobs)


def serve(generator, model, engine_cfg, tmp_path):
    """`model`'s weights on the session's engine (earlier tests left others there)."""
    from stream_rl.learner.policy_weights import PolicyWeights
    from stream_rl.weights_sync.file import FileWeightSender

    sender = FileWeightSender(tmp_path / "weights")
    v = generator.version + 1
    generator.update_weights(v, sender.stage(PolicyWeights(engine_cfg.model.path, "float32").check(model), v))
    sender.release(v)


def test_the_engines_logprobs_follow_the_attention_window_and_zero_is_dense(generator, tokenizer, dense_model,
                                                                            engine_cfg, tmp_path):
    serve(generator, dense_model, engine_cfg, tmp_path)
    try:
        prompt, dense_tokens, dense_lp = sample(generator, tokenizer, 0)
        _, sparse_tokens, sparse_lp = sample(generator, tokenizer, WINDOW)
        _, again_tokens, again_lp = sample(generator, tokenizer, 0)
    finally:
        generator.set_attention_window(0)  # the session's engine serves dense for the other tests
    # Dense: the learner's dense log-probs, and the same again after the round trip.
    assert torch.allclose(dense_lp, windowed_logprobs(dense_model, prompt, dense_tokens, None), atol=1e-4)
    assert again_tokens == dense_tokens and torch.allclose(again_lp, dense_lp, atol=1e-5)
    # Windowed: the dense model under the window's mask, not the dense model.
    assert torch.allclose(sparse_lp, windowed_logprobs(dense_model, prompt, sparse_tokens, WINDOW), atol=1e-4)
    dense_view = windowed_logprobs(dense_model, prompt, sparse_tokens, None)
    inside = WINDOW - len(prompt) + 1  # the first tokens see at most WINDOW keys: nothing is cut yet
    assert torch.allclose(sparse_lp[:inside], dense_view[:inside], atol=1e-4)
    assert (sparse_lp[inside:] - dense_view[inside:]).abs().max() > 1e-2


def test_a_job_under_the_schedule_goes_sparse_after_warm_up_and_the_tail_shows_it(generator, engine_cfg, tmp_path):
    """sync mode (each step generated under the window of its start): dense
    through the warm-up, then the starting window on the engine, the
    monitor's tail far below the dense steps', and the schedule moving the
    window from there."""
    import json

    from stream_rl.controller.launch import train
    from tests.conftest import cfg_with

    cfg = cfg_with(engine_cfg, mode="sync", pruner__mode="none", sparsity__mode="schedule",
                   sparsity__warmup_steps=2, sparsity__window=24, sparsity__min_window=16,
                   sparsity__max_window=512, sparsity__target=-1e-5, sparsity__gain=0.5)
    try:
        train(cfg, tmp_path, max_steps=5, generator=generator)
    finally:
        generator.set_attention_window(0)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    windows = [r["sparsity/window"] for r in records]  # the window when each step's record was made
    assert windows[:3] == [0, 0, 24]  # dense steps 1-2; the starting window after step 2's update
    # The tiny task is local (each number follows from the last few), so a
    # window moves the tail little in absolute terms: ~1e-6 dense (engine
    # numerics), 2e-4 to 1e-3 under a window of 24 when this was written.
    dense = min(r["mismatch/q05"] for r in records[:2])
    sparse = [r["mismatch/q05"] for r in records[2:]]  # generated under a window
    assert sparse[0] < dense - 1e-4 and all(t < dense for t in sparse), (dense, sparse)
    # Below its target, the tail widens the window.
    assert windows[3] > 24 and windows[4] >= windows[3]
    state = json.loads((tmp_path / "checkpoint" / "controller.json").read_text())
    assert state["sparsity"]["updates"] == 5  # the schedule's state is in the job's checkpoint
