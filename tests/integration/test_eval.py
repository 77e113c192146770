"""`stream-rl eval` against the real vLLM engine on the tiny world: the
checkpoint's policy is what samples, the quality head scores each candidate
inside the engine exactly as the learner would compute it (hidden state at
min(L_detect, length) tokens + confidence summary), DeepConf's token
confidence is the top-k one, and the votes in the JSON follow from the
candidates."""

from __future__ import annotations

import json

import msgspec
import pytest
import torch

from tests.conftest import cfg_with
from stream_rl.eval.answers import AnswerKey
from stream_rl.eval.sampler import EvalEngine
from stream_rl.eval.voting import majority_vote, rank_vote, weighted_vote
from stream_rl.pruner.head import token_confidence

pytestmark = pytest.mark.engine

L_DETECT = 12
K = 4


@pytest.fixture(scope="module")
def evaluated(engine_cfg, tiny_world, tmp_path_factory):
    """One eval run (`stream-rl eval`, the CLI) of a learner checkpoint whose
    policy differs from model.path's, with a spy on the scoring pass."""
    from stream_rl.cli import main
    from stream_rl.learner.checkpoint import save_checkpoint
    from stream_rl.learner.trainer import Learner

    tmp = tmp_path_factory.mktemp("eval")
    cfg = cfg_with(engine_cfg, pruner__mode="arrol", pruner__l_detect=L_DETECT, generator__max_tokens=96)
    learner = Learner(cfg)
    base = {k: v.clone() for k, v in learner.model.state_dict().items()}
    with torch.no_grad():  # a policy the engine only has if it loads the checkpoint
        gen = torch.Generator().manual_seed(0)
        for p in learner.model.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=gen))
    run = tmp / "run"
    save_checkpoint(run / "checkpoint", learner, step=1, version=1)
    # The run's config beside the checkpoint is eval's default --config.
    (run / "config.json").write_bytes(msgspec.json.encode(cfg))

    # Short questions (answers of a few numbers) and longer ones, so that
    # candidates are scored both at L_detect and at their end.
    rows = [json.loads(line) for line in (tiny_world["dir"] / "data" / "eval.jsonl").read_text().splitlines()]
    picked = [r for r in rows if r["level"] == 0][:3] + [r for r in rows if r["level"] == 2][:2]
    data = tmp / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in picked))

    captured = []
    score = EvalEngine.score

    async def spy(self, prompt_ids, cands, l_detect, tag, **kw):
        await score(self, prompt_ids, cands, l_detect, tag, **kw)
        captured.append((list(prompt_ids), cands, l_detect))

    mp = pytest.MonkeyPatch()
    mp.setattr(EvalEngine, "score", spy)
    out = tmp / "eval.json"
    try:
        rc = main(["eval", "--checkpoint", str(run / "checkpoint"), "--data", str(data), "--k", str(K),
                   "--json", str(out), "--details"])
    finally:
        mp.undo()
    assert rc == 0
    learner.model.eval()
    return {"summary": json.loads(out.read_text()), "captured": captured, "learner": learner, "base": base,
            "rows": picked, "cfg": cfg}


def test_eval_reports_every_metric(evaluated):
    s = evaluated["summary"]
    assert s["k"] == K and s["questions"] == len(evaluated["rows"])
    for m in ("pass_at_1", "maj_at_k", "qhead_at_k", "deepconf_at_k"):
        assert 0.0 <= s[m] <= s["pass_at_k"] <= 1.0, m
    assert s["tie_rule"] and s["wall_s"] > 0
    assert s["head"]["scored"] == K * len(evaluated["rows"]) and s["head"]["unscored"] == 0
    assert s["head"]["l_detect"] == L_DETECT


def test_votes_follow_from_the_candidates(evaluated):
    s, rows = evaluated["summary"], evaluated["rows"]
    key = AnswerKey(evaluated["cfg"].eval.answer_regex, evaluated["cfg"].eval.answer_match)
    pass1, maj, qhead = [], [], []
    for q, row in zip(s["per_question"], rows):
        assert q["reference"] == row["answer"] and len(q["answers"]) == K
        assert q["correct"] == [a is not None and key.correct(a, row["answer"]) for a in q["answers"]]
        assert q["maj"] == majority_vote(q["answers"])
        assert q["qhead"] == rank_vote(q["answers"], q["scores"])
        assert q["deepconf"] == weighted_vote(q["answers"], q["trace_confidence"])
        assert all(w > 0 for w in q["trace_confidence"])
        pass1.append(sum(q["correct"]) / K)
        maj.append(q["maj"] is not None and key.correct(q["maj"], row["answer"]))
        qhead.append(q["qhead"] is not None and key.correct(q["qhead"], row["answer"]))
    assert s["pass_at_1"] == pytest.approx(sum(pass1) / len(rows))
    assert s["maj_at_k"] == pytest.approx(sum(maj) / len(rows))
    assert s["qhead_at_k"] == pytest.approx(sum(qhead) / len(rows))


def _forward(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0].float().log_softmax(-1), out.hidden_states[-1][0]


def test_candidates_come_from_the_checkpoint_and_are_scored_as_in_training(evaluated):
    """Per candidate: the engine's log-probs are the checkpoint policy's (not
    model.path's); the score is the head on the learner's hidden state at
    min(L_detect, length) plus the confidence summary of those tokens; the
    DeepConf confidence is -mean of the top-20 log-probs at each position."""
    model, head = evaluated["learner"].model, evaluated["learner"].head_trainer.head
    base = type(model)(model.config)
    base.load_state_dict(evaluated["base"])
    base.eval()
    top_k = evaluated["cfg"].eval.deepconf_top_k
    kinds = set()
    gaps, base_gaps = [], []
    for prompt, cands, l_detect in evaluated["captured"]:
        assert l_detect == L_DETECT
        for c in cands:
            n = len(c.token_ids)
            at = min(L_DETECT, n)
            kinds.add(at == L_DETECT)
            assert c.scored_at == at and c.score is not None
            assert len(c.logprobs) == len(c.confidence) == n
            lp, hidden = _forward(model, prompt + c.token_ids)
            rows = lp[len(prompt) - 1:len(prompt) - 1 + n]
            mine = rows.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
            gaps.append((mine - torch.tensor(c.logprobs)).abs().mean().item())
            base_lp, _ = _forward(base, prompt + c.token_ids)
            base_mine = base_lp[len(prompt) - 1:len(prompt) - 1 + n].gather(1, torch.tensor(c.token_ids)[:, None])
            base_gaps.append((base_mine.squeeze(1) - torch.tensor(c.logprobs)).abs().mean().item())
            conf = -rows.topk(top_k, dim=-1).values.mean(-1)
            assert torch.allclose(conf, torch.tensor(c.confidence), atol=1e-3)
            feats = torch.cat([hidden[len(prompt) + at - 1], torch.from_numpy(token_confidence(c.logprobs[:at]))])
            with torch.no_grad():
                assert head(feats[None]).item() == pytest.approx(c.score, abs=1e-4)
    assert kinds == {True, False}, "expected candidates both longer and shorter than L_detect"
    assert max(gaps) < 1e-3
    assert min(base_gaps) > 10 * max(gaps), "the engine sampled with model.path's weights, not the checkpoint's"
