"""ARRoL against the real vLLM engine over real ZMQ sockets: the quality head
evaluated inside the worker on the engine's own hidden state, its score on
the token stream, pruned requests aborted in the engine, and the pruner in a
training run."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from stream_rl.controller.rollouts import RolloutController
from stream_rl.data import PromptSampler
from stream_rl.protocol import RolloutFinished, RolloutRequest, TokenChunk
from stream_rl.pruner import make_pruner
from stream_rl.pruner.head import CONFIDENCE_FEATURES, decode_features, token_confidence
from stream_rl.verifier import make_verifier

from tests.conftest import cfg_with, logprob_gaps_within

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def head_loaded(generator, engine_cfg, tmp_path_factory):
    """The checkpoint's weights plus a freshly initialised quality head, as
    the learner syncs them; returns the learner (its model and head)."""
    from stream_rl.learner.trainer import Learner
    from stream_rl.weights_sync.file import FileWeightSender

    cfg = cfg_with(engine_cfg, pruner__mode="arrol")
    learner = Learner(cfg)
    sender = FileWeightSender(tmp_path_factory.mktemp("weights"))
    v = generator.version + 1
    generator.update_weights(v, sender.stage(learner.weights_for_sync(), v))
    return learner


def _run(generator, reqs, timeout_s=120.0):
    """Submit `reqs`; return per request: tokens streamed, the score and how
    many tokens had been streamed with it, and the finish notice."""
    out = {r.request_id: {"ids": list(r.response_ids), "lps": list(r.response_logprobs), "score": None, "seen": None,
                          "end": None} for r in reqs}
    for r in reqs:
        generator.submit(r)
    deadline = time.monotonic() + timeout_s
    while any(o["end"] is None for o in out.values()):
        assert time.monotonic() < deadline, "requests did not finish"
        msg = generator.recv(1000)
        if isinstance(msg, TokenChunk) and msg.request_id in out:
            o = out[msg.request_id]
            assert msg.offset == len(o["ids"])
            o["ids"] += msg.token_ids
            o["lps"] += msg.logprobs
            if msg.score is not None:
                assert o["score"] is None, "a request is scored once"
                o["score"], o["seen"] = msg.score, len(o["ids"])
        elif isinstance(msg, RolloutFinished) and msg.request_id in out:
            out[msg.request_id]["end"] = msg
    return out


def _expected_features(model, prompt, o, L):
    """The learner's final hidden state at response token L, and the
    confidence summary of the stream's log-probs of tokens 1..L."""
    with torch.no_grad():
        hs = model(torch.tensor([prompt + o["ids"]]), output_hidden_states=True).hidden_states[-1][0]
    return hs[len(prompt) + L - 1], torch.from_numpy(token_confidence(o["lps"][:L]))


def test_head_scores_the_engine_hidden_state_at_l_detect(generator, head_loaded, world):
    """The score arrives on the stream with at_tokens = score_at; its
    features are the learner's final hidden state at that token (no second
    forward pass: the engine's own) followed by the confidence summary of the
    log-probs the stream carried for tokens 1..score_at, with the logit the
    synced head gives them. A continuation is scored at the same point, at
    its prefill when its partial already has exactly score_at tokens, with
    the log-probs of its partial taken from the request."""
    tok, _ = world
    model, head = head_loaded.model, head_loaded.head_trainer.head
    hidden = model.config.hidden_size
    prompts = [tok.encode(p) for p in ("73c=", "99a=", "87a=", "66b=")]
    L = 24
    fresh = _run(generator, [RolloutRequest(request_id=f"hs-{i}", group_id="hs", prompt_ids=p, max_tokens=120,
                                            score_at=L) for i, p in enumerate(prompts)])
    long_ones = [(i, o) for i, o in enumerate(fresh.values()) if len(o["ids"]) > L]
    assert long_ones, "no response reached score_at"
    for i, o in long_ones:
        s = o["score"]
        assert s is not None and s.at_tokens == L and o["seen"] >= min(L, len(o["ids"]))
        feats = decode_features([s.features])[0]
        assert feats.shape == (hidden + CONFIDENCE_FEATURES,)
        want_h, want_c = _expected_features(model, prompts[i], o, L)
        assert torch.allclose(feats[:hidden], want_h, atol=1e-4), float((feats[:hidden] - want_h).abs().max())
        assert torch.allclose(feats[hidden:], want_c, atol=1e-4), (feats[hidden:], want_c)
        with torch.no_grad():
            assert head(feats[None]).item() == pytest.approx(s.logit, abs=1e-4)
    for i, o in fresh.items():
        if len(o["ids"]) <= L - 1:
            assert o["score"] is None  # finished before reaching score_at
    # Continuations: partial shorter than L (scored while decoding) and of exactly L (scored at prefill).
    i, o = long_ones[0]
    cont = _run(generator, [
        RolloutRequest(request_id="hs-c1", group_id="hs", prompt_ids=prompts[i], response_ids=o["ids"][:10],
                       response_logprobs=o["lps"][:10], max_tokens=60, score_at=L),
        RolloutRequest(request_id="hs-c2", group_id="hs", prompt_ids=prompts[i], response_ids=o["ids"][:L],
                       response_logprobs=o["lps"][:L], max_tokens=60, score_at=L)])
    assert cont["hs-c2"]["score"].logit == pytest.approx(o["score"].logit, abs=1e-5)
    assert cont["hs-c2"]["score"].at_tokens == L
    c1 = cont["hs-c1"]
    if len(c1["ids"]) > L:
        feats = decode_features([c1["score"].features])[0]
        want_h, want_c = _expected_features(model, prompts[i], c1, L)
        assert torch.allclose(feats[:hidden], want_h, atol=1e-4)
        assert torch.allclose(feats[hidden:], want_c, atol=1e-4), (feats[hidden:], want_c)
    # No score_at, no score.
    plain = _run(generator, [RolloutRequest(request_id="hs-none", group_id="hs", prompt_ids=prompts[1],
                                            max_tokens=60)])
    assert plain["hs-none"]["score"] is None


@pytest.mark.parametrize("small_groups", ["keep", "drop"])
def test_arrol_prunes_inside_the_engine(generator, head_loaded, engine_cfg, world, small_groups):
    """After cold start every rollout reaching L_detect gets a decision; a
    rollout to be scored stops at its decision point and waits for it: the
    pruned ones end there and complete their group as "pruned", the kept ones
    continue; groups keep min_survivors or are dropped and replaced."""
    cfg = cfg_with(engine_cfg, pruner__mode="arrol", pruner__cold_start_steps=0, pruner__exempt_fraction=0.0,
                   pruner__min_head_auc=0.0,  # the mechanics of pruning, whatever the head's quality
                   pruner__small_groups=small_groups, generator__target_groups=6, generator__max_tokens=300,
                   # "drop" has no exact inclusion probability: the config refuses it under "ht"
                   learner__pruning_correction="ht" if small_groups == "keep" else "none")
    tok, dataset = world
    pruner = make_pruner(cfg)
    ctl = RolloutController(cfg, generator, PromptSampler(dataset, True, 23), tok, make_verifier(cfg.data), pruner)
    ctl.buffer.prefix = f"prune-{small_groups}-"
    pruned, kept, dropped, drawn = [], [], 0, 0
    for _ in range(2):
        groups, stats = ctl.collect(6)
        dropped += stats.pruned_groups_dropped
        assert len(groups) == 6
        for g in groups:
            alive = [r for r in g.rollouts if r.finish_reason != "pruned"]
            assert len(alive) >= cfg.pruner.min_survivors
            for r in g.rollouts:
                if r.finish_reason == "pruned":
                    pruned.append(r)
                elif r.decision in ("kept", "spared"):
                    kept.append(r)
        drawn += stats.pruner["drawn"]
        assert stats.pruner["drawn"] == 0 or 0.0 <= stats.pruner["keep_rate"] <= 1.0
    ctl.drain()
    assert drawn > 0 and pruned and kept
    L = cfg.pruner.l_detect
    for r in pruned:
        assert r.decision == "pruned" and r.score is not None and r.reward is None
        assert cfg.pruner.p_min <= r.keep_prob <= cfg.pruner.p_max and r.q is not None
        # It stopped at its decision point (the step that scores it samples
        # token L + 1) and was never continued: not a token past the
        # decision, however fast the engine (an abort sent after the score
        # arrived once the engine had finished 295-token rollouts).
        assert len(r.response_ids) == L + 1
    for r in kept:
        assert r.features is not None and r.reward is not None and r.score is not None
    # Kept ones went on from their decision point (token-in) to their end.
    assert any(len(r.response_ids) > L + 1 for r in kept)
    if small_groups == "keep":
        assert dropped == 0


def test_train_with_arrol_trains_and_syncs_the_head(generator, engine_cfg, tmp_path):
    """`stream-rl train` with ARRoL: the head trains on the final rewards, the
    pruner reports its metrics every step, and pruning starts after cold start."""
    from stream_rl.controller.launch import train

    cfg = cfg_with(engine_cfg, pruner__mode="arrol", pruner__cold_start_steps=1, generator__target_groups=8,
                   pruner__min_head_auc=0.0)  # no gate: pruning starts right after cold start
    summary = train(cfg, tmp_path, max_steps=3, generator=generator)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["prune/pruned"] == 0 and records[0]["prune/prune_active"] == 0.0
    assert all(r["prune/prune_active"] == 1.0 for r in records[1:])
    assert sum(r["prune/pruned"] for r in records[1:]) > 0
    assert all(math.isfinite(r["head_loss"]) and r["head_replay"] > 0 for r in records)
    assert logprob_gaps_within(records)
    for key in ("prune/rho_hat_mean", "prune/rho_var_mean", "prune/head_auc", "prune/keep_rate",
                "tokens_per_kept_rollout"):
        assert key in records[-1]
    assert "prune/head_auc" in summary
    # Cold start keeps everything: the policy's reward is the kept one; later
    # it is the kept rewards weighted by 1/keep_prob, still a mean of 0/1.
    assert records[0]["reward_policy_mean"] == pytest.approx(records[0]["reward_mean"])
    assert all(0.0 <= r["reward_policy_mean"] <= 1.0 for r in records)
    # The run ends with a checkpoint a fresh learner and pruner restore.
    from stream_rl.learner.checkpoint import load_checkpoint
    from stream_rl.learner.trainer import Learner

    meta = load_checkpoint(tmp_path / "checkpoint", Learner(cfg), make_pruner(cfg))
    # Its version is the learner's last weights, which every generator serves at the end.
    assert meta["step"] == 3 and [meta["version"]] == summary["generator_versions"]
