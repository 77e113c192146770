"""Against the real vLLM engine in a generator process, over real ZMQ sockets."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import torch

from stream_rl.protocol import (RequestRejected, RolloutFinished, RolloutRequest, TokenChunk)
from tests.conftest import cfg_with, logprob_gaps_within

pytestmark = pytest.mark.engine


def _rid(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def collect(gen, request_ids, timeout_s=120.0, on_chunk=None):
    """All messages for `request_ids` until each is finished or rejected."""
    pending = set(request_ids)
    chunks = {r: [] for r in request_ids}
    ends = {}
    deadline = time.monotonic() + timeout_s
    while pending:
        assert time.monotonic() < deadline, f"timed out waiting for {sorted(pending)}"
        msg = gen.recv(timeout_ms=1000)
        if msg is None or getattr(msg, "request_id", None) not in chunks:
            continue
        if isinstance(msg, TokenChunk):
            chunks[msg.request_id].append(msg)
            if on_chunk:
                on_chunk(msg)
        else:
            ends[msg.request_id] = msg
            pending.discard(msg.request_id)
    return chunks, ends


def _prompt(tokenizer, text="57c="):
    return tokenizer(text).input_ids


@pytest.fixture(scope="module")
def tokenizer(engine_cfg):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(engine_cfg.model.path)


def test_group_streams_contiguous_chunks_with_logprobs_and_versions(generator, tokenizer, engine_cfg):
    ids = [_rid("grp") for _ in range(8)]
    for r in ids:
        # Temperature 2: the warm-started tiny model is so sure of some
        # answers that eight samples at 1 were at times all the same.
        generator.submit(RolloutRequest(request_id=r, group_id="g", prompt_ids=_prompt(tokenizer), max_tokens=200,
                                        temperature=2.0))
    chunks, ends = collect(generator, ids)
    eos = tokenizer.eos_token_id
    for r in ids:
        end = ends[r]
        assert isinstance(end, RolloutFinished), end
        tokens, offset = [], 0
        for c in chunks[r]:
            assert c.offset == offset  # nothing lost, nothing duplicated
            assert len(c.token_ids) == len(c.logprobs) == len(c.versions)
            assert len(c.token_ids) <= engine_cfg.generator.chunk_tokens
            assert all(v == generator.version for v in c.versions)
            assert all(lp <= 0.0 for lp in c.logprobs)
            offset += len(c.token_ids)
            tokens += c.token_ids
        assert end.num_tokens == len(tokens) > 0
        assert end.finish_reason in ("stop", "length")
        if end.finish_reason == "stop":
            assert tokens[-1] == eos
    # Sampled: a group is not eight copies of one answer.
    texts = {tuple(c.token_ids for c in chunks[r]).__repr__() for r in ids}
    assert len(texts) > 1


def test_bad_requests_are_rejected_without_disturbing_others(generator, tokenizer, engine_cfg):
    good = _rid("good")
    bad = {
        _rid("empty"): [],
        _rid("long"): [tokenizer.eos_token_id] * engine_cfg.model.max_model_len,
        _rid("vocab"): [10, 10**6],
    }
    generator.submit(RolloutRequest(request_id=good, group_id="g", prompt_ids=_prompt(tokenizer), max_tokens=64))
    for r, p in bad.items():
        generator.submit(RolloutRequest(request_id=r, group_id="g", prompt_ids=p, max_tokens=8))
    _, ends = collect(generator, [good, *bad])
    assert isinstance(ends[good], RolloutFinished)
    errors = {r: ends[r].error for r in bad}
    assert all(isinstance(ends[r], RequestRejected) for r in bad)
    empty, long, vocab = bad
    assert "empty prompt" in errors[empty]
    assert "max_model_len" in errors[long]
    assert "vocabulary" in errors[vocab]


def test_malformed_wire_message_does_not_crash_the_generator(generator, tokenizer):
    generator.requests.send_raw(b"\xc1 definitely not msgpack")
    generator.requests.send_raw(b"\x81\xa4type\xa7Unknown")
    r = _rid("after-garbage")
    generator.submit(RolloutRequest(request_id=r, group_id="g", prompt_ids=_prompt(tokenizer), max_tokens=16))
    _, ends = collect(generator, [r])
    assert isinstance(ends[r], RolloutFinished)


def test_undecodable_request_with_an_id_is_rejected_to_its_sender(generator, tokenizer):
    """A RolloutRequest whose fields fail to decode (prompt_ids as strings:
    a chat template's encoding object, listed) is answered with
    RequestRejected naming the problem; it used to be dropped, and its
    sender waited forever."""
    import msgspec

    r = _rid("strings")
    generator.requests.send_raw(msgspec.msgpack.encode({
        "type": "RolloutRequest", "request_id": r, "group_id": "g", "prompt_ids": ["input_ids", "attention_mask"],
        "max_tokens": 8}))
    _, ends = collect(generator, [r])
    assert isinstance(ends[r], RequestRejected) and "Expected `int`, got `str`" in ends[r].error
    assert "prompt_ids" in ends[r].error


def _fixed_length(tokenizer, tag, n=8, max_tokens=400):
    # ignore_eos: each request runs to max_tokens unless aborted, so the test
    # does not depend on how long the tiny model's answers happen to be.
    ids = [_rid(tag) for _ in range(n)]
    for i, r in enumerate(ids):
        generator_req = RolloutRequest(request_id=r, group_id="g", prompt_ids=_prompt(tokenizer, f"9{i + 2}a="),
                                       max_tokens=max_tokens, ignore_eos=True)
        yield r, generator_req


def test_abort_stops_running_requests(generator, tokenizer):
    # 32 requests share the engine, so each advances slowly enough that the
    # abort's round trip lands before any reaches its 480 tokens; it goes
    # out once the last one streams (on loaded cores the first could run
    # alone to its end while the others were still being taken in). This
    # process can still be descheduled for longer than the ~1.3 s they take,
    # so a request that ran to its end counts as a lost abort only if that
    # happens on every try.
    for _ in range(3):
        reqs = dict(_fixed_length(tokenizer, "abort", n=32, max_tokens=480))
        for req in reqs.values():
            generator.submit(req)
        last, sent = list(reqs)[-1], []

        def abort_all(chunk):
            if not sent and chunk.request_id == last:
                sent.append(chunk.request_id)
                generator.abort(list(reqs))
        chunks, ends = collect(generator, list(reqs), on_chunk=abort_all)
        reasons = {r: ends[r].finish_reason for r in reqs}
        assert set(reasons.values()) <= {"abort", "length"}
        for r in reqs:
            assert ends[r].num_tokens == sum(len(c.token_ids) for c in chunks[r])
            assert reasons[r] == "length" or ends[r].num_tokens < 480
        if all(reason == "abort" for reason in reasons.values()):
            break
    else:
        pytest.fail(f"aborts were lost on every try: {reasons}")


def test_abort_right_after_submit_is_not_lost(generator, tokenizer):
    # The abort reaches the service before the requests reach the engine,
    # which alone would ignore it. On two busy cores the test process can
    # be descheduled between submit and abort for longer than the 400
    # tokens take (~0.3 s), so a request that ran to its end counts as a
    # lost abort only if that happens on every try.
    for _ in range(3):
        reqs = dict(_fixed_length(tokenizer, "early"))
        for req in reqs.values():
            generator.submit(req)
        generator.abort(list(reqs))
        chunks, ends = collect(generator, list(reqs))
        reasons = {r: ends[r].finish_reason for r in reqs}
        assert set(reasons.values()) <= {"abort", "length"}
        assert all(ends[r].num_tokens < 400 for r in reqs if reasons[r] == "abort")
        if all(reason == "abort" for reason in reasons.values()):
            break
    else:
        pytest.fail(f"aborts were lost on every try: {reasons}")


def test_ignore_eos_generates_exactly_max_tokens(generator, tokenizer):
    reqs = dict(_fixed_length(tokenizer, "fixed", n=2, max_tokens=64))
    for req in reqs.values():
        generator.submit(req)
    _, ends = collect(generator, list(reqs))
    assert [(ends[r].finish_reason, ends[r].num_tokens) for r in reqs] == [("length", 64)] * 2


def test_token_in_continuation_starts_after_the_partial(generator, tokenizer):
    prompt = _prompt(tokenizer, "99a=")
    partial = tokenizer("98 97 96").input_ids
    r = _rid("cont")
    generator.submit(RolloutRequest(request_id=r, group_id="g", prompt_ids=prompt, response_ids=partial,
                                    max_tokens=12))
    chunks, ends = collect(generator, [r])
    assert chunks[r][0].offset == len(partial)
    assert ends[r].num_tokens <= 12


def _learner_logprobs(model, prompt, response):
    from stream_rl.learner.trainer import token_logprobs

    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        lp = token_logprobs(model, ids, torch.ones_like(ids))[0]
    return lp[len(prompt) - 1:]


def _joined(chunks):
    """(token ids, log-probs, versions) of one request's chunks, in order."""
    return ([t for c in chunks for t in c.token_ids], [lp for c in chunks for lp in c.logprobs],
            [v for c in chunks for v in c.versions])


def _sample(generator, tokenizer, tag):
    """One response to a fixed prompt: (prompt, token ids, log-probs, versions)."""
    r = _rid(tag)
    prompt = _prompt(tokenizer, "83d=")
    generator.submit(RolloutRequest(request_id=r, group_id="g", prompt_ids=prompt, max_tokens=60))
    chunks, _ = collect(generator, [r])
    return (prompt, *_joined(chunks[r]))


def _learner_and_sync(generator, engine_cfg, tmp_path, backend):
    """A learner whose one step moves the weights far enough to see a stale
    copy (lr 5e-3), and `sync()`: its weights into the generator over
    `backend`, returning the version now served."""
    from stream_rl.config import config_from_dict, config_to_dict
    from stream_rl.learner.trainer import Learner
    from stream_rl.weights_sync import make_weight_sender

    raw = config_to_dict(engine_cfg)
    raw["learner"]["lr"] = 5e-3
    raw["weights_sync"]["backend"] = backend
    raw["weights_sync"]["bucket_mb"] = 1  # several buckets even for the tiny model
    learner = Learner(config_from_dict(raw))
    sender = make_weight_sender(config_from_dict(raw), tmp_path)

    def sync():
        v = generator.version + 1
        done = generator.update_weights(v, sender.stage(learner.weights_for_sync(), v))
        sender.release(v)
        assert done.pause_s <= done.load_s
        return v

    return learner, sender, sync


def _step_on(learner, prompt, toks, lps, versions):
    from stream_rl.learner.trainer import Sample

    learner.step([Sample(prompt, toks, 1.0, lps, versions), Sample(prompt, toks[:5], -1.0, lps[:5], versions[:5])])


@pytest.mark.parametrize("backend", ["torch_dist", "shm", "file"])
def test_weight_sync_generator_logprobs_match_learner(generator, tokenizer, engine_cfg, tmp_path, backend):
    learner, sender, sync = _learner_and_sync(generator, engine_cfg, tmp_path, backend)
    v = sync()  # start from the learner's weights
    prompt, toks, gen_lp, versions = _sample(generator, tokenizer, "before")
    assert set(versions) == {v}
    diff = (_learner_logprobs(learner.model, prompt, toks) - torch.tensor(gen_lp)).abs().max()
    assert diff < 1e-3, f"generator and learner disagree by {diff:.2e} right after a sync"

    # Update the learner only: the generator is now stale, and it shows.
    _step_on(learner, prompt, toks, gen_lp, versions)
    stale = (_learner_logprobs(learner.model, prompt, toks) - torch.tensor(gen_lp)).abs().max()
    assert stale > 1e-2

    v2 = sync()
    prompt, toks, gen_lp, versions = _sample(generator, tokenizer, "after")
    assert set(versions) == {v2} and v2 == v + 1
    diff = (_learner_logprobs(learner.model, prompt, toks) - torch.tensor(gen_lp)).abs().max()
    assert diff < 1e-3, f"generator and learner disagree by {diff:.2e} after syncing version {v2}"
    sender.close()


def test_sync_in_flight_recomputes_the_running_requests(generator, tokenizer, engine_cfg, tmp_path):
    """A sync while requests run: their later tokens carry the new version and
    exactly the new weights' log-probs, so the KV of their prompt and earlier
    tokens was recomputed on the new weights, not kept from the old ones."""
    learner, sender, sync = _learner_and_sync(generator, engine_cfg, tmp_path, "file")
    v1 = sync()
    _step_on(learner, *_sample(generator, tokenizer, "move"))  # the generator is now stale

    # Enough requests that each advances slowly (~4 s for its 300 tokens
    # here): on a fast engine 4, and at times 48, all ended before the sync
    # that their first chunk starts had landed.
    reqs = dict(_fixed_length(tokenizer, "inflight", n=128, max_tokens=300))
    for req in reqs.values():
        generator.submit(req)
    synced = []
    chunks, _ = collect(generator, list(reqs), on_chunk=lambda _: synced or synced.append(sync()))
    v2 = synced[0]
    straddled, old_gap = 0, 0.0
    for r, req in reqs.items():
        toks, lps, vers = _joined(chunks[r])
        assert len(toks) == 300 and vers == sorted(vers) and set(vers) <= {v1, v2}
        gap = (_learner_logprobs(learner.model, req.prompt_ids, toks) - torch.tensor(lps)).abs()
        new = torch.tensor([v == v2 for v in vers])
        straddled += bool(new.any() and not new.all())
        # (A request can finish its 300 tokens before the sync lands on a fast
        # engine; `straddled` below asks for some that did not.)
        if new.any():
            assert gap[new].max() < 1e-3, f"tokens after the sync miss the new weights by {gap[new].max():.2e}"
        if not new.all():
            old_gap = max(old_gap, float(gap[~new].max()))
    assert straddled > 0  # the sync landed while requests ran
    assert old_gap > 1e-2  # and the weights it brought differ visibly
    sender.close()
    # The engine's step trace saw the load and, right after it, the running
    # requests' KV recomputed: prefill tokens beyond one a row, at least one
    # per request that straddled the sync.
    from stream_rl.generator.step_trace import read_trace

    steps, events = read_trace(generator.step_trace)
    loads = [start for kind, start, _ in events if kind == "W"]
    assert loads and all(tokens >= rows >= 1 and seconds > 0 for _, seconds, tokens, rows in steps)
    after = [tokens - rows for start, _, tokens, rows in steps if loads[-1] < start < loads[-1] + 5.0]
    assert sum(after) >= straddled, (sum(after), straddled)


def test_weight_sync_refuses_mismatched_or_stale_weights_and_keeps_serving(generator, tokenizer, engine_cfg,
                                                                           tmp_path):
    """All or nothing: weights with a wrong shape or an unknown name, or an
    old version, are refused with a clear error before the model is touched;
    the serving version and its outputs stay as they were."""
    from stream_rl.generator.client import GeneratorError
    from stream_rl.learner.trainer import Learner
    from stream_rl.weights_sync.file import FileWeightSender
    from stream_rl.weights_sync.torch_dist import TorchDistWeightSender

    learner = Learner(engine_cfg)
    good = learner.weights_for_sync()
    before = generator.version

    def greedy():
        r = _rid("same")
        generator.submit(RolloutRequest(request_id=r, group_id="g", prompt_ids=_prompt(tokenizer, "83d="),
                                        max_tokens=20, temperature=0.0))
        chunks, _ = collect(generator, [r])
        return [t for c in chunks[r] for t in c.token_ids], {v for c in chunks[r] for v in c.versions}

    ref, versions = greedy()
    name = next(k for k in good if k.endswith("q_proj.weight"))
    wrong_shape = {**good, name: torch.zeros(good[name].shape[0] + 1, good[name].shape[1])}
    unknown = {**good, "model.layers.0.not_a_weight": torch.zeros(3)}
    for sender in (FileWeightSender(tmp_path), TorchDistWeightSender(1, 1, bucket_mb=1)):
        for bad, why in ((wrong_shape, name), (unknown, "unknown name")):
            v = generator.version + 1
            with pytest.raises(GeneratorError, match=why):
                generator.update_weights(v, sender.stage(bad, v))
            sender.release(v)
        sender.close()
    with pytest.raises(GeneratorError, match="not above"):
        generator.update_weights(generator.version, FileWeightSender(tmp_path).stage(good, generator.version))
    assert generator.version == before
    assert greedy() == (ref, versions)


@pytest.mark.parametrize("mode", ["stream", "sync", "april"])
def test_train_runs_end_to_end(generator, engine_cfg, tmp_path, mode):
    """`stream-rl train` with a learner process: stream (the tiny default)
    overlaps generation with the updates; sync generates each step's groups
    to completion between them; april generates each step over-provisioned,
    its unfinished rollouts continued the next step."""
    from stream_rl.controller.launch import train

    cfg = {"stream": engine_cfg, "sync": cfg_with(engine_cfg, mode="sync", pruner__mode="none"),
           "april": cfg_with(engine_cfg, mode="april", generator__overprovision=2.0)}[mode]
    summary = train(cfg, tmp_path, max_steps=3, generator=generator)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("step", "policy_version", "reward_mean", "groups", "tokens_generated", "tokens_trained", "wall_s",
                "gen_tokens_per_s", "trained_tokens_per_s", "version_lag_max", "train_s", "step_s",
                "weights_load_s", "weights_pause_s"):
        assert all(key in r for r in records), key
    # By the last step a weight load has been timed: generation stood still
    # for part of it (the staged weights arrived while it ran).
    assert 0.0 < records[-1]["weights_pause_s"] <= records[-1]["weights_load_s"]
    versions = [r["policy_version"] for r in records]
    assert versions == sorted(versions) and versions[-1] > versions[0]
    if mode != "stream":  # a sync lands between every two steps
        assert len(set(versions)) == 3
    # (In stream mode a sync lands while the next batch generates: on a
    # loaded machine two steps can be recorded before it does.)
    assert all(r["groups"] == cfg.generator.target_groups for r in records)
    assert sum(r["tokens_generated"] for r in records) > 0 and all(0.0 <= r["reward_mean"] <= 1.0 for r in records)
    # Nothing on the wire was refused or out of turn in a clean run.
    assert all(r["rejected_messages"] == 0 and r["stray_learner_replies"] == 0 for r in records)
    # The learner scores the current version's tokens as the engine sampled them.
    assert logprob_gaps_within(records)
    # Only APRIL's step ends with requests still running: its extra groups,
    # aborted and continued the next step.
    if mode == "april":
        assert any(r["aborted_at_step_end"] > 0 for r in records)
    else:
        assert all(r["aborted_at_step_end"] == 0 for r in records)
    if mode == "sync":
        # On-policy: every token of a batch was sampled by the weights it updates.
        assert all(r["stale_token_frac"] == 0.0 and r["version_lag_max"] == 0 for r in records)
    elif mode == "stream":
        # Requests outlive the in-flight syncs: later batches hold older
        # versions' tokens, none trained more than max_staleness behind
        # (restarted, dropped, or masked by the learner).
        assert any(r["stale_token_frac"] > 0 for r in records[1:])
        assert all(r["version_lag_max"] <= cfg.buffer.max_staleness
                   or (cfg.buffer.stale_policy == "mask" and r["masked_token_frac"] > 0) for r in records)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == summary["steps"] == 3 and saved["mode"] == mode
    assert (tmp_path / "final_model" / "config.json").is_file() and (tmp_path / "learner.log").is_file()
    # What was in flight at the end is saved for a later run: unfinished
    # members as partials, complete groups as ready. Stream keeps the next
    # batch's groups in flight, so something is always carried (all of it
    # may have finished while the last update ran); sync leaves nothing.
    from stream_rl.buffer.recycling import RecyclingBuffer

    buf = RecyclingBuffer(cfg.generator.group_size, cfg.buffer.max_groups)
    buf.load(tmp_path / "buffer.msgpack")
    unfinished = {r.rollout_id for members in buf.groups.values() for r in members if not r.finished}
    assert not buf.running and {r.rollout_id for r in buf.partials} == unfinished
    carried = len(buf.groups) + len(buf.ready)
    if mode == "stream":
        assert carried > 0
    elif mode == "sync":
        assert carried == 0
