"""`RolloutSource` over real sockets against the controller's own learner
client (no engine): batches, weights checked whole and staged, versions,
checkpoints, failures; and `PolicyWeights` on untied and tied models."""

from __future__ import annotations

import msgspec
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from stream_rl.config import load_config
from stream_rl.learner.client import LearnerClient, LearnerError
from stream_rl.learner.policy_weights import PolicyWeights
from stream_rl.learner.samples import samples_from_groups
from stream_rl.learner.source import RolloutBatch, RolloutSource
from stream_rl.protocol import (CheckpointSaved, Group, LearnerReady, Receivers, Rollout, SaveCheckpoint, Shutdown,
                                StepDone, SyncWeights, TrainBatch, WeightsStaged)
from tests.conftest import ROOT, free_port


def tiny_llama(path, tied: bool):
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    return model


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    tiny_llama(d, tied=False)
    return d


def job_cfg(model_dir, **extra):
    sets = [f"model.path={model_dir}", f"learner.addr=tcp://127.0.0.1:{free_port()}",
            f"learner.reply_addr=tcp://127.0.0.1:{free_port()}", "weights_sync.backend=file", "pruner.mode=none",
            "run.id=test", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(ROOT / "configs" / "tiny.yaml", sets)


def rollout(gid, i, reward, n, version=0, keep=1.0, pruned=False):
    return Rollout(rollout_id=f"{gid}-{i}", group_id=gid, prompt_ids=[1, 2, 3][: 1 + i % 3], answer="", max_tokens=32,
                   response_ids=list(range(5, 5 + n)), logprobs=[-0.1 * (k + 1) for k in range(n)],
                   versions=[version + k % 2 for k in range(n)], finish_reason="pruned" if pruned else "stop",
                   reward=None if pruned else reward, keep_prob=keep)


def groups():
    return [Group(group_id="a", rollouts=[rollout("a", 0, 1.0, 3), rollout("a", 1, 0.0, 5, keep=0.5),
                                          rollout("a", 2, 0.0, 2, pruned=True)]),
            Group(group_id="b", rollouts=[rollout("b", 0, 0.0, 4, version=2), rollout("b", 1, 1.0, 1)])]


# --- PolicyWeights -----------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_weights_that_do_not_fit_the_model_are_refused_whole_naming_them(tmp_path, tied):
    model = tiny_llama(tmp_path / "m", tied)
    spec = PolicyWeights(str(tmp_path / "m"), "float32")
    sd = model.state_dict()
    got = spec.check(model)
    assert ("lm_head.weight" in got) == (not tied)  # a tied head is the embedding: sent once
    assert all(torch.equal(got[k], sd[k]) for k in got)
    bad = dict(sd)
    del bad["model.norm.weight"]
    bad["model.extra"] = torch.zeros(3)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 16)
    with pytest.raises(ValueError) as err:
        spec.check(bad)
    msg = str(err.value)
    assert "nothing was sent" in msg and "missing: model.norm.weight" in msg and "not in the model: model.extra" in msg
    assert "model.layers.0.mlp.up_proj.weight (7, 16) (the model's (32, 16))" in msg
    # bf16 weights are served in the model's dtype; a directory reads as the model does.
    assert spec.check({k: v.bfloat16() for k, v in sd.items()})["model.norm.weight"].dtype == torch.float32
    from_dir = spec.check(tmp_path / "m")
    assert from_dir.keys() == got.keys() and all(torch.equal(from_dir[k], got[k]) for k in got)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        spec.check(tmp_path)
    with pytest.raises(TypeError, match="weights: expected"):
        spec.check([1, 2])


# --- RolloutBatch ----------------------------------------------------------------------------

def test_tensors_put_each_token_value_at_the_position_that_predicts_it():
    got = samples_from_groups(groups(), 1e-6, False, correction="ht")
    batch = RolloutBatch(step=1, samples=got.samples, groups=groups(), members=got.members, correction="ht",
                         sync_version=None, policy_version=3)
    t = batch.to_tensors(pad_id=0)
    assert t["input_ids"].shape[0] == len(got.samples) == 4 and got.members == 5
    for i, s in enumerate(got.samples):
        n, p = len(s.response_ids), len(s.prompt_ids)
        assert t["input_ids"][i, : p + n].tolist() == s.prompt_ids + s.response_ids
        assert t["attention_mask"][i].sum() == p + n
        pos = t["response_mask"][i].nonzero().squeeze(-1)
        # Position t predicts token t+1: the response's tokens are predicted from p-1 on.
        assert pos.tolist() == list(range(p - 1, p - 1 + n))
        assert t["input_ids"][i, pos + 1].tolist() == s.response_ids
        assert t["rollout_logprobs"][i, pos].tolist() == pytest.approx(s.rollout_logprobs)
        assert t["versions"][i, pos].tolist() == s.versions
        assert (t["versions"][i][~t["response_mask"][i]] == -1).all()
        assert t["advantages"][i] == pytest.approx(s.advantage) and t["rewards"][i] == s.reward
        assert t["seq_weights"][i] == pytest.approx(1 / s.inclusion)
    assert t["group_index"].tolist() == [0, 0, 1, 1]
    assert batch.normalisers() == (5.0, pytest.approx(3 + 5 / 0.5 + 4 + 1))


# --- the source against the controller's learner client -------------------------------------

@pytest.fixture
def wired(model_dir, tmp_path):
    cfg = job_cfg(model_dir)
    controller = LearnerClient(cfg)
    saved = []
    source = RolloutSource(cfg, tmp_path / "run", launch=False, on_checkpoint=lambda p, s: saved.append((p, s)))
    yield cfg, controller, source, saved
    source.close()
    controller.close()


def staged_tensors(msg: WeightsStaged) -> dict:
    return load_file(msg.uri)


def test_batches_go_out_and_weights_come_back_staged_under_the_controllers_version(wired, model_dir):
    cfg, controller, source, saved = wired
    ready = controller.wait_ready(10)
    assert ready == LearnerReady(ranks=1, step=0, needs_sync=False, run="test")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    receivers = Receivers(epoch=0, generators=[0])
    # A sync before any update stages the weights the generators start from.
    controller.send(SyncWeights(version=1, receivers=receivers))
    controller.send(TrainBatch(step=1, groups=groups(), sync_version=2, sync_due=True, receivers=receivers))
    batch = next(source)
    staged = controller.wait_for(WeightsStaged, 10, "the first sync")
    assert staged.version == 1 and staged.receivers == receivers
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in staged_tensors(staged).items())
    assert batch.step == 1 and batch.sync_version == 2 and batch.policy_version == 1
    assert [s.sample_id for s in batch.samples] == ["a-0", "a-1", "b-0", "b-1"] and batch.members == 5

    # Weights that do not fit: refused whole, nothing sent, the batch still open.
    with pytest.raises(ValueError, match="missing: model.norm.weight"):
        source.update_weights({k: v for k, v in model.state_dict().items() if k != "model.norm.weight"})
    assert controller.recv(300) is None
    with pytest.raises(ValueError, match="at least 2"):
        source.update_weights(model, version=1)
    with torch.no_grad():
        model.model.norm.weight.fill_(0.5)
    assert source.update_weights(model, stats={"loss": torch.tensor(0.25)}) == 2
    done = controller.wait_for(StepDone, 10, "step 1")
    assert done.step == 1 and done.weights.version == 2 and done.stats["loss"] == 0.25
    assert done.stats["tokens_trained"] == 3 + 5 + 4 + 1 and done.stats["source_s"] > 0
    assert set(done.group_abs_advantage) == {"a", "b"}
    assert (staged_tensors(done.weights)["model.norm.weight"] == 0.5).all()
    with pytest.raises(RuntimeError, match="no batch is open"):
        source.update_weights(model)

    # Not due: kept for the next sync, unless a version is named.
    controller.send(TrainBatch(step=2, groups=groups(), sync_version=3, sync_due=False, receivers=receivers))
    controller.send(TrainBatch(step=3, groups=groups(), sync_version=3, sync_due=False, receivers=receivers))
    next(source)
    assert source.update_weights(model) is None
    assert controller.wait_for(StepDone, 10, "step 2").weights is None
    next(source)
    assert source.update_weights(model, version=7) == 7
    assert controller.wait_for(StepDone, 10, "step 3").weights.version == 7

    # A batch not reported before the next: reported without new weights.
    controller.send(TrainBatch(step=4, groups=groups(), sync_version=8, sync_due=False, receivers=receivers))
    controller.send(SaveCheckpoint(path=str(source.out / "ckpt"), step=4, version=7))
    controller.send(Shutdown())
    next(source)
    with pytest.raises(StopIteration):
        next(source)
    assert controller.wait_for(StepDone, 10, "step 4").weights is None
    assert controller.wait_for(CheckpointSaved, 10, "the checkpoint").step == 4
    assert saved == [(source.out / "ckpt", 4)]


def test_a_learner_that_fails_stops_the_controller_at_once_naming_the_error(wired):
    cfg, controller, source, _ = wired
    controller.wait_ready(10)
    controller.send(TrainBatch(step=1, groups=groups(), sync_version=1, receivers=None))
    with pytest.raises(ZeroDivisionError):
        with source:
            for _ in source:
                1 / 0
    with pytest.raises(LearnerError, match="ZeroDivisionError"):
        controller.wait_for(StepDone, 10, "step 1")


def test_start_weights_other_than_the_model_path_are_checked_and_synced_first(model_dir, tmp_path):
    cfg = job_cfg(model_dir)
    controller = LearnerClient(cfg)
    with pytest.raises(ValueError, match="missing"):
        RolloutSource(cfg, tmp_path, launch=False, weights={"model.norm.weight": torch.ones(16)})
    start = tmp_path / "start"
    tiny_llama(start, tied=False)
    source = RolloutSource(cfg, tmp_path / "run", launch=False, weights=start)
    try:
        assert controller.wait_ready(10).needs_sync
    finally:
        source.close()
        controller.close()


def test_the_wire_field_for_the_version_defaults_keep_old_batches_meaning(model_dir):
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(TrainBatch(step=1, groups=[])), type=TrainBatch)
    assert old.sync_version is None and old.sync_due


def test_a_job_that_fails_to_start_is_reported_with_its_cause(model_dir, tmp_path):
    """`launch=True`: the job is a child process; its failure (here the
    model directory has no tokenizer, found before any engine starts) ends
    the iteration with the child's own error and its log."""
    from stream_rl import SourceError

    with RolloutSource(job_cfg(model_dir), tmp_path / "run", max_steps=2) as source:
        with pytest.raises(SourceError) as err:
            next(source)
    msg = str(err.value)
    assert "exited with code 2" in msg and "tokenizer" in msg and "controller.log" in msg
    assert source.proc is None  # closed, nothing left running
